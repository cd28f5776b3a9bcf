"""The bot token kept out of logs.

While the adapter runs, a filter rewrites the token out of every record of python-telegram-bot,
httpx, httpcore and tornado (they log request URLs, and Bot API URLs hold it).
"""

from __future__ import annotations

import logging
import urllib.parse


class TokenRedaction(logging.Filter):
    """Rewrites the bot token out of log records of the libraries that log Bot API URLs."""

    _LOGGERS = ("telegram", "httpx", "httpcore", "tornado", "aiolimiter", "bot")

    def __init__(self, token: str) -> None:
        super().__init__()
        self._secrets = sorted({token, urllib.parse.quote(token, safe="")}, key=len, reverse=True)
        self._installed: list[logging.Logger] = []

    def install(self) -> None:
        for name in self._LOGGERS:
            logging.getLogger(name)  # make sure the parents exist too
        loggers = [
            logger
            for name, logger in list(logging.root.manager.loggerDict.items())
            if isinstance(logger, logging.Logger) and name.split(".")[0] in self._LOGGERS
        ]
        for logger in loggers:
            logger.addFilter(self)
        self._installed = loggers

    def uninstall(self) -> None:
        for logger in self._installed:
            logger.removeFilter(self)
        self._installed = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        # Always freeze the text: some arguments are objects the library changes after logging
        # (getFile's result gains a file URL, which holds the token).
        record.msg, record.args = self._redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
        return True

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<TELEGRAM_TOKEN>")
        return text
