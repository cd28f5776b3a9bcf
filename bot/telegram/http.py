"""python-telegram-bot's HTTP requests, sent through aiohttp instead of httpx.

Why: under load httpx's connection pool (httpcore 1.0) hands one idle connection to every
request queued at that moment; all but one then fail with ConnectionNotAvailable, go back to
the queue and try again (encode/httpcore#1110, #1111). With hundreds of users at once every
Bot API call went round that loop several times, and the bot's replies took seconds (p99 over
10 s in bench/telegram_load.py) while Telegram itself answered in a millisecond. aiohttp's
connector gives each waiting request its own connection, and it is here anyway (discord.py
is built on it).

`AiohttpRequest` implements PTB's `BaseRequest`: PTB still builds every call, retries, parses
the answers and raises its own errors; this class only moves the bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from telegram.error import NetworkError, TimedOut
from telegram.request import BaseRequest, RequestData

_USER_AGENT = "AvatarBooth (python-telegram-bot, aiohttp)"


class AiohttpRequest(BaseRequest):
    """One pool of up to ``pool_size`` connections to the Bot API server.

    Timeouts, in seconds, are the defaults of each call; PTB passes its own per call where it
    has one (long polling adds its poll time to the read timeout, for instance). ``media_write_s``
    replaces ``write_s`` for uploads.
    """

    def __init__(
        self,
        *,
        pool_size: int = 256,
        connect_s: float | None = 5.0,
        read_s: float | None = 5.0,
        write_s: float | None = 5.0,
        pool_s: float | None = 30.0,
        media_write_s: float | None = 20.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be 1 or more, not {pool_size}")
        self._pool_size = pool_size
        self._connect_s = connect_s
        self._read_s = read_s
        self._write_s = write_s
        self._pool_s = pool_s
        self._media_write_s = media_write_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def read_timeout(self) -> float | None:
        return self._read_s

    async def initialize(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=0),
                headers={"User-Agent": _USER_AGENT},
                # No cookies: the Bot API sets none, and a jar would be shared by every call.
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def shutdown(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise RuntimeError("AiohttpRequest is not initialized; PTB initializes it with the bot")
        files = request_data.multipart_data if request_data is not None else {}
        fields = request_data.json_parameters if request_data is not None else {}
        read_s = _timeout_or_default(read_timeout, self._read_s)
        write_s = _timeout_or_default(write_timeout, self._media_write_s if files else self._write_s)
        connect_s = _timeout_or_default(connect_timeout, self._connect_s)
        pool_s = _timeout_or_default(pool_timeout, self._pool_s)
        parts = (pool_s, connect_s, write_s, read_s)
        timeout = aiohttp.ClientTimeout(
            # aiohttp has no write timeout: an upload gets the sum of the four for the whole
            # exchange instead, so a stuck one still ends. Downloads are bounded per read only.
            total=sum(p for p in parts if p is not None) if files and None not in parts else None,
            # `connect` covers waiting for a pooled connection and opening a new one.
            connect=None if pool_s is None or connect_s is None else pool_s + connect_s,
            sock_connect=connect_s,
            sock_read=read_s,
        )
        try:
            async with session.request(
                method, url, data=_request_body(fields, files), timeout=timeout
            ) as response:
                return response.status, await response.read()
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise TimedOut(f"Telegram did not answer in time ({exc.__class__.__name__})") from exc
        except aiohttp.ClientError as exc:
            raise NetworkError(f"aiohttp.{exc.__class__.__name__}: {exc}") from exc


def _timeout_or_default(value: Any, default: float | None) -> float | None:
    """PTB's DEFAULT_NONE means "this request's default"; anything else is the caller's."""
    if isinstance(value, type(BaseRequest.DEFAULT_NONE)):
        return default
    return None if value is None else float(value)


def _request_body(fields: dict[str, str], files: dict[str, Any]) -> aiohttp.FormData | dict[str, str] | None:
    """Plain calls go form-encoded; calls with files go as multipart, parameters included."""
    if not files:
        return fields or None
    form = aiohttp.FormData(quote_fields=False)
    for name, value in fields.items():
        form.add_field(name, value)
    for name, (filename, content, mimetype) in files.items():
        form.add_field(name, content, filename=filename, content_type=mimetype)
    return form
