"""A recording fake of Discord for the real discord.py client: REST API, gateway and CDN.

One aiohttp server on 127.0.0.1 speaks HTTPS (a throw-away self-signed certificate for Discord's
host names) and the gateway's websocket protocol (HELLO, IDENTIFY, READY, heartbeats, zlib-stream
frames). The bot under test gets `FakeDiscord.connector()`, an aiohttp connector whose resolver sends
discord.com, gateway.discord.gg and the CDN hosts to this server and which trusts its certificate;
nothing else about discord.py is changed, so the bot uses its real URLs, routes, rate-limit handling,
multipart encoding and gateway code.

The fake keeps what Discord would: messages (with attachments served back from the CDN), each
interaction's original response, and the rules the adapter must respect: an interaction must be
acknowledged within 3 s and only once; its token works for 15 minutes; the first follow-up after a
deferred response edits the "thinking" message. Every request is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

API = "/api/v10"
HOSTS = ("discord.com", "gateway.discord.gg", "cdn.discordapp.com", "media.discordapp.net")
DISCORD_EPOCH_MS = 1420070400000
ACK_DEADLINE_S = 3.0
TOKEN_LIFETIME_S = 15 * 60.0
LOADING = 1 << 7  # message flag of a deferred "is thinking..." response
EPHEMERAL = 1 << 6

Json = dict[str, Any]


def snowflake(at: float | None = None, *, counter: itertools.count[int] = itertools.count()) -> int:
    """A Discord id whose timestamp is `at` (Unix seconds, default now); unique in this process."""
    ms = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
    return (ms << 22) | (next(counter) % (1 << 22))


def created_at(snowflake_id: int) -> float:
    return ((snowflake_id >> 22) + DISCORD_EPOCH_MS) / 1000.0


def _iso(at: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if at is None else at, timezone.utc).isoformat()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and key) for Discord's host names, made with the openssl CLI."""
    cert, key = folder / "discord-cert.pem", folder / "discord-key.pem"
    names = ",".join(f"DNS:{host}" for host in HOSTS)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=discord.com", "-addext", f"subjectAltName={names}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class Recorded:
    """One HTTP request the client made."""

    method: str
    path: str  # without the /api/v10 prefix for API routes
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None  # the JSON body, or the payload_json part of a multipart body
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (filename, data)
    at: float = field(default_factory=time.monotonic)
    status: int = 200


@dataclass
class _Interaction:
    payload: Json
    dispatched_at: float  # monotonic
    acknowledged: bool = False
    acknowledged_at: float | None = None
    original_id: int | None = None


class _Resolver(AbstractResolver):
    """Resolves Discord's host names to the fake server; refuses every other name."""

    def __init__(self, port: int) -> None:
        self._port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in HOSTS:
            raise OSError(f"the fake Discord does not serve {host!r}")
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": self._port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class _GatewaySocket:
    """One gateway connection, encoding frames as the client asked (zlib-stream or plain JSON)."""

    def __init__(self, ws: web.WebSocketResponse, zlib_stream: bool) -> None:
        self.ws = ws
        self._compressor = zlib.compressobj() if zlib_stream else None
        self._sequence = 0

    async def send(self, op: int, data: Any, event: str | None = None) -> None:
        sequence = None
        if op == 0:
            self._sequence += 1
            sequence = self._sequence
        raw = json.dumps({"op": op, "d": data, "s": sequence, "t": event})
        if self._compressor is None:
            await self.ws.send_str(raw)
        else:
            frame = self._compressor.compress(raw.encode()) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
            await self.ws.send_bytes(frame)


