"""The Flower SuperLink as a child of ``fedpersona server``: TLS on, state on disk, nothing installed.

In flwr 1.41 one HTTP(S) port (``--host``/``--port``) serves the Fleet API (SuperNodes), the Control
API (``flwr run``/``log``/``list``) and the Runtime API (the ServerApp). The flags chosen here:

- TLS by default: ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` from a folder holding
  ``ca.crt``, ``server.pem``, ``server.key`` (``docker/certs.sh`` makes them); ``--insecure`` only
  when asked for.
- ``--database STATE/superlink.db``: runs, nodes and registered keys survive a restart.
- ``--disable-runtime-dependency-installation``: by default a 1.41 SuperLink runs ``uv sync`` for
  each app; a server without network access cannot, and our app needs nothing beyond this install.
- ``--enable-supernode-auth``: only SuperNodes whose public key was registered (``flwr supernode
  register``, done by ``fedpersona server --auth-key``) may connect.
- ``FLWR_HOME=STATE/flwr``: Flower's own files (installed app bundles) stay in the state folder.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedpersona.errors import UsageError
from fedpersona.deploy.processes import child_env, executable, spawn, stop, wait_for_port

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "server.pem", "server.key"
DATABASE_FILE = "superlink.db"


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: Path) -> TLSFiles:
        """The three files of ``--certificates DIR``; a missing one is a UsageError naming it."""
        if not directory.is_dir():
            raise UsageError(f"--certificates {directory}: not a folder; it must hold {CA_FILE}, {CERT_FILE} and "
                             f"{KEY_FILE} (make them with docker/certs.sh)")
        files = cls(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise UsageError(f"--certificates {directory}: missing {', '.join(missing)}; it must hold {CA_FILE}, "
                             f"{CERT_FILE} and {KEY_FILE} (make them with docker/certs.sh)")
        return files


@dataclass(frozen=True)
class SuperLinkOptions:
    state: Path
    host: str = "0.0.0.0"
    port: int = 9092
    tls: TLSFiles | None = None  # None: --insecure (must have been asked for)
    enable_supernode_auth: bool = False
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink (the TLS certificate must name 127.0.0.1 then)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def database(self) -> Path:
        return self.state / DATABASE_FILE

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr"

    @property
    def log_path(self) -> Path:
        return self.state / "logs" / "superlink.log"


def superlink_command(options: SuperLinkOptions) -> list[str]:
    command = [executable("flower-superlink"), "--database", str(options.database.resolve()),
               "--disable-runtime-dependency-installation", "--host", options.host, "--port", str(options.port)]
    if options.tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(options.tls.ca.resolve()), "--ssl-certfile",
                    str(options.tls.cert.resolve()), "--ssl-keyfile", str(options.tls.key.resolve())]
    if options.enable_supernode_auth:
        command.append("--enable-supernode-auth")
    return command + list(options.extra_args)


class SuperLink:
    """``with SuperLink(options) as link:`` starts it, waits until it listens, and stops it after."""

    def __init__(self, options: SuperLinkOptions, *, echo: bool = False) -> None:
        self.options = options
        self.echo = echo  # Flower's output to our stderr instead of the log file
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 120.0) -> SuperLink:
        options = self.options
        options.state.mkdir(parents=True, exist_ok=True)
        options.flwr_home.mkdir(parents=True, exist_ok=True)
        options.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = None if self.echo else options.log_path.open("ab")
        self.process = spawn(superlink_command(options), log=self._log,
                             env=child_env({"FLWR_HOME": str(options.flwr_home.resolve())}))
        host, _, port = options.local_address.rpartition(":")
        try:
            wait_for_port(host.strip("[]"), int(port), timeout=timeout, process=self.process,
                          what=f"flower-superlink (log: {options.log_path})")
        except RuntimeError as err:
            self.stop()
            if "exited" in str(err) and self._tail():
                raise RuntimeError(f"{err}\n{self._tail()}") from None
            raise
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.options.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop(self.process)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
