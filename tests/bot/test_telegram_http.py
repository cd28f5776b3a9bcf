"""AiohttpRequest: python-telegram-bot's calls over aiohttp, against a real HTTP server on 127.0.0.1.

The whole Telegram journey runs over it too (tests/bot/test_telegram.py); these pin down what a
transport must get right on its own: uploads, PTB's error mapping, timeouts and the pool size.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from telegram import Bot, InputFile
from telegram.error import BadRequest, NetworkError, TimedOut

from bot.telegram.http import AiohttpRequest

TOKEN = "123:transport"


class Server:
    """A Bot API stand-in that records each request and its connection."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.delay_s = 0.0
        self.peers: set[tuple[str, int]] = set()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if request.transport is not None:
                self.peers.add(request.transport.get_extra_info("peername"))
            fields: dict[str, Any] = {}
            if request.content_type == "multipart/form-data":
                async for part in await request.multipart():
                    data = await part.read()  # type: ignore[union-attr]
                    fields[part.name or ""] = (part.filename, part.headers.get("Content-Type"), data)  # type: ignore[union-attr]
            else:
                fields = dict(await request.post())
            method = request.match_info["method"]
            self.requests.append({"method": method, "fields": fields})
            await asyncio.sleep(self.delay_s)
            if method == "sendMessage" and fields.get("text") == "bad":
                return web.json_response({"ok": False, "error_code": 400, "description": "Bad Request: message text is empty"}, status=400)
            if method == "getMe":
                result: Any = {"id": 1, "is_bot": True, "first_name": "B", "username": "b_bot"}
            elif method == "sendDocument":
                result = {"message_id": 5, "date": 0, "chat": {"id": 7, "type": "private"},
                          "document": {"file_id": "d", "file_unique_id": "du"}}
            else:
                result = {"message_id": len(self.requests), "date": 0, "chat": {"id": 7, "type": "private"}, "text": fields.get("text", "")}
            return web.json_response({"ok": True, "result": result})
        finally:
            self.in_flight -= 1


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    app = web.Application()
    app.router.add_post("/bot{token}/{method}", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/bot"
    try:
        yield state
    finally:
        await runner.cleanup()


def bot(url: str, request: AiohttpRequest) -> Bot:
    return Bot(TOKEN, base_url=url, request=request, get_updates_request=AiohttpRequest(pool_size=1))


async def test_plain_calls_and_uploads_reach_the_server_whole(server: Server) -> None:
    async with bot(server.url, AiohttpRequest()) as b:
        message = await b.send_message(7, "héllo & more")
        await b.send_document(7, InputFile(b"\x89PNG-bytes", filename="face.png"), caption="yours")
    assert message.text == "héllo & more"
    sent, uploaded = server.requests[-2:]
    assert sent["fields"]["text"] == "héllo & more"
    filename, content_type, data = uploaded["fields"]["document"]
    assert (filename, data) == ("face.png", b"\x89PNG-bytes")
    assert content_type == "image/png"
    filename, _, data = uploaded["fields"]["caption"]
    assert (filename, bytes(data)) == (None, b"yours")  # the other parameters travel beside the file


async def test_telegram_errors_keep_their_meaning(server: Server) -> None:
    async with bot(server.url, AiohttpRequest()) as b:
        with pytest.raises(BadRequest, match="(?i)message text is empty"):
            await b.send_message(7, "bad")


async def test_a_server_that_does_not_answer_in_time_is_timed_out(server: Server) -> None:
    async with bot(server.url, AiohttpRequest(read_s=0.2)) as b:
        server.delay_s = 1.0
        with pytest.raises(TimedOut):
            await b.send_message(7, "slow")


async def test_an_unreachable_server_is_a_network_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    request = AiohttpRequest(connect_s=1.0)
    await request.initialize()
    try:
        with pytest.raises(NetworkError):
            await request.post(f"http://127.0.0.1:{port}/bot{TOKEN}/getMe")
    finally:
        await request.shutdown()


async def test_concurrent_calls_each_get_a_connection_up_to_the_pool_size(server: Server) -> None:
    server.delay_s = 0.05
    async with bot(server.url, AiohttpRequest(pool_size=4)) as b:
        server.peers.clear()
        messages = await asyncio.gather(*(b.send_message(7, f"m{n}") for n in range(40)))
    assert sorted(m.text for m in messages) == sorted(f"m{n}" for n in range(40))
    assert server.most_in_flight == 4  # in parallel, as many as the pool allows
    assert len(server.peers) == 4  # and the connections were reused, not opened per call


def test_the_pool_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        AiohttpRequest(pool_size=0)
