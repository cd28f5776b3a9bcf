"""The ``[telegram]`` section of config.toml, light enough for the config to import.

It imports no chat library: reading the config must not load python-telegram-bot.
"""

from __future__ import annotations

from dataclasses import dataclass

TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024
"""The official Bot API server serves files up to 20 MB to bots; a self-hosted one has no limit."""


@dataclass(frozen=True)
class TelegramSettings:
    """The ``[telegram]`` section of config.toml. The token is not here: only TELEGRAM_TOKEN has it.

    ``base_url``/``base_file_url`` point the bot at a self-hosted Bot API server, e.g.
    ``http://127.0.0.1:8081/bot`` and ``http://127.0.0.1:8081/file/bot`` (the token is appended);
    such a server also lifts the 20 MB download limit. ``allowed_chats`` empty: every private
    chat and no group; otherwise exactly the chats listed (private chat id = user id; groups are
    negative). ``webhook_url`` set: Telegram posts updates to it (HTTPS), and the bot listens on
    ``webhook_listen:webhook_port/webhook_path`` behind the proxy that terminates TLS.
    """

    enabled: bool = False
    base_url: str | None = None
    base_file_url: str | None = None
    local_mode: bool = False  # the self-hosted server runs with --local (files by local path)
    allowed_chats: tuple[int, ...] = ()
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    webhook_path: str = "telegram"
    max_download_bytes: int | None = None  # None: 20 MB on Telegram's server, none on your own
    album_wait_s: float = 1.0
    progress_interval_s: float = 3.0
    poll_timeout_s: int = 30
    messages_per_second: float = 30.0  # Telegram's limit for one bot; 429s are waited out as well
    max_retries: int = 5  # retries of one request after a 429 (each after its retry_after)
    connection_pool_size: int = 256
    shutdown_grace_s: float = 10.0  # on stop, how long to let running commands finish

    def __post_init__(self) -> None:
        if (self.base_url is None) != (self.base_file_url is None):
            raise ValueError(
                "telegram: set both base_url and base_file_url for a self-hosted Bot API server "
                "(e.g. http://127.0.0.1:8081/bot and http://127.0.0.1:8081/file/bot), or neither"
            )
        if self.webhook_url is not None and not self.webhook_url.startswith("https://"):
            raise ValueError(f"telegram: webhook_url must be an https:// URL, not {self.webhook_url!r}")
        if not 0 < self.webhook_port < 65536:
            raise ValueError(f"telegram: webhook_port must be 1-65535, not {self.webhook_port}")
        numbers = {
            "album_wait_s": self.album_wait_s,
            "progress_interval_s": self.progress_interval_s,
            "shutdown_grace_s": self.shutdown_grace_s,
            "max_retries": self.max_retries,
        }
        for name, value in numbers.items():
            if value < 0:
                raise ValueError(f"telegram: {name} must not be negative, not {value}")
        if self.poll_timeout_s < 0 or self.connection_pool_size < 1 or self.messages_per_second <= 0:
            raise ValueError(
                "telegram: poll_timeout_s must be >= 0, connection_pool_size >= 1 and "
                "messages_per_second > 0"
            )

    @property
    def download_limit(self) -> int | None:
        """The largest file the Bot API server lets the bot fetch; None when it has no limit."""
        if self.max_download_bytes is not None:
            return self.max_download_bytes
        return TELEGRAM_DOWNLOAD_LIMIT if self.base_url is None else None