class FakeDiscord:
    """Discord for one test: start it, give the bot `connector()`, dispatch events, read `requests`."""

    def __init__(self, cert_dir: Path, *, token: str) -> None:
        self.token = token
        self.application_id = snowflake()
        self.bot_user: Json = _user(snowflake(), "AvatarBooth", bot=True)
        self.requests: list[Recorded] = []
        self.messages: dict[int, Json] = {}
        self.commands: dict[str | None, list[Json]] = {}  # guild id (None: global) -> commands
        self.identified: list[Json] = []  # IDENTIFY payloads, token removed
        self.unknown: list[Recorded] = []
        self._cert, self._key = make_certificate(cert_dir)
        self._cdn: dict[str, bytes] = {}
        self._interactions: dict[int, _Interaction] = {}
        self._by_token: dict[str, int] = {}
        self._rate_limit_next: dict[str, int] = {}
        self._gateway: _GatewaySocket | None = None
        self._gateway_ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(self._cert, self._key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._gateway is not None:
            await self._gateway.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def connector(self) -> aiohttp.TCPConnector:
        """A connector for one bot (the bot's HTTP client closes it): Discord's names, our server."""
        client_tls = ssl.create_default_context(cafile=str(self._cert))
        return aiohttp.TCPConnector(resolver=_Resolver(self.port), ssl=client_tls, limit=0)

    # --- what tests do --------------------------------------------------------------------------

    async def wait_connected(self, timeout: float = 20.0) -> None:
        """Until a bot has identified on the gateway and received READY."""
        await asyncio.wait_for(self._gateway_ready.wait(), timeout)

    async def dispatch(self, event: str, data: Json) -> None:
        """Send a gateway DISPATCH to the connected bot (INTERACTION_CREATE, MESSAGE_CREATE, ...)."""
        if self._gateway is None:
            raise AssertionError("no bot is connected to the fake gateway")
        if event == "INTERACTION_CREATE":
            self._interactions[int(data["id"])] = _Interaction(data, time.monotonic())
            self._by_token[data["token"]] = int(data["id"])
        if event == "MESSAGE_CREATE":
            self.messages[int(data["id"])] = data
        await self._gateway.send(0, data, event)

    async def wait_for(
        self, predicate: Callable[[Recorded], bool], *, timeout: float = 30.0, after: int = 0
    ) -> Recorded:
        """The first successful request (from index `after`) that satisfies `predicate`."""

        def find() -> Recorded | None:
            return next((r for r in self.requests[after:] if r.status < 300 and predicate(r)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(find), timeout)
        found = find()
        assert found is not None
        return found

    def rate_limit_next(self, method: str, path_pattern: str, times: int = 1) -> None:
        """Answer the next `times` matching requests with 429 (as Discord does, with a Via header)."""
        self._rate_limit_next[f"{method} {path_pattern}"] = times

    def interaction(self, interaction_id: int) -> _Interaction:
        return self._interactions[interaction_id]

    def original_response(self, interaction_id: int) -> Json:
        original = self._interactions[interaction_id].original_id
        assert original is not None, "the interaction has no response message"
        return self.messages[original]

    def attachment(self, channel_id: int, filename: str, data: bytes, content_type: str) -> Json:
        """An attachment as a user uploaded it: its payload, with the bytes on the CDN."""
        attachment_id = snowflake()
        path = f"/attachments/{channel_id}/{attachment_id}/{filename}"
        self._cdn[path] = data
        return {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data),
            "url": f"https://cdn.discordapp.com{path}",
            "proxy_url": f"https://media.discordapp.net{path}",
            "content_type": content_type,
        }

    def cdn_file(self, url: str) -> bytes:
        return self._cdn[url.split("discordapp.com", 1)[-1].split("discordapp.net", 1)[-1]]

    # --- HTTP -----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.host.split(":")[0] == "gateway.discord.gg":
            return await self._gateway_connection(request)
        path = request.path
        api = path.startswith(API)
        record = Recorded(
            request.method,
            path[len(API):] if api else path,
            dict(request.query),
            dict(request.headers),
        )
        record.json, record.files = await _body(request)
        limited = self._take_rate_limit(record)
        if limited is not None:
            response = limited
        elif api:
            response = self._api(record)
        elif request.method == "GET" and path in self._cdn:
            response = web.Response(body=self._cdn[path], content_type="application/octet-stream")
        else:
            response = _error(404, 0, "404: Not Found")
        record.status = response.status
        if response.status == 404 and not api:
            self.unknown.append(record)
        async with self._changed:
            self.requests.append(record)
            self._changed.notify_all()
        return response

    def _take_rate_limit(self, record: Recorded) -> web.Response | None:
        for key, left in self._rate_limit_next.items():
            method, pattern = key.split(" ", 1)
            if left and method == record.method and re.fullmatch(pattern, record.path):
                self._rate_limit_next[key] = left - 1
                body = {"message": "You are being rate limited.", "retry_after": 0.05, "global": False}
                headers = {"Via": "1.1 google", "Retry-After": "1", "X-RateLimit-Scope": "user"}
                return _json(body, status=429, headers=headers)
        return None

    def _api(self, record: Recorded) -> web.Response:
        for method, pattern, handler, authorised in self._routes():
            match = re.fullmatch(pattern, record.path)
            if match and method == record.method:
                if authorised and record.headers.get("Authorization") != f"Bot {self.token}":
                    return _error(401, 0, "401: Unauthorized")
                return handler(record, **match.groupdict())
        self.unknown.append(record)
        return _error(404, 0, "404: Not Found")

    def _routes(self) -> list[tuple[str, str, Callable[..., web.Response], bool]]:
        return [
            ("GET", r"/users/@me", self._get_me, True),
            ("GET", r"/oauth2/applications/@me", self._get_application, True),
            ("PUT", r"/applications/(?P<app>\d+)/commands", self._put_commands, True),
            ("PUT", r"/applications/(?P<app>\d+)/guilds/(?P<guild>\d+)/commands",
             self._put_commands, True),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", self._callback, False),
            ("PATCH", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<mid>@original|\d+)",
             self._edit_webhook_message, False),
            ("GET", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/(?P<mid>@original|\d+)",
             self._get_webhook_message, False),
            ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", self._followup, False),
            ("POST", r"/channels/(?P<cid>\d+)/messages", self._create_message, True),
            ("PATCH", r"/channels/(?P<cid>\d+)/messages/(?P<mid>\d+)", self._edit_message, True),
            ("POST", r"/users/@me/channels", self._open_dm, True),
        ]

    def _get_me(self, record: Recorded) -> web.Response:
        return _json(self.bot_user)

    def _get_application(self, record: Recorded) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": "AvatarBooth",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": _user(snowflake(), "owner"),
                "bot": self.bot_user,
            }
        )

    def _put_commands(self, record: Recorded, app: str, guild: str | None = None) -> web.Response:
        if int(app) != self.application_id:
            return _error(403, 50001, "Missing Access")
        commands = []
        for command in record.json or []:
            commands.append(
                {
                    **command,
                    "id": str(snowflake()),
                    "application_id": app,
                    "version": str(snowflake()),
                    **({"guild_id": guild} if guild else {}),
                }
            )
        self.commands[guild] = commands
        return _json(commands)

    # --- interactions ---------------------------------------------------------------------------

    def _live_interaction(self, token: str) -> _Interaction | web.Response:
        interaction_id = self._by_token.get(token)
        if interaction_id is None:
            return _error(404, 10015, "Unknown Webhook")
        if time.time() - created_at(interaction_id) > TOKEN_LIFETIME_S:
            return _error(401, 50027, "Invalid Webhook Token")
        return self._interactions[interaction_id]

    def _callback(self, record: Recorded, iid: str, token: str) -> web.Response:
        interaction = self._interactions.get(int(iid))
        if interaction is None or interaction.payload["token"] != token:
            return _error(404, 10062, "Unknown interaction")
        if time.monotonic() - interaction.dispatched_at > ACK_DEADLINE_S:
            return _error(404, 10062, "Unknown interaction")
        if interaction.acknowledged:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        interaction.acknowledged, interaction.acknowledged_at = True, record.at
        body = record.json or {}
        kind, data = int(body["type"]), body.get("data") or {}
        channel_id = int(interaction.payload["channel"]["id"])
        message: Json | None = None
        if kind == 4:  # CHANNEL_MESSAGE_WITH_SOURCE
            message = self._new_message(channel_id, data, record.files, interaction=interaction)
        elif kind == 5:  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
            flags = int(data.get("flags", 0)) | LOADING
            message = self._new_message(channel_id, {"flags": flags}, [], interaction=interaction)
        elif kind in (6, 7):  # DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE (of the component's message)
            message = self.messages[int(interaction.payload["message"]["id"])]
            if kind == 7:
                self._apply(message, data, record.files)
        else:
            return _error(400, 50035, f"Invalid Form Body: unsupported response type {kind}")
        interaction.original_id = int(message["id"])
        result: Json = {
            "interaction": {
                "id": iid,
                "type": interaction.payload["type"],
                "response_message_id": message["id"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(int(message.get("flags", 0)) & EPHEMERAL),
            }
        }
        if kind != 6:
            result["resource"] = {"type": kind, "message": message}
        return _json(result)

    def _edit_webhook_message(self, record: Recorded, app: str, token: str, mid: str) -> web.Response:
        interaction = self._live_interaction(token)
        if isinstance(interaction, web.Response):
            return interaction
        message_id = interaction.original_id if mid == "@original" else int(mid)
        if message_id is None or message_id not in self.messages:
            return _error(404, 10008, "Unknown Message")
        message = self.messages[message_id]
        self._apply(message, record.json or {}, record.files)
        message["flags"] = int(message.get("flags", 0)) & ~LOADING
        return _json(message)

    def _get_webhook_message(self, record: Recorded, app: str, token: str, mid: str) -> web.Response:
        interaction = self._live_interaction(token)
        if isinstance(interaction, web.Response):
            return interaction
        message_id = interaction.original_id if mid == "@original" else int(mid)
        if message_id is None or message_id not in self.messages:
            return _error(404, 10008, "Unknown Message")
        return _json(self.messages[message_id])

    def _followup(self, record: Recorded, app: str, token: str) -> web.Response:
        interaction = self._live_interaction(token)
        if isinstance(interaction, web.Response):
            return interaction
        if not interaction.acknowledged:
            return _error(400, 40060, "The interaction has not been acknowledged.")
        original = self.messages.get(interaction.original_id or 0)
        if original is not None and int(original.get("flags", 0)) & LOADING:
            # Discord: the first follow-up after a deferred response edits the "thinking" message.
            self._apply(original, record.json or {}, record.files)
            original["flags"] = int(original.get("flags", 0)) & ~LOADING
            return _json(original)
        channel_id = int(interaction.payload["channel"]["id"])
        return _json(self._new_message(channel_id, record.json or {}, record.files))

    # --- channels -------------------------------------------------------------------------------

    def _create_message(self, record: Recorded, cid: str) -> web.Response:
        return _json(self._new_message(int(cid), record.json or {}, record.files))

    def _edit_message(self, record: Recorded, cid: str, mid: str) -> web.Response:
        message = self.messages.get(int(mid))
        if message is None or message["channel_id"] != cid:
            return _error(404, 10008, "Unknown Message")
        if message["author"]["id"] != self.bot_user["id"]:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        self._apply(message, record.json or {}, record.files)
        return _json(message)

    def _open_dm(self, record: Recorded) -> web.Response:
        recipient = str((record.json or {}).get("recipient_id"))
        return _json(
            {
                "id": str(_dm_channel_id(int(recipient))),
                "type": 1,
                "last_message_id": None,
                "recipients": [_user(int(recipient), f"user{recipient[-4:]}")],
            }
        )

    # --- messages -------------------------------------------------------------------------------

    def _new_message(
        self,
        channel_id: int,
        data: Json,
        files: list[tuple[str, bytes]],
        *,
        interaction: _Interaction | None = None,
    ) -> Json:
        message_id = snowflake()
        message: Json = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": self.bot_user,
            "content": "",
            "timestamp": _iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 20 if interaction is not None else 0,
            "flags": int(data.get("flags", 0)),
            "components": [],
        }
        if interaction is not None and "guild_id" in interaction.payload:
            message["guild_id"] = interaction.payload["guild_id"]
        self._apply(message, data, files)
        message["edited_timestamp"] = None
        self.messages[message_id] = message
        return message

    def _apply(self, message: Json, data: Json, files: list[tuple[str, bytes]]) -> None:
        """Apply a create/edit payload the way Discord does (absent fields are left alone)."""
        if "content" in data:
            message["content"] = data["content"] or ""
        if "components" in data:
            message["components"] = data["components"] or []
        if "embeds" in data:
            message["embeds"] = data["embeds"] or []
        if "flags" in data and data["flags"] is not None:
            kept = int(message.get("flags", 0)) & (EPHEMERAL | LOADING)
            message["flags"] = kept | int(data["flags"])
        if "attachments" in data or files:
            message["attachments"] = self._attachments(message, data.get("attachments"), files)
        if "content" in data:
            message["mentions"] = [
                _user(int(uid), f"user{uid[-4:]}")
                for uid in re.findall(r"<@!?(\d+)>", message["content"])
                if _mention_allowed(uid, data.get("allowed_mentions"))
            ]
        message["edited_timestamp"] = _iso()

    def _attachments(
        self, message: Json, listed: list[Json] | None, files: list[tuple[str, bytes]]
    ) -> list[Json]:
        existing = {a["id"]: a for a in message.get("attachments", [])}
        uploaded = dict(enumerate(files))
        result: list[Json] = []
        entries = listed if listed is not None else (
            list(existing.values()) + [{"id": i, "filename": f} for i, (f, _) in uploaded.items()]
        )
        for entry in entries:
            key = str(entry["id"])
            if key in existing:
                result.append(existing[key])
            elif int(entry["id"]) in uploaded:
                filename, data = uploaded[int(entry["id"])]
                name = entry.get("filename") or filename
                result.append(self._stored_attachment(int(message["channel_id"]), name, data))
        return result

    def _stored_attachment(self, channel_id: int, filename: str, data: bytes) -> Json:
        attachment = self.attachment(channel_id, filename, data, _sniff(data))
        size = _image_size(data)
        if size is not None:
            attachment["width"], attachment["height"] = size
        return attachment

    # --- gateway --------------------------------------------------------------------------------

    async def _gateway_connection(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connection = _GatewaySocket(ws, request.query.get("compress") == "zlib-stream")
        await connection.send(10, {"heartbeat_interval": 41250})
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            if message["op"] == 1:  # HEARTBEAT
                await connection.send(11, None)
            elif message["op"] == 2:  # IDENTIFY
                identify = dict(message["d"])
                if identify.pop("token", None) != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                self.identified.append(identify)
                self._gateway = connection
                await connection.send(0, self._ready(), "READY")
                self._gateway_ready.set()
        if self._gateway is connection:
            self._gateway = None
            self._gateway_ready.clear()
        return ws

    def _ready(self) -> Json:
        return {
            "v": 10,
            "user": self.bot_user,
            "guilds": [],
            "session_id": "fake-session",
            "resume_gateway_url": "wss://gateway.discord.gg",
            "application": {"id": str(self.application_id), "flags": 0},
            "shard": [0, 1],
        }


# --- payloads Discord would send ---------------------------------------------------------------


def _user(user_id: int, name: str, *, bot: bool = False) -> Json:
    user: Json = {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
    }
    if bot:
        user["bot"] = True
    return user


def _dm_channel_id(user_id: int) -> int:
    return user_id + 1  # stable per user, distinct from the user id


@dataclass(frozen=True)
class Person:
    """A Discord user of a test, in a guild or in DMs."""

    id: int
    name: str

    @classmethod
    def new(cls, name: str) -> Person:
        return cls(snowflake(), name)

    @property
    def payload(self) -> Json:
        return _user(self.id, self.name)

    @property
    def dm_channel_id(self) -> int:
        return _dm_channel_id(self.id)


@dataclass(frozen=True)
class Place:
    """Where an interaction happens: a guild text channel, or a DM (guild_id None)."""

    channel_id: int
    guild_id: int | None

    @classmethod
    def guild_channel(cls) -> Place:
        return cls(snowflake(), snowflake())

    @classmethod
    def dm(cls, person: Person) -> Place:
        return cls(person.dm_channel_id, None)


def _base_interaction(
    fake: FakeDiscord, kind: int, person: Person, place: Place, data: Json, at: float | None
) -> Json:
    interaction_id = snowflake(at)
    payload: Json = {
        "id": str(interaction_id),
        "application_id": str(fake.application_id),
        "type": kind,
        "data": data,
        "token": f"interaction-token-{interaction_id}",
        "version": 1,
        "locale": "en-US",
        "attachment_size_limit": 10 * 1024 * 1024,
        "app_permissions": str((1 << 10) | (1 << 11) | (1 << 15)),  # as docs/discord.md asks
        "entitlements": [],
        "authorizing_integration_owners": {"0": str(place.guild_id or person.id)},
    }
    if place.guild_id is not None:
        payload["guild_id"] = str(place.guild_id)
        payload["guild_locale"] = "en-US"
        payload["guild"] = {"id": str(place.guild_id), "locale": "en-US", "features": []}
        payload["context"] = 0
        payload["channel"] = {
            "id": str(place.channel_id),
            "type": 0,
            "guild_id": str(place.guild_id),
            "name": "general",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }
        payload["member"] = {
            "user": person.payload,
            "roles": [],
            "joined_at": _iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str((1 << 10) | (1 << 11) | (1 << 15)),
        }
    else:
        payload["context"] = 1
        payload["channel"] = {"id": str(place.channel_id), "type": 1, "recipients": [person.payload]}
        payload["user"] = person.payload
    return payload


def command_interaction(
    fake: FakeDiscord,
    person: Person,
    place: Place,
    name: str,
    options: dict[str, Any] | None = None,
    *,
    attachments: dict[str, Json] | None = None,
    at: float | None = None,
    attachment_size_limit: int | None = None,
) -> Json:
    """An APPLICATION_COMMAND interaction for a synced slash command, as the gateway delivers it.

    `options` are string, integer and boolean options (each of the type the synced command declares);
    `attachments` maps option names to attachment payloads (from `FakeDiscord.attachment`), which go
    into `data.resolved`.
    """
    synced = fake.commands.get(str(place.guild_id)) or fake.commands.get(None) or []
    command = next((c for c in synced if c["name"] == name), None)
    if command is None:
        raise AssertionError(f"/{name} was not synced; synced: {[c['name'] for c in synced]}")
    data: Json = {"id": command["id"], "name": name, "type": 1, "options": []}
    if "guild_id" in command:
        data["guild_id"] = command["guild_id"]
    declared = {o["name"]: o["type"] for o in command.get("options", [])}
    for option, value in (options or {}).items():
        kind = declared.get(option, 4 if isinstance(value, int) else 3)
        data["options"].append({"name": option, "type": kind, "value": value})
    if attachments:
        data["resolved"] = {"attachments": {a["id"]: a for a in attachments.values()}}
        for option, attachment in attachments.items():
            data["options"].append({"name": option, "type": 11, "value": attachment["id"]})
    payload = _base_interaction(fake, 2, person, place, data, at)
    if attachment_size_limit is not None:
        payload["attachment_size_limit"] = attachment_size_limit
    return payload


def component_interaction(
    fake: FakeDiscord, person: Person, place: Place, message: Json, custom_id: str
) -> Json:
    """A MESSAGE_COMPONENT interaction: `person` pressed the button `custom_id` on `message`."""
    payload = _base_interaction(
        fake, 3, person, place, {"custom_id": custom_id, "component_type": 2}, None
    )
    payload["message"] = message
    return payload


def dm_message(fake: FakeDiscord, person: Person, content: str, attachments: list[Json]) -> Json:
    """A MESSAGE_CREATE of a user's direct message to the bot."""
    return {
        "id": str(snowflake()),
        "channel_id": str(person.dm_channel_id),
        "author": person.payload,
        "content": content,
        "timestamp": _iso(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments,
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        "components": [],
    }


def custom_ids(message: Json) -> list[str]:
    """The custom ids of every button on a message, in order."""
    return [
        child["custom_id"]
        for row in message.get("components", [])
        for child in row.get("components", [])
        if "custom_id" in child
    ]


# --- helpers ------------------------------------------------------------------------------------


async def _body(request: web.Request) -> tuple[Any, list[tuple[str, bytes]]]:
    """The JSON payload and uploaded files of a request (JSON or multipart/form-data)."""
    if request.content_type == "multipart/form-data":
        payload: Any = None
        files: dict[int, tuple[str, bytes]] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            data = await part.read(decode=False)
            if part.name == "payload_json":
                payload = json.loads(data)
            else:
                match = re.fullmatch(r"files\[(\d+)\]", part.name or "")
                index = int(match.group(1)) if match else len(files)
                files[index] = (part.filename or f"file{index}", bytes(data))
        return payload, [files[i] for i in sorted(files)]
    if request.can_read_body:
        raw = await request.read()
        return (json.loads(raw) if raw else None), []
    return None, []


def _json(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response with Discord's exact content type (discord.py compares it verbatim)."""
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status=status)


def _mention_allowed(user_id: str, allowed: Json | None) -> bool:
    if allowed is None:
        return True
    return "users" in allowed.get("parse", []) or user_id in [str(u) for u in allowed.get("users", [])]


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError):
        return None
