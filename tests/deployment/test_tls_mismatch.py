"""A client whose transport settings cannot reach the server says why at once (issue 12, kind 9).

Real SuperLinks on loopback (one with TLS, one started with --insecure) and the real `fedpersona client`
command in its own process: a mismatch used to leave the SuperNode retrying forever without a word about
TLS (or, with --auth-key, blaming the key); now it is one line naming the setting, exit 2, before any
SuperNode starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpersona.deploy.superlink import SuperLink, SuperLinkOptions, TLSFiles

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def links(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    import socket

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    root = tmp_path_factory.mktemp("links")
    tls_port, plain_port = port(), port()
    with SuperLink(SuperLinkOptions(root / "tls", host="127.0.0.1", port=tls_port, tls=TLSFiles.from_dir(certs))), \
            SuperLink(SuperLinkOptions(root / "plain", host="127.0.0.1", port=plain_port)):
        yield {"tls": f"127.0.0.1:{tls_port}", "plain": f"127.0.0.1:{plain_port}"}


def run_client(state: Path, *args: str, h) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedpersona.cli", "client", "--state", str(state),
                           "--max-wait-time", "20", *args], capture_output=True, text=True, timeout=60,
                          env=h.child_env())


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the server's certificate."""
    out = tmp_path_factory.mktemp("stranger") / "tls"
    subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "docker" / "certs.sh"), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


def test_the_client_command_names_the_mismatch(links, stranger: Path, make_device, tmp_path: Path, h) -> None:
    state = make_device(0)
    key = tmp_path / "device_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
    cases = [
        (["--server", links["tls"], "--insecure"], "speaks TLS but this client was started with --insecure"),
        # was "is your key registered?": the certificate is what fails
        (["--server", links["tls"], "--root-certificates", str(stranger / "ca.crt"), "--auth-key", str(key)],
         "is not trusted by --root-certificates"),
    ]
    for args, words in cases:
        done = run_client(state, *args, h=h)
        errors = [line for line in done.stderr.splitlines() if line.startswith("fedpersona: error:")]
        assert done.returncode == 2 and len(errors) == 1 and words in errors[0], (args, done.stderr)
        assert "Traceback" not in done.stderr and "registered" not in done.stderr


def test_every_mismatch_and_every_match(links, certs: Path, stranger: Path) -> None:
    from fedpersona.deploy.tls_probe import tls_problem

    def problem(link: str, insecure: bool = False, ca: Path | None = None) -> str | None:
        host, _, port = links[link].rpartition(":")
        return tls_problem(host, int(port), insecure=insecure, root_certificates=ca)

    assert problem("tls", ca=certs / "ca.crt") is None
    assert problem("plain", insecure=True) is None
    assert "does not speak TLS" in problem("plain", ca=certs / "ca.crt")
    assert "not trusted by --root-certificates" in problem("tls", ca=stranger / "ca.crt")
    assert "not trusted by the system's CAs" in problem("tls")
    assert "not a PEM CA certificate" in problem("tls", ca=certs / "ca.key")
    assert tls_problem("127.0.0.1", 9, insecure=False, root_certificates=certs / "ca.crt") is None  # down: wait for it
