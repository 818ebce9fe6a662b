"""One TLS handshake with the server before the SuperNode starts, so a transport mismatch is one clear line.

Flower's SuperNode treats every connection failure alike: it retries (forever, by default) and logs
gRPC's status, so a device started with ``--insecure`` against a TLS server, or with the wrong CA,
waits without ever saying why. ``tls_problem`` does what the SuperNode's channel would do first, with
the standard library's ``ssl`` (the same X.509 checks: chain to the CA, name or IP of the host):

- TLS wanted: a handshake verified against ``--root-certificates`` (else the system CAs). A server
  that answers in plain text, or a certificate that does not verify, is a problem to report.
- ``--insecure``: a handshake with no verification; if the server completes it, it speaks TLS and a
  plain-text channel can never reach it.
- A server that is not reachable (refused, timed out, unknown host) is *not* a problem: the device
  waits for the server by design (``--max-wait-time``).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host if context.check_hostname else None):
            pass


def tls_problem(host: str, port: int, *, insecure: bool, root_certificates: Path | None,
                timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a SuperNode with these settings cannot talk to ``host:port``, in one line; None when it can
    or when the server is not reachable now (the device then waits for it). Never raises."""
    where = f"--server {host}:{port}"
    try:
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            try:
                _handshake(host, port, context, timeout)
            except (ssl.SSLError, ConnectionResetError):
                return None  # no TLS there: plain text is what --insecure speaks
            return (f"{where} speaks TLS but this client was started with --insecure; drop --insecure and pass "
                    "--root-certificates with the CA certificate (ca.crt) that signed the server's certificate")
        try:
            context = ssl.create_default_context(cafile=str(root_certificates) if root_certificates else None)
        except (ssl.SSLError, ValueError) as err:
            return f"--root-certificates {root_certificates}: not a PEM CA certificate ({err}); pass ca.crt"
        context.set_alpn_protocols(["h2"])  # what gRPC offers
        try:
            _handshake(host, port, context, timeout)
        except ssl.SSLCertVerificationError as err:
            trusted = f"--root-certificates {root_certificates}" if root_certificates else "the system's CAs"
            return (f"{where}: the server's TLS certificate is not trusted by {trusted} ({err.verify_message}); "
                    "pass the CA certificate (ca.crt) that signed the server's certificate, and connect by a "
                    "name or IP address the certificate lists")
        except (ssl.SSLError, ConnectionResetError) as err:
            reason = getattr(err, "reason", None) or type(err).__name__
            return (f"{where} does not speak TLS ({reason}; a server started with --insecure?); start the server "
                    "with --certificates DIR, or pass --insecure here on a trusted test network only")
    except (OSError, ValueError):  # refused, unreachable, timed out, unknown host: wait for the server
        return None
    return None
