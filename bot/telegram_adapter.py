"""The Telegram adapter: python-telegram-bot's `Application` in front of `BotService`.

Updates arrive by long polling (default) or through a webhook guarded by a secret token. Each update
is handled in its own task, so one user's training never delays another user's reply.

Uploads are never lost to a restart: each is kept in the service's inbox (the Update's JSON) as
it arrives, which lets the adapter confirm it to Telegram (the getUpdates offset) at once, and it
leaves the inbox once answered. The next start answers what the inbox still holds, and skips those
ids if Telegram sends them again. Only if the database cannot keep an upload is it held back from
Telegram until answered, as a fallback; getUpdates returns at most 100 updates from the offset,
so under a burst of such held uploads the offset moves past a full page anyway (logged).

Albums come as one update per item with a shared ``media_group_id``; items are gathered until the
album has been quiet for ``album_wait_s`` and answered with one message. Progress of previews,
training and draws is edited into one message, at most every ``progress_interval_s``. Results come
as photos with buttons (draw again, more like this, full size, delete) whose callback data carry
the image id and the requester's Telegram id, so they keep working after a restart and do nothing
for anyone else.

In groups listed in ``allowed_chats`` the bot answers commands only, and answers them in the
user's private chat: nobody sees another person's photos, images or model. Every `BotError`
becomes a reply in `TelegramAdapter._guard`, the one place where errors meet users.

The bot token is never logged: while the adapter runs, a filter rewrites it out of every record of
python-telegram-bot, httpx, httpcore and tornado (they log request URLs, and Bot API URLs hold it).
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from telegram import (
    Bot,
    BotCommand,
    CallbackQuery,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
    Update,
    User,
)
from telegram.constants import ChatType
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    TelegramError,
    TimedOut,
)
from telegram.ext import (
    AIORateLimiter,
    Application,
    CallbackQueryHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot import texts
from bot.errors import BotError
from bot.options import parse_options, parse_train_words
from bot.service import BotService, ProgressCallback, Reply, ResumedWork, Upload, UserRef
from bot.settings import BotSettings
from bot.telegram_http import AiohttpRequest
from engine.api import Refusal

_log = logging.getLogger(__name__)

PLATFORM = "telegram"
TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024
"""The official Bot API server serves files up to 20 MB to bots; a self-hosted one has no limit."""
ALLOWED_UPDATES = ("message", "callback_query")
_PAGE = 100  # the most updates getUpdates returns at once
_HELD_RETRY_S = 0.5  # how long to wait for a held upload to settle before polling again
_HELD_POLL_S = 0.1  # the pace of polls while uploads are held (Telegram then answers at once)
_CALLBACK_VERSION = "ab1"
_ACTIONS = frozenset("armfd")  # agree, draw again (reroll), more like this, full size, delete
_PHOTO_CHECK = texts.progress(texts.job_label("check_photo"), {})  # "photo check..."

_App = Application[Any, Any, Any, Any, Any, Any]
_T = TypeVar("_T")


class TelegramStartError(RuntimeError):
    """Telegram could not be served: a rejected token, or a webhook that could not be set up."""


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


async def serve_telegram(
    service: BotService,
    settings: TelegramSettings,
    token: str,
    *,
    stop: asyncio.Event,
    webhook_secret: str | None = None,
    resumed: ResumedWork | None = None,
) -> None:
    """Serve Telegram until ``stop`` is set, then stop gracefully.

    ``resumed``: what `BotService.resume_all` finishes after a restart; Telegram users get theirs in
    their private chat as it comes. Cancelling the task stops at once instead: whatever uploads were not yet
    handled are fetched again by the next start. Raises `TelegramStartError` when Telegram rejects
    the token.
    """
    adapter = TelegramAdapter(
        service, settings, token, webhook_secret=webhook_secret, resumed=resumed
    )
    await adapter.start()
    graceful = False
    try:
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, adapter.failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        graceful = True
    finally:
        if graceful:
            await adapter.stop()
        else:
            await adapter.abort()
    if adapter.failed.done() and not adapter.failed.cancelled():
        adapter.failed.result()  # raises what stopped the intake of updates


class TelegramAdapter:
    """The adapter as an object: `start`, then `stop` (graceful) or `abort` (at once)."""

    def __init__(
        self,
        service: BotService,
        settings: TelegramSettings,
        token: str,
        *,
        webhook_secret: str | None = None,
        resumed: ResumedWork | None = None,
    ) -> None:
        if not token or token != token.strip():
            raise ValueError("telegram: the bot token is empty or has spaces; set TELEGRAM_TOKEN")
        self._service = service
        self._settings = settings
        self._token = token
        # Telegram sends this in a header with every webhook request; a fresh one each start is
        # enough because start() registers it with setWebhook.
        self._webhook_secret = webhook_secret or secrets.token_urlsafe(32)
        self._redaction = _TokenRedaction(token)
        self._tasks = _Tasks()
        self._holds = _Holds(on_release=self._released)
        # Uploads kept in the service's inbox (so Telegram is told at once that they arrived),
        # dropped from it once answered; and the updates the poller must not handle twice.
        self._kept: set[int] = set()
        self._seen: set[int] = set()
        self._albums = _Albums(settings.album_wait_s, self._tasks)
        self._resumed = resumed
        self._delivering: asyncio.Task[None] | None = None
        self._app: _App | None = None
        self._intake: asyncio.Task[None] | None = None
        self._commands = self._command_table()

    @property
    def failed(self) -> asyncio.Task[None]:
        """The task taking in updates; it ends only when it fails (e.g. the token was revoked)."""
        if self._intake is None:
            raise RuntimeError("the Telegram adapter has not been started")
        return self._intake

    async def start(self) -> None:
        """Connect (getMe), register the command menu, and start taking in updates."""
        self._redaction.install()
        try:
            self._app = self._build_application()
            await self._app.initialize()
        except InvalidToken as exc:
            self._redaction.uninstall()
            raise TelegramStartError(
                "Telegram rejected the bot token: check TELEGRAM_TOKEN (ask @BotFather for a new one)"
            ) from exc
        except BaseException:
            self._redaction.uninstall()
            raise
        try:
            await self._app.bot.set_my_commands(
                [BotCommand(name, description) for name, description in texts.TELEGRAM_COMMANDS]
            )
        except TelegramError as exc:  # the menu is a convenience; commands work without it
            _log.warning("could not set the command menu: %s", exc)
        await self._replay_kept()
        if self._settings.webhook_url is None:
            self._intake = asyncio.create_task(self._poll(), name="telegram-poll")
        else:
            await self._start_webhook()
            self._intake = asyncio.create_task(self._pump(), name="telegram-webhook")
        if self._resumed is not None:
            self._delivering = asyncio.create_task(self._deliver_all_resumed(self._app.bot, self._resumed))
        _log.info("serving Telegram as @%s", self._app.bot.username)

    async def stop(self) -> None:
        """Stop taking updates, answer gathered albums, let running work finish (up to
        ``shutdown_grace_s``), confirm what was handled to Telegram, and disconnect."""
        app = self._require_app()
        await self._stop_intake()
        await self._stop_delivering()
        self._albums.flush_all()
        await self._tasks.drain(self._settings.shutdown_grace_s)
        if self._settings.webhook_url is None:
            await self._confirm_handled(app.bot)
        await self._close()

    async def abort(self) -> None:
        """Stop at once; uploads not yet answered are fetched again by the next start."""
        await self._stop_intake()
        await self._stop_delivering()
        await self._tasks.cancel_all()
        await self._close()

    # --- application and intake ---------------------------------------------------------------

    def _build_application(self) -> _App:
        settings = self._settings
        builder = (
            Application.builder()
            .token(self._token)
            .rate_limiter(
                AIORateLimiter(
                    overall_max_rate=settings.messages_per_second, max_retries=settings.max_retries
                )
            )
            # aiohttp instead of PTB's httpx: see bot/telegram_http.py for why.
            .request(AiohttpRequest(pool_size=settings.connection_pool_size))
            .get_updates_request(AiohttpRequest(pool_size=1))
        )
        if settings.base_url is not None and settings.base_file_url is not None:
            builder = builder.base_url(settings.base_url).base_file_url(settings.base_file_url)
        if settings.local_mode:
            builder = builder.local_mode(True)
        if settings.webhook_url is None:
            builder = builder.updater(None)  # polling is ours (see _poll); the Updater serves webhooks
        app: _App = builder.build()
        app.add_handler(MessageHandler(filters.COMMAND, self._on_command))
        app.add_handler(MessageHandler(filters.PHOTO | filters.Document.ALL, self._on_upload))
        app.add_handler(CallbackQueryHandler(self._on_button))
        app.add_handler(MessageHandler(filters.ALL, self._on_other))
        app.add_error_handler(self._on_error)
        return app

    async def _poll(self) -> None:
        """Long polling that confirms an upload to Telegram only after it has been handled."""
        bot = self._require_app().bot
        try:
            await bot.delete_webhook()  # a webhook and getUpdates exclude each other
        except InvalidToken as exc:
            raise TelegramStartError("Telegram no longer accepts the bot token (TELEGRAM_TOKEN)") from exc
        except TelegramError as exc:  # getUpdates says Conflict while a webhook is still set
            _log.warning("could not remove a webhook before polling: %s", exc)
        backoff = 1.0
        while True:
            offset = self._holds.offset()
            self._holds.changed.clear()
            try:
                updates = await bot.get_updates(
                    offset=offset,
                    limit=_PAGE,
                    timeout=self._settings.poll_timeout_s,
                    allowed_updates=ALLOWED_UPDATES,
                )
            except InvalidToken as exc:
                raise TelegramStartError("Telegram no longer accepts the bot token (TELEGRAM_TOKEN)") from exc
            except TimedOut:
                continue
            except TelegramError as exc:
                if isinstance(exc, Conflict):
                    _log.error("another process is polling Telegram with this bot token: %s", exc)
                else:
                    _log.warning("fetching updates failed (%s); retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            fresh = [u for u in updates if u.update_id not in self._seen]
            fresh_ids = {u.update_id for u in fresh}
            kept = await self._keep(fresh)
            for update in updates:  # replayed ones too: the offset moves past them
                if update.update_id in fresh_ids:
                    self._seen.add(update.update_id)
                    hold = _is_upload(update) and update.update_id not in kept
                    self._holds.fetched(update.update_id, hold=hold)
                    self._tasks.spawn(self._process(update))
                else:
                    self._holds.fetched(update.update_id, hold=False)
            if len(updates) >= _PAGE and self._holds.offset() != updates[-1].update_id + 1:
                # A full page: newer updates may wait behind it, and unanswered uploads at its
                # start would keep them out. Confirm past the page; those uploads are still
                # answered, but a crash now would lose them.
                given_up = self._holds.confirm_below(updates[-1].update_id + 1)
                if given_up:
                    _log.warning(
                        "over %d updates at once: confirmed %d unanswered uploads to Telegram early",
                        _PAGE, given_up,
                    )
            floor = self._holds.offset() or 0
            self._seen = {i for i in self._seen if i >= floor}
            if not fresh and updates:
                # Only updates still being handled came back: wait for one to settle.
                await _wait_event(self._holds.changed, _HELD_RETRY_S)
            elif len(fresh) < len(updates):
                # Unanswered uploads make Telegram answer at once instead of long polling:
                # pace the polls rather than fetch the same updates in a tight loop.
                await asyncio.sleep(_HELD_POLL_S)

    async def _start_webhook(self) -> None:
        app = self._require_app()
        settings = self._settings
        if app.updater is None:
            raise RuntimeError("webhook mode needs the application's Updater")
        try:
            await app.updater.start_webhook(
                listen=settings.webhook_listen,
                port=settings.webhook_port,
                url_path=settings.webhook_path,
                webhook_url=settings.webhook_url,
                allowed_updates=ALLOWED_UPDATES,
                secret_token=self._webhook_secret,
            )
        except TelegramError as exc:
            raise TelegramStartError(f"could not set the Telegram webhook: {exc}") from exc

    async def _pump(self) -> None:
        """Webhook mode: updates the Updater received, each handled in its own task."""
        queue = self._require_app().update_queue
        while True:
            update = await queue.get()
            queue.task_done()
            if isinstance(update, Update):
                # Telegram has had its "200 OK": keeping an upload narrows what a crash loses.
                await self._keep([update])
                self._tasks.spawn(self._process(update))

    async def _keep(self, updates: Sequence[Update]) -> set[int]:
        """Keep the uploads among ``updates`` in the service's inbox; returns the ids kept.

        Kept uploads can be confirmed to Telegram at once: a crash before they are answered
        replays them from the inbox at the next start. One that cannot be kept (the database
        failed) is held back from Telegram instead, as before there was an inbox.
        """
        uploads = [u for u in updates if _is_upload(u)]
        if not uploads:
            return set()
        results = await asyncio.gather(
            *(self._service.keep_inbound(PLATFORM, str(u.update_id), u.to_dict()) for u in uploads),
            return_exceptions=True,
        )
        kept = {u.update_id for u, r in zip(uploads, results) if not isinstance(r, BaseException)}
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            _log.warning(
                "could not keep %d upload(s) in the database (%s); Telegram keeps them until answered",
                len(failures), failures[0],
            )
        self._kept |= kept
        return kept

    async def _replay_kept(self) -> None:
        """Handle again the uploads a previous run kept but never answered (it stopped first)."""
        try:
            pending = await self._service.replay_inbound(PLATFORM)
        except Exception as exc:  # the adapter still serves; those uploads wait for next time
            _log.error("could not read the uploads kept by the last run: %s", exc)
            return
        bot = self._require_app().bot
        for _, payload in pending:
            update = Update.de_json(payload, bot)
            self._kept.add(update.update_id)
            self._seen.add(update.update_id)  # Telegram may send it again: handle it once
            self._tasks.spawn(self._process(update))
        if pending:
            _log.warning("answering %d upload(s) received before the last stop", len(pending))

    def _released(self, update_id: int) -> None:
        """An update is answered: a kept upload leaves the inbox."""
        if update_id in self._kept:
            self._kept.discard(update_id)
            self._tasks.spawn(self._drop_kept(update_id))

    async def _drop_kept(self, update_id: int) -> None:
        try:
            await self._service.inbound_done(PLATFORM, str(update_id))
        except Exception as exc:  # answered already; at worst it is answered again after a restart
            _log.warning("could not drop an answered upload from the inbox: %s", exc)

    async def _process(self, update: Update) -> None:
        await self._require_app().process_update(update)
        # Not reached when cancelled: an upload cut off by a stop stays in the inbox (or held).
        self._holds.settle(update.update_id)

    async def _stop_intake(self) -> None:
        app = self._app
        if app is not None and app.updater is not None and app.updater.running:
            await app.updater.stop()
            while not app.update_queue.empty():  # received, not yet pumped
                update = app.update_queue.get_nowait()
                if isinstance(update, Update):
                    self._tasks.spawn(self._process(update))
        if self._intake is not None and not self._intake.done():
            self._intake.cancel()
            await asyncio.gather(self._intake, return_exceptions=True)

    async def _confirm_handled(self, bot: Bot) -> None:
        """Tell Telegram which updates were handled (the offset); the rest come again next time."""
        offset = self._holds.offset()
        if offset is None:
            return
        try:
            await bot.get_updates(offset=offset, limit=1, timeout=0, allowed_updates=ALLOWED_UPDATES)
        except TelegramError as exc:
            _log.warning("could not confirm handled updates to Telegram: %s", exc)

    async def _close(self) -> None:
        try:
            if self._app is not None:
                await self._app.shutdown()
        finally:
            self._redaction.uninstall()

    def _require_app(self) -> _App:
        if self._app is None:
            raise RuntimeError("the Telegram adapter has not been started")
        return self._app

    # --- handlers -------------------------------------------------------------------------------

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = update.message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None or not message.text:
            return
        word, *tail = message.text.split(maxsplit=1)
        rest = tail[0] if tail else ""
        name, _, addressee = word[1:].partition("@")
        if addressee and addressee.lower() != (context.bot.username or "").lower():
            return  # a command for another bot in the same group
        name = name.lower()
        access = self._access(chat)
        if access is _Access.DENIED:
            await self._say(context.bot, chat.id, texts.TELEGRAM_NOT_ALLOWED, message.message_id)
            return
        if access is _Access.PRIVATE_ONLY:
            await self._say(context.bot, chat.id, texts.TELEGRAM_PRIVATE_ONLY, message.message_id)
            return
        in_group = access is _Access.GROUP
        if name == "help" or name not in self._commands:
            # Neither says anything about the user, so groups get it where it was asked.
            text = texts.TELEGRAM_HELP if name == "help" else texts.UNKNOWN_COMMAND.format(command="/" + name)
            await self._say(context.bot, chat.id, text, message.message_id)
            return
        channel = self._channel(context.bot, user, chat, message.message_id, private=in_group)
        await self._guard(channel, self._commands[name](channel, user, rest.strip()))

    async def _on_upload(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = update.message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None or chat.type != ChatType.PRIVATE:
            return  # in groups only commands are answered; nobody enrols in front of others
        if self._access(chat) is _Access.DENIED:
            await self._say(context.bot, chat.id, texts.TELEGRAM_NOT_ALLOWED, message.message_id)
            return
        item = _Item.of(message, update.update_id)
        if item is None:
            return
        bot, chat_id = context.bot, chat.id
        if message.media_group_id is None:
            await self._enrol(bot, user, chat_id, [item])
            return
        self._holds.claim(update.update_id)  # settled when the whole album has been answered
        interval = self._settings.progress_interval_s

        def answer_album() -> Callable[[list[_Item]], Awaitable[None]]:
            # The answer's message opens with the first item, and gets the results when the
            # album is complete: one message per album, and no silence while it gathers.
            channel = _Channel(bot, chat_id, item.message_id, interval=interval)
            opening = self._tasks.spawn(_acknowledge(channel))
            return lambda items: self._enrol_album(user, channel, opening, items)

        self._albums.add((chat_id, user.id, message.media_group_id), item, answer_album)

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        button = _Button.parse(query.data)
        if button is None:
            await self._answer(query, texts.TELEGRAM_UNKNOWN_BUTTON)
            return
        if button.user_id != query.from_user.id:
            # Someone else's button: say so, and do nothing else.
            refusal = texts.TELEGRAM_NOT_YOUR_BUTTON if button.action == "a" else texts.NOT_YOUR_IMAGE
            await self._answer(query, refusal)
            return
        await self._answer(query, None)
        # Buttons only ever sit in their requester's private chat: answer there, whatever the
        # callback claims about its message.
        presser = query.from_user.id
        message = query.message
        reply_to = message.message_id if message is not None and message.chat.id == presser else None
        channel = _Channel(context.bot, presser, reply_to, interval=self._settings.progress_interval_s)
        await self._guard(channel, self._press(channel, query, button))

    async def _on_other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, chat = update.message, update.effective_chat
        if message is None or chat is None or chat.type != ChatType.PRIVATE:
            return  # groups: other people's conversation
        if self._access(chat) is _Access.DENIED:
            text = texts.TELEGRAM_NOT_ALLOWED
        else:
            text = texts.NOT_A_COMMAND if message.text else texts.TELEGRAM_NOT_AN_UPLOAD
        await self._say(context.bot, chat.id, text, message.message_id)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Errors that escaped a handler (`_guard` catches the rest): log, and tell the user."""
        _log.error("error while handling a Telegram update", exc_info=context.error)
        if isinstance(update, Update) and update.effective_chat is not None:
            chat_id = update.effective_chat.id
            if update.effective_chat.type != ChatType.PRIVATE and update.effective_user is not None:
                chat_id = update.effective_user.id
            await self._say(context.bot, chat_id, texts.TELEGRAM_SOMETHING_BROKE, None)

    # --- commands -------------------------------------------------------------------------------

    def _command_table(self) -> dict[str, Callable[[_Channel, User, str], Awaitable[None]]]:
        return {
            "start": self._start,
            "agree": self._plain(lambda u, _: self._service.agree(u)),
            "photo": self._photo_hint,
            "photos": self._plain(lambda u, _: self._service.photos(u)),
            "preview": self._long("preview", self._preview),
            "train": self._long("training", self._train, notify=True),
            "draw": self._long("drawing", self._draw),
            "styles": self._plain(lambda u, _: self._service.styles()),
            "status": self._plain(lambda u, _: self._service.status(u)),
            "forget": self._plain(lambda u, _: self._service.forget(u)),
        }

    async def _preview(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        options = parse_options(rest, allowed=("--style", "--ar"))
        return await self._service.preview(
            user, options.prompt or None, on_progress=on_progress, style=options.style, aspect=options.aspect
        )

    async def _train(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        method, class_word = parse_train_words(rest)
        return await self._service.train(user, method, on_progress=on_progress, class_word=class_word)

    async def _draw(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        options = parse_options(rest)
        return await self._service.draw(
            user, options.prompt, on_progress=on_progress,
            style=options.style, aspect=options.aspect, boost=options.boost,
        )

    async def _start(self, channel: _Channel, user: User, rest: str) -> None:
        reply = await self._service.start(_ref(user))
        markup = None
        if reply.text == texts.CONSENT:  # not yet agreed
            markup = InlineKeyboardMarkup([[_Button("a", user.id).button(texts.TELEGRAM_AGREE_BUTTON)]])
        await channel.send(reply.text, markup)

    async def _photo_hint(self, channel: _Channel, user: User, rest: str) -> None:
        await channel.send(texts.TELEGRAM_SEND_PHOTOS)

    def _plain(
        self, call: Callable[[UserRef, str], Awaitable[Reply]]
    ) -> Callable[[_Channel, User, str], Awaitable[None]]:
        async def command(channel: _Channel, user: User, rest: str) -> None:
            reply = await call(_ref(user), rest)
            await channel.send(reply.text)

        return command

    def _long(
        self,
        what: str,
        call: Callable[[UserRef, str, ProgressCallback], Awaitable[Reply]],
        *,
        notify: bool = False,
    ) -> Callable[[_Channel, User, str], Awaitable[None]]:
        async def command(channel: _Channel, user: User, rest: str) -> None:
            await self._run_long(channel, user.id, what, lambda p: call(_ref(user), rest, p), notify=notify)

        return command

    async def _run_long(
        self,
        channel: _Channel,
        owner_id: int,
        what: str,
        call: Callable[[ProgressCallback], Awaitable[Reply]],
        *,
        notify: bool = False,
    ) -> None:
        """One progress message, edited while the job runs; then the result and its images.

        With ``notify`` the result comes as a new message (edits make no sound): training ends
        long after the user last looked.
        """
        progress = await channel.open_progress(texts.progress(what, {}))
        reply = await call(progress.update)
        if notify:
            await progress.finish(texts.TELEGRAM_PROGRESS_DONE.format(what=what))
            await channel.send(reply.text)
        else:
            await progress.finish(reply.text)
        await self._send_images(channel, reply, owner_id)

    async def _send_images(self, channel: _Channel, reply: Reply, owner_id: int) -> None:
        for index, image in enumerate(reply.images, start=1):
            data = await asyncio.to_thread(image.path.read_bytes)
            buttons = InlineKeyboardMarkup(
                [
                    [
                        _Button("r", owner_id, image.image_id).button(texts.TELEGRAM_REROLL_BUTTON),
                        _Button("m", owner_id, image.image_id).button(texts.TELEGRAM_MORE_BUTTON),
                    ],
                    [
                        _Button("f", owner_id, image.image_id).button(texts.TELEGRAM_FULL_SIZE_BUTTON),
                        _Button("d", owner_id, image.image_id).button(texts.TELEGRAM_DELETE_BUTTON),
                    ],
                ]
            )
            name = f"avatarbooth-{image.image_id}{image.path.suffix or '.png'}"
            caption = texts.image_line(index, image.score)
            try:
                await channel.send_photo(data, name, caption, buttons)
            except BadRequest as exc:  # too large or oddly shaped for a photo: send the file
                _log.info("sending image %d as a document: %s", image.image_id, exc)
                await channel.send_document(data, name, caption, buttons)

    async def _press(self, channel: _Channel, query: CallbackQuery, button: _Button) -> None:
        user = _ref(query.from_user)
        service = self._service
        image_id = button.image_id
        if button.action == "a":
            reply = await service.agree(user)
            await channel.send(reply.text)
            if query.message is not None and query.message.chat.id == channel.chat_id:
                await _quietly(channel.remove_buttons(query.message.message_id))
        elif button.action == "r":
            await self._run_long(
                channel, button.user_id, "drawing", lambda p: service.reroll(user, image_id, on_progress=p)
            )
        elif button.action == "m":
            await self._run_long(
                channel, button.user_id, "drawing", lambda p: service.more_like(user, image_id, on_progress=p)
            )
        elif button.action == "f":
            path = await service.image_file(user, image_id)
            data = await asyncio.to_thread(Path(path).read_bytes)
            await channel.send_document(data, f"avatarbooth-{image_id}{path.suffix or '.png'}", None, None)
        elif button.action == "d":
            reply = await service.delete_image(user, image_id)
            if query.message is not None and query.message.chat.id == channel.chat_id:
                await _quietly(channel.delete(query.message.message_id))
            await channel.send(reply.text)

    # --- photos ---------------------------------------------------------------------------------

    async def _enrol_album(
        self,
        user: User,
        channel: _Channel,
        opening: asyncio.Task[_ProgressMessage | None],
        items: list[_Item],
    ) -> None:
        progress = await opening
        ordered = sorted(items, key=lambda item: item.message_id)
        await self._guard(channel, self._check_photos(channel, _ref(user), ordered, progress))
        for item in items:  # not reached when cancelled: the album comes again after a restart
            self._holds.release(item.update_id)

    async def _enrol(self, bot: Bot, user: User, chat_id: int, items: Sequence[_Item]) -> None:
        """Answer one photo with one message: its line and where the user stands."""
        channel = _Channel(bot, chat_id, items[0].message_id, interval=self._settings.progress_interval_s)
        await self._guard(channel, self._check_photos(channel, _ref(user), items, None))

    async def _check_photos(
        self,
        channel: _Channel,
        user: UserRef,
        items: Sequence[_Item],
        progress: _ProgressMessage | None,
    ) -> None:
        if progress is None:
            progress = await channel.open_progress(_PHOTO_CHECK)
        fetched = await asyncio.gather(*(self._fetch(channel.bot, item) for item in items))
        uploads = [Upload(item.filename, got) for item, got in zip(items, fetched) if isinstance(got, bytes)]
        skipped = [(item, got) for item, got in zip(items, fetched) if isinstance(got, _Skip)]
        lines = [
            skip.line(texts.photo_label(len(uploads) + number, item.filename), self._service.settings)
            for number, (item, skip) in enumerate(skipped, start=1)
        ]
        if uploads:
            reply = await self._service.add_photos(user, uploads, on_progress=progress.update)
            *checked, standing = reply.text.splitlines()
            lines = [*checked, *lines, standing]
        await progress.finish("\n".join(lines))

    async def _fetch(self, bot: Bot, item: _Item) -> bytes | _Skip:
        """The file's bytes with their metadata removed, or why it was not fetched."""
        limit = self._settings.download_limit
        if item.size is not None and limit is not None and item.size > limit:
            return _Skip(_SkipReason.TOO_BIG_FOR_TELEGRAM, limit)
        if item.size is not None and item.size > self._service.settings.max_upload_bytes:
            return _Skip(_SkipReason.TOO_LARGE)
        try:
            remote = await bot.get_file(item.file_id)
            data = bytes(await remote.download_as_bytearray())
        except BadRequest as exc:
            if "too big" in exc.message.lower():
                return _Skip(_SkipReason.TOO_BIG_FOR_TELEGRAM, limit or TELEGRAM_DOWNLOAD_LIMIT)
            _log.warning("could not fetch a file from Telegram: %s", exc)
            return _Skip(_SkipReason.NOT_FETCHED)
        except TelegramError as exc:
            _log.warning("could not fetch a file from Telegram: %s", exc)
            return _Skip(_SkipReason.NOT_FETCHED)
        return data  # the service strips its metadata at the one upload boundary (bot.uploads)

    # --- errors, access, resuming ---------------------------------------------------------------

    async def _guard(self, channel: _Channel, work: Awaitable[None]) -> None:
        """Run one command; its `BotError`, or any failure, becomes a reply. Never a silent drop."""
        try:
            await work
        except _Unreachable:
            return
        except BotError as exc:
            await _quietly(channel.fail(exc.user_message))
        except TelegramError as exc:
            _log.warning("Telegram refused a request: %s", exc)
            await _quietly(channel.fail(texts.TELEGRAM_SOMETHING_BROKE))
        except Exception:
            _log.exception("a Telegram command failed")
            await _quietly(channel.fail(texts.TELEGRAM_SOMETHING_BROKE))

    def _access(self, chat: Chat) -> _Access:
        allowed = self._settings.allowed_chats
        if chat.type == ChatType.PRIVATE:
            return _Access.PRIVATE if not allowed or chat.id in allowed else _Access.DENIED
        if chat.type in (ChatType.GROUP, ChatType.SUPERGROUP):
            return _Access.GROUP if chat.id in allowed else _Access.PRIVATE_ONLY
        return _Access.DENIED

    def _channel(self, bot: Bot, user: User, chat: Chat, message_id: int, *, private: bool) -> _Channel:
        """Where a command's answers go: the chat itself, or for a group the user's private chat."""
        interval = self._settings.progress_interval_s
        if not private:
            return _Channel(bot, chat.id, message_id, interval=interval)
        return _Channel(bot, user.id, None, interval=interval, group=(chat.id, message_id))

    async def _deliver_all_resumed(self, bot: Bot, resumed: ResumedWork) -> None:
        async for user, reply in resumed.replies(PLATFORM):
            if user.platform_user_id.lstrip("-").isdigit():
                self._tasks.spawn(self._deliver_resumed(bot, int(user.platform_user_id), reply))

    async def _stop_delivering(self) -> None:
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)

    async def _deliver_resumed(self, bot: Bot, user_id: int, reply: Reply) -> None:
        """Send what a restart's `BotService.resume_all` finished for one user, privately."""
        channel = _Channel(bot, user_id, None, interval=self._settings.progress_interval_s)
        try:
            await channel.send(reply.text)
            await self._send_images(channel, reply, user_id)
        except TelegramError as exc:
            _log.warning("could not deliver finished work to a Telegram user: %s", exc)

    async def _say(self, bot: Bot, chat_id: int, text: str, reply_to: int | None) -> None:
        await _quietly(_Channel(bot, chat_id, reply_to, interval=0).send(text))

    @staticmethod
    async def _answer(query: CallbackQuery, text: str | None) -> None:
        await _quietly(query.answer(text, show_alert=text is not None))


# --- replies -----------------------------------------------------------------------------------------


class _Unreachable(Exception):
    """The user's private chat is closed to the bot; the group was told how to open it."""


class _Channel:
    """Where one command's answers go; for a group command, the user's private chat."""

    def __init__(
        self,
        bot: Bot,
        chat_id: int,
        reply_to: int | None,
        *,
        interval: float,
        group: tuple[int, int] | None = None,
    ) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self._reply_to = reply_to
        self._interval = interval
        self._group = group  # (group chat id, command message id): where to point to the answer
        self._pointed = False
        self._progress: _ProgressMessage | None = None

    async def send(self, text: str, markup: InlineKeyboardMarkup | None = None) -> Message:
        return await self._deliver(
            self.bot.send_message(self.chat_id, text, reply_markup=markup, reply_parameters=self._reply())
        )

    async def send_photo(
        self, data: bytes, filename: str, caption: str, markup: InlineKeyboardMarkup | None
    ) -> Message:
        return await self._deliver(
            self.bot.send_photo(
                self.chat_id, data, caption=caption, filename=filename, reply_markup=markup,
                reply_parameters=self._reply(),
            )
        )

    async def send_document(
        self, data: bytes, filename: str, caption: str | None, markup: InlineKeyboardMarkup | None
    ) -> Message:
        return await self._deliver(
            self.bot.send_document(
                self.chat_id, data, caption=caption, filename=filename, reply_markup=markup,
                reply_parameters=self._reply(),
            )
        )

    async def remove_buttons(self, message_id: int) -> None:
        await self.bot.edit_message_reply_markup(self.chat_id, message_id, reply_markup=None)

    async def delete(self, message_id: int) -> None:
        await self.bot.delete_message(self.chat_id, message_id)

    async def open_progress(self, text: str) -> _ProgressMessage:
        self._progress = _ProgressMessage(self, self._interval)
        await self._progress.open(text)
        return self._progress

    async def fail(self, text: str) -> None:
        """Say what went wrong: in the open progress message if there is one, else anew."""
        if self._progress is not None and not self._progress.closed:
            await self._progress.finish(text)
        else:
            await self.send(text)

    def _reply(self) -> ReplyParameters | None:
        if self._reply_to is None:
            return None
        return ReplyParameters(self._reply_to, allow_sending_without_reply=True)

    async def _deliver(self, sending: Awaitable[_T]) -> _T:
        """Send; for a group command, point the group to the private answer (or to opening one)."""
        try:
            sent = await sending
        except Forbidden:
            if self._group is None:
                raise
            group_id, message_id = self._group
            await self.bot.send_message(
                group_id, texts.TELEGRAM_PRIVATE_ONLY,
                reply_parameters=ReplyParameters(message_id, allow_sending_without_reply=True),
            )
            raise _Unreachable() from None
        if self._group is not None and not self._pointed:
            self._pointed = True
            group_id, message_id = self._group
            await _quietly(
                self.bot.send_message(
                    group_id, texts.TELEGRAM_ANSWERED_PRIVATELY,
                    reply_parameters=ReplyParameters(message_id, allow_sending_without_reply=True),
                )
            )
        return sent


class _ProgressMessage:
    """One message edited as progress lines come in, at most once per ``interval`` seconds.

    `update` never waits on Telegram: the newest line is remembered and shown by a background
    edit when the interval allows; lines in between are skipped. `finish` shows the final text.
    """

    def __init__(self, channel: _Channel, interval: float) -> None:
        self._channel = channel
        self._interval = interval
        self._message: Message | None = None
        self._shown = ""
        self._latest = ""
        self._edited_at = 0.0
        self._editing = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None
        self.closed = False

    async def open(self, text: str) -> None:
        self._message = await self._channel.send(text)
        self._shown = self._latest = text
        self._edited_at = _now()

    async def update(self, line: str) -> None:
        if self.closed:
            return
        self._latest = line
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._show_latest())

    async def finish(self, text: str) -> None:
        """Show ``text`` now (a new message if the old one is gone); no more progress after it."""
        self.closed = True
        pending = self._pending
        if pending is not None and not pending.done():
            if not self._editing.locked():
                pending.cancel()  # still waiting out the interval: nothing to show any more
            await asyncio.wait([pending])
        async with self._editing:
            if not await self._edit(text):
                await self._channel.send(text)

    async def _show_latest(self) -> None:
        while not self.closed and self._latest != self._shown:
            delay = self._edited_at + self._interval - _now()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self._editing:
                if self.closed:
                    return
                await self._edit(self._latest)

    async def _edit(self, text: str) -> bool:
        """Edit the message to ``text``; False when it can no longer be edited."""
        if self._message is None:
            return False
        if text == self._shown:
            return True
        try:
            await self._channel.bot.edit_message_text(text, self._channel.chat_id, self._message.message_id)
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():
                _log.info("could not edit a progress message: %s", exc)
                return False
        except TelegramError as exc:
            _log.info("could not edit a progress message: %s", exc)
            return False
        finally:
            self._edited_at = _now()
        self._shown = text
        return True


async def _acknowledge(channel: _Channel) -> _ProgressMessage | None:
    """The "photo check..." message an album's answer will be edited into; None if it failed."""
    try:
        return await channel.open_progress(_PHOTO_CHECK)
    except TelegramError as exc:
        _log.warning("could not acknowledge an album: %s", exc)
        return None


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set or ``timeout_s`` has passed.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that arrives just as the
    event is set, and a stop would then never end.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


async def _quietly(sending: Awaitable[object]) -> None:
    """Send something whose failure must not hide the reply it is part of (logged, not raised)."""
    try:
        await sending
    except _Unreachable:
        pass
    except TelegramError as exc:
        _log.warning("Telegram refused a request: %s", exc)


def _ref(user: User) -> UserRef:
    return UserRef(PLATFORM, str(user.id))


class _Access(enum.Enum):
    PRIVATE = "private"  # a private chat the bot serves
    GROUP = "group"  # a group listed in allowed_chats: commands, answered privately
    PRIVATE_ONLY = "private_only"  # a group not listed: point people to a private chat
    DENIED = "denied"  # allowed_chats is set and this private chat is not in it


# --- buttons -------------------------------------------------------------------------------------------


_MAX_ID = 2**63  # ids are signed 64-bit integers: a larger number in forged button data is no id


@dataclass(frozen=True)
class _Button:
    """Callback data: ``ab1:<action>:<requester's Telegram id>:<image id>`` (at most 64 bytes).

    Actions: a agree, r draw again, m more like this, f full size, d delete.
    """

    action: str
    user_id: int
    image_id: int = 0

    @property
    def data(self) -> str:
        return f"{_CALLBACK_VERSION}:{self.action}:{self.user_id}:{self.image_id}"

    def button(self, label: str) -> InlineKeyboardButton:
        return InlineKeyboardButton(label, callback_data=self.data)

    @classmethod
    def parse(cls, data: object) -> _Button | None:
        if not isinstance(data, str):
            return None
        parts = data.split(":")
        if len(parts) != 4 or parts[0] != _CALLBACK_VERSION or parts[1] not in _ACTIONS:
            return None
        try:
            user_id, image_id = int(parts[2]), int(parts[3])
        except ValueError:
            return None
        if not (0 <= user_id < _MAX_ID and 0 <= image_id < _MAX_ID):  # SQLite's and Telegram's 64 bits
            return None
        return cls(parts[1], user_id, image_id)


# --- uploads -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One uploaded file: a photo (its largest size) or a document."""

    update_id: int
    message_id: int
    file_id: str
    size: int | None
    filename: str | None

    @classmethod
    def of(cls, message: Message, update_id: int) -> _Item | None:
        if message.photo:
            largest = max(message.photo, key=lambda size: (size.width * size.height, size.file_size or 0))
            return cls(update_id, message.message_id, largest.file_id, largest.file_size, None)
        if message.document is not None:
            document = message.document
            return cls(
                update_id, message.message_id, document.file_id, document.file_size, document.file_name
            )
        return None


class _SkipReason(enum.Enum):
    TOO_BIG_FOR_TELEGRAM = "too_big_for_telegram"
    TOO_LARGE = "too_large"
    NOT_FETCHED = "not_fetched"


@dataclass(frozen=True)
class _Skip:
    """An upload not handed to the service, and why."""

    reason: _SkipReason
    limit: int = 0

    def line(self, label: str, settings: BotSettings) -> str:
        if self.reason is _SkipReason.TOO_BIG_FOR_TELEGRAM:
            return texts.TELEGRAM_FILE_TOO_BIG.format(label=label, limit_mb=self.limit // (1024 * 1024))
        if self.reason is _SkipReason.TOO_LARGE:
            return texts.photo_refused(label, texts.refusal(Refusal.FILE_TOO_LARGE, settings))
        return texts.TELEGRAM_DOWNLOAD_FAILED.format(label=label)


def _is_upload(update: Update) -> bool:
    message = update.message
    return message is not None and bool(message.photo or message.document)


class _Albums:
    """Gathers album items (one update each) until the album has been quiet for ``wait_s``."""

    def __init__(self, wait_s: float, tasks: _Tasks) -> None:
        self._wait_s = wait_s
        self._tasks = tasks
        self._open: dict[Hashable, _Album] = {}

    def add(
        self,
        key: Hashable,
        item: _Item,
        answer: Callable[[], Callable[[list[_Item]], Awaitable[None]]],
    ) -> None:
        """Add an item; for an album's first, ``answer()`` gives what will answer the album."""
        album = self._open.get(key)
        if album is None:
            album = self._open[key] = _Album()
            self._tasks.spawn(self._gather(key, album, answer()))
        album.items.append(item)
        album.quiet_at = _now() + self._wait_s

    def flush_all(self) -> None:
        """Answer every album now (on stop)."""
        for album in self._open.values():
            album.now.set()

    async def _gather(
        self, key: Hashable, album: _Album, answer: Callable[[list[_Item]], Awaitable[None]]
    ) -> None:
        while not album.now.is_set() and (delay := album.quiet_at - _now()) > 0:
            await _wait_event(album.now, delay)
        del self._open[key]
        await answer(album.items)


class _Album:
    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.quiet_at = 0.0
        self.now = asyncio.Event()


class _Holds:
    """Update ids of uploads not yet answered that are not kept in the inbox either (the database
    failed): the getUpdates offset never passes the lowest. ``on_release`` hears of every update
    answered, held or not."""

    def __init__(self, on_release: Callable[[int], None] | None = None) -> None:
        self._held: set[int] = set()
        self._claimed: set[int] = set()  # album items: released by the album, not their update
        self._on_release = on_release
        self._next: int | None = None  # one past the newest update fetched
        self.changed = asyncio.Event()

    def fetched(self, update_id: int, *, hold: bool) -> None:
        self._next = max(self._next or 0, update_id + 1)
        if hold:
            self._held.add(update_id)

    def claim(self, update_id: int) -> None:
        self._claimed.add(update_id)

    def settle(self, update_id: int) -> None:
        """The update's handler returned: release it unless an album answers for it."""
        if update_id not in self._claimed:
            self.release(update_id)

    def release(self, update_id: int) -> None:
        self._held.discard(update_id)
        self._claimed.discard(update_id)
        self.changed.set()
        if self._on_release is not None:
            self._on_release(update_id)

    def confirm_below(self, update_id: int) -> int:
        """Stop holding back the updates below ``update_id``; returns how many were held."""
        given_up = {i for i in self._held if i < update_id}
        self._held -= given_up
        self._next = max(self._next or 0, update_id)
        return len(given_up)

    def offset(self) -> int | None:
        """The getUpdates offset: the oldest unanswered upload, else one past the newest update."""
        return min(self._held) if self._held else self._next


class _Tasks:
    """The adapter's running work: one task per update or album, drained or cancelled on stop."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.create_task(work)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("a Telegram task failed", exc_info=task.exception())

    async def drain(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the running work (and what it starts), then cancel the rest."""
        deadline = _now() + grace_s
        while self._running and (left := deadline - _now()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        await self.cancel_all()

    async def cancel_all(self) -> None:
        while self._running:
            running = set(self._running)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self._running -= running


# --- logs ------------------------------------------------------------------------------------------------


class _TokenRedaction(logging.Filter):
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


__all__ = [
    "TelegramAdapter",
    "TelegramSettings",
    "TelegramStartError",
    "serve_telegram",
]
