"""A fake Telegram Bot API server on 127.0.0.1, for driving the real python-telegram-bot client.

It speaks the Bot API's HTTP protocol: ``POST /bot<token>/<method>`` with form-encoded or multipart
parameters, JSON answers ``{"ok": ..., "result": ...}`` or ``{"ok": false, "error_code": ...,
"description": ..., "parameters": {"retry_after": ...}}``, long polling with getUpdates offsets,
and file downloads from ``GET /file/bot<token>/<file_path>``. Every call is recorded, so tests
assert on what the bot sent; tests play the users by queueing updates.

Like the real server it confirms updates only when getUpdates is called with a higher offset,
keeps a message's text through edits, refuses edits that change nothing, refuses getFile above
20 MB, and refuses to open a private chat with a user who never wrote to the bot.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from PIL import Image

TOKEN = "123456789:AAFakeTokenForTestsOnly-do_not_log_me"
DOWNLOAD_LIMIT = 20 * 1024 * 1024
_JSON_PARAMS = {
    "reply_markup",
    "media",
    "reply_parameters",
    "allowed_updates",
    "entities",
    "caption_entities",
    "commands",
    "link_preview_options",
}
_INT_PARAMS = {"chat_id", "message_id", "offset", "limit", "timeout", "max_connections"}


@dataclass
class Call:
    """One request the bot made: its method, decoded parameters, uploaded files, arrival time."""

    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, bytes]]
    at: float
    status: int = 200


@dataclass
class FakeUser:
    id: int
    first_name: str
    started: bool = False  # wrote to the bot privately, so the bot may message them

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "is_bot": False, "first_name": self.first_name}


@dataclass
class _Failure:
    method: str
    status: int
    description: str
    retry_after: int | None
    times: int


@dataclass
class FakeTelegram:
    """The server; use ``async with FakeTelegram() as tg`` and pass ``tg.base_url`` to the bot."""

    token: str = TOKEN
    username: str = "avatarbooth_test_bot"
    calls: list[Call] = field(default_factory=list)
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)  # the bot's, by message id
    deleted: set[int] = field(default_factory=set)
    downloads: list[str] = field(default_factory=list)  # file paths fetched
    delivered: set[int] = field(default_factory=set)  # update ids getUpdates has returned
    poll_timeout_cap_s: float = 1.0  # answer long polls sooner than asked, so tests stop quickly

    def __post_init__(self) -> None:
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._file_ids = itertools.count(1)
        self._files: dict[str, tuple[str, bytes, int]] = {}  # file_id -> (path, data, size)
        self._file_ids_by_path: dict[str, str] = {}
        self._users: dict[int, FakeUser] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._failures: list[_Failure] = []
        self._changed = asyncio.Condition()
        self._by_chat: dict[int, list[int]] = {}  # chat id -> the bot's message ids there
        self._chat_changed: dict[int, asyncio.Condition] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # A backlog as deep as the bot's connection pool: Telegram accepts hundreds of connections
        # at once, and with aiohttp's default (128) the kernel drops the excess SYNs, so the
        # client's retransmits (1 s, 3 s, 7 s, 15 s) would show up as the bot's reply time.
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # --- playing the users ------------------------------------------------------------------------

    def user(self, user_id: int, first_name: str = "Ann") -> FakeUser:
        user = self._users.setdefault(user_id, FakeUser(user_id, first_name))
        self._chats.setdefault(user_id, {"id": user_id, "type": "private", "first_name": first_name})
        return user

    def group(self, chat_id: int, title: str = "Friends") -> dict[str, Any]:
        return self._chats.setdefault(chat_id, {"id": chat_id, "type": "supergroup", "title": title})

    def send_text(self, user: FakeUser, text: str, *, chat_id: int | None = None) -> dict[str, Any]:
        """The user writes ``text``; a leading /command gets its bot_command entity."""
        update = self.text_update(user, text, chat_id=chat_id)
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    def text_update(self, user: FakeUser, text: str, *, chat_id: int | None = None) -> dict[str, Any]:
        """The update for a text message, not queued (to post it to a webhook)."""
        message = self._user_message(user, chat_id)
        message["text"] = text
        if text.startswith("/"):
            length = len(text.split(maxsplit=1)[0])
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        return {"update_id": next(self._update_ids), "message": message}

    def send_photo(
        self,
        user: FakeUser,
        data: bytes,
        *,
        media_group_id: str | None = None,
        chat_id: int | None = None,
    ) -> dict[str, Any]:
        """A compressed photo: Telegram sends several sizes, smallest first (the last is ``data``)."""
        sizes = [
            self._photo_size(content, width, height)
            for content, width, height in _photo_sizes(data)
        ]
        message = self._user_message(user, chat_id)
        message["photo"] = sizes
        if media_group_id:
            message["media_group_id"] = media_group_id
        return self._queue({"message": message})

    def send_document(
        self,
        user: FakeUser,
        data: bytes,
        *,
        file_name: str,
        mime_type: str = "image/jpeg",
        file_size: int | None = None,
        media_group_id: str | None = None,
        chat_id: int | None = None,
    ) -> dict[str, Any]:
        """A file; ``file_size`` may claim more than ``data`` holds (for size-limit tests)."""
        file_id = self._add_file(data, "documents", file_name.rpartition(".")[2] or "bin", file_size)
        message = self._user_message(user, chat_id)
        message["document"] = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": file_size if file_size is not None else len(data),
        }
        if media_group_id:
            message["media_group_id"] = media_group_id
        return self._queue({"message": message})

    def press(self, user: FakeUser, message: dict[str, Any], data: str) -> dict[str, Any]:
        """The user presses an inline button with callback ``data`` under one of the bot's messages."""
        query = {
            "id": f"cq{next(self._update_ids)}",
            "from": user.to_json(),
            "chat_instance": "ci",
            "message": self.messages[message["message_id"]],
            "data": data,
        }
        return self._queue({"callback_query": query})

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        description: str | None = None,
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with an error (429 with retry_after, ...)."""
        if description is None:
            description = f"Too Many Requests: retry after {retry_after}" if status == 429 else "Bad Request"
        self._failures.append(_Failure(method, status, description, retry_after, times))

    # --- what the bot did -------------------------------------------------------------------------

    def calls_of(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods and c.status == 200]

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        """The bot's messages in a chat, oldest first, as they are now (after edits; not deleted)."""
        return [self.messages[i] for i in self._by_chat.get(chat_id, []) if i not in self.deleted]

    def texts_in(self, chat_id: int) -> list[str]:
        return [m.get("text") or m.get("caption") or "" for m in self.sent_to(chat_id)]

    def pending_updates(self) -> int:
        return len(self._updates)

    async def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 20.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request); return its value."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                return await self._changed.wait_for(predicate)
        except TimeoutError:
            last = [(c.method, c.params) for c in self.calls[-8:]]
            raise AssertionError(f"timed out after {timeout} s; the bot's last calls: {last}") from None

    async def wait_text(self, chat_id: int, needle: str, *, timeout: float = 20.0) -> dict[str, Any]:
        """The first of the bot's messages in ``chat_id`` whose text or caption contains ``needle``."""

        def find() -> dict[str, Any] | None:
            for message in self.sent_to(chat_id):
                if needle in (message.get("text") or message.get("caption") or ""):
                    return message
            return None

        changed = self._chat_changed.setdefault(chat_id, asyncio.Condition())
        try:
            async with asyncio.timeout(timeout), changed:
                found: dict[str, Any] = await changed.wait_for(find)
                return found
        except TimeoutError:
            texts = [m.get("text") or m.get("caption") for m in self.sent_to(chat_id)]
            raise AssertionError(f"timed out after {timeout} s waiting for {needle!r} in chat "
                                 f"{chat_id}; it has {texts}") from None

    # --- the HTTP side ----------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params, files = await _read_params(request)
        call = Call(method, params, files, time.monotonic())
        self.calls.append(call)
        failure = self._take_failure(method)
        if failure is not None:
            call.status = failure.status
            response = _error(failure.status, failure.description, failure.retry_after)
        else:
            handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                call.status = 404
                response = _error(404, "Not Found: method not found")
            else:
                try:
                    response = _ok(await handler(params, files))
                except _ApiError as exc:
                    call.status = exc.status
                    response = _error(exc.status, exc.description)
        async with self._changed:
            self._changed.notify_all()
        chat_id = params.get("chat_id")
        if isinstance(chat_id, int) and chat_id in self._chat_changed:
            async with self._chat_changed[chat_id]:
                self._chat_changed[chat_id].notify_all()
        return response

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        file_id = self._file_ids_by_path.get(path)
        if file_id is None:
            return web.Response(status=404)
        self.downloads.append(path)
        return web.Response(body=self._files[file_id][1])

    def _take_failure(self, method: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.times > 0:
                failure.times -= 1
                return failure
        return None

    # --- Bot API methods --------------------------------------------------------------------------

    async def _m_getMe(self, params: dict[str, Any], files: Any) -> Any:
        return {"id": 42, "is_bot": True, "first_name": "AvatarBooth", "username": self.username}

    async def _m_deleteWebhook(self, params: dict[str, Any], files: Any) -> Any:
        return True

    async def _m_setWebhook(self, params: dict[str, Any], files: Any) -> Any:
        return True

    async def _m_setMyCommands(self, params: dict[str, Any], files: Any) -> Any:
        return True

    async def _m_getUpdates(self, params: dict[str, Any], files: Any) -> Any:
        offset = params.get("offset")
        if offset is not None:  # confirms every update below the offset
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        limit = params.get("limit") or 100
        deadline = time.monotonic() + min(float(params.get("timeout") or 0), self.poll_timeout_cap_s)
        while not self._updates and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(deadline - time.monotonic()), self._changed:
                    await self._changed.wait()
            except TimeoutError:
                break
        answer = self._updates[:limit]
        self.delivered.update(u["update_id"] for u in answer)
        return answer

    async def _m_sendMessage(self, params: dict[str, Any], files: Any) -> Any:
        return self._new_message(params, {"text": params["text"]})

    async def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> Any:
        _, data = files["photo"]
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        extra: dict[str, Any] = {"photo": [self._photo_size(data, width, height)]}
        if params.get("caption"):
            extra["caption"] = params["caption"]
        return self._new_message(params, extra)

    async def _m_sendMediaGroup(self, params: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> Any:
        """An album: 2 to 10 photos uploaded as ``attach://<name>`` parts; one message each, sharing
        a ``media_group_id``. Albums carry no buttons (the Bot API has no reply_markup here)."""
        media = params.get("media")
        if not isinstance(media, list) or not 2 <= len(media) <= 10:
            raise _ApiError(400, "Bad Request: wrong number of media in the album (2 to 10)")
        if "reply_markup" in params:
            raise _ApiError(400, "Bad Request: albums take no reply_markup")
        group = f"G{next(self._message_ids)}"
        sent = []
        for item in media:
            reference = str(item.get("media", ""))
            if item.get("type") != "photo" or not reference.startswith("attach://"):
                raise _ApiError(400, "Bad Request: an album item must be an uploaded photo")
            _, data = files[reference.removeprefix("attach://")]
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            extra: dict[str, Any] = {"photo": [self._photo_size(data, width, height)], "media_group_id": group}
            if item.get("caption"):
                extra["caption"] = item["caption"]
            sent.append(self._new_message(params, extra))
        return sent

    async def _m_sendDocument(self, params: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> Any:
        name, data = files["document"]
        file_id = self._add_file(data, "documents", name.rpartition(".")[2] or "bin", None)
        extra: dict[str, Any] = {
            "document": {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": name,
                         "file_size": len(data)},
        }
        if params.get("caption"):
            extra["caption"] = params["caption"]
        return self._new_message(params, extra)

    async def _m_editMessageText(self, params: dict[str, Any], files: Any) -> Any:
        message = self._bot_message(params)
        markup = params.get("reply_markup")
        if message.get("text") == params["text"] and message.get("reply_markup") == markup:
            raise _ApiError(400, "Bad Request: message is not modified: specified new message content "
                                 "and reply markup are exactly the same as a current content and reply "
                                 "markup of the message")
        message["text"] = params["text"]
        _set_markup(message, markup)
        message["edit_date"] = int(time.time())
        return message

    async def _m_editMessageReplyMarkup(self, params: dict[str, Any], files: Any) -> Any:
        message = self._bot_message(params)
        _set_markup(message, params.get("reply_markup"))
        return message

    async def _m_deleteMessage(self, params: dict[str, Any], files: Any) -> Any:
        message = self._bot_message(params)
        self.deleted.add(message["message_id"])
        return True

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: Any) -> Any:
        return True

    async def _m_getFile(self, params: dict[str, Any], files: Any) -> Any:
        stored = self._files.get(params["file_id"])
        if stored is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        path, _, size = stored
        if size > DOWNLOAD_LIMIT:
            raise _ApiError(400, "Bad Request: file is too big")
        return {"file_id": params["file_id"], "file_unique_id": f"u{params['file_id']}",
                "file_size": size, "file_path": path}

    # --- helpers ----------------------------------------------------------------------------------

    def _queue(self, body: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), **body}
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _user_message(self, user: FakeUser, chat_id: int | None) -> dict[str, Any]:
        chat = self._chats[chat_id if chat_id is not None else user.id]
        if chat["type"] == "private":
            user.started = True
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": user.to_json(),
        }

    def _new_message(self, params: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        chat = self._chats.get(params["chat_id"])
        if chat is None:
            raise _ApiError(400, "Bad Request: chat not found")
        user = self._users.get(chat["id"])
        if chat["type"] == "private" and user is not None and not user.started:
            raise _ApiError(403, "Forbidden: bot can't initiate conversation with a user")
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": 42, "is_bot": True, "first_name": "AvatarBooth", "username": self.username},
            **extra,
        }
        reply = params.get("reply_parameters")
        if reply:
            message["reply_to_message_id"] = reply["message_id"]  # kept for tests; not Bot API shape
        _set_markup(message, params.get("reply_markup"))
        self.messages[message["message_id"]] = message
        self._by_chat.setdefault(chat["id"], []).append(message["message_id"])
        return {k: v for k, v in message.items() if k != "reply_to_message_id"}

    def _bot_message(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self.messages.get(params.get("message_id", -1))
        if message is None or message["message_id"] in self.deleted:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if message["chat"]["id"] != params.get("chat_id"):
            raise _ApiError(400, "Bad Request: message to edit not found")
        return message

    def _photo_size(self, data: bytes, width: int, height: int) -> dict[str, Any]:
        file_id = self._add_file(data, "photos", "jpg", None)
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "width": width,
                "height": height, "file_size": len(data)}

    def _add_file(self, data: bytes, folder: str, suffix: str, size: int | None) -> str:
        number = next(self._file_ids)
        file_id = f"F{number:04d}"
        stored_size = size if size is not None else len(data)
        path = f"{folder}/file_{number}.{suffix}"
        self._files[file_id] = (path, data, stored_size)
        self._file_ids_by_path[path] = file_id
        return file_id

    def file_id_of_path(self, path: str) -> str:
        return self._file_ids_by_path[path]


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status, self.description = status, description


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    params: dict[str, Any] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if request.method == "POST" and request.can_read_body:
        if (request.content_type or "").startswith("application/json"):
            params = dict(await request.json())
            return params, files
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files[name] = (value.filename, value.file.read())
            else:
                params[name] = _decode(name, str(value))
    for name, value in request.query.items():
        params.setdefault(name, _decode(name, value))
    return params, files


def _decode(name: str, value: str) -> Any:
    if name in _JSON_PARAMS:
        return json.loads(value)
    if name in _INT_PARAMS:
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _set_markup(message: dict[str, Any], markup: Any) -> None:
    if markup and markup.get("inline_keyboard"):
        message["reply_markup"] = markup
    else:
        message.pop("reply_markup", None)


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)


@functools.lru_cache(maxsize=64)
def _photo_sizes(data: bytes) -> tuple[tuple[bytes, int, int], ...]:
    """The sizes Telegram makes of a photo: thumbnails of 90 and 320 px, then the photo itself.
    Cached: Telegram does this on its own machines, and a load test sending the same photos for
    hundreds of users must not spend the bot's time on it."""
    sizes = []
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        for side in (90, 320):
            if max(width, height) <= side:
                continue
            small = image.copy()
            small.thumbnail((side, side))
            out = io.BytesIO()
            small.convert("RGB").save(out, format="JPEG", quality=80)
            sizes.append((out.getvalue(), *small.size))
    sizes.append((data, width, height))
    return tuple(sizes)
