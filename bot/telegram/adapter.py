"""The Telegram adapter: python-telegram-bot's `Application` in front of `BotService`.

Updates arrive by long polling (default) or through a webhook guarded by a secret token. Each update
is handled in its own task, so one user's training never delays another user's reply.

Uploads are never lost to a restart: each is kept in the inbox (`bot.inbox`, the Update's JSON) as
it arrives, which lets the adapter confirm it to Telegram (the getUpdates offset) at once, and it
leaves the inbox once answered. The next start answers what the inbox still holds, and skips those
ids if Telegram sends them again. Only if the database cannot keep an upload is it held back from
Telegram until answered, as a fallback; getUpdates returns at most 100 updates from the offset,
so under a burst of such held uploads the offset moves past a full page anyway (logged).

In groups listed in ``allowed_chats`` the bot answers commands only, and answers them in the
user's private chat: nobody sees another person's photos, images or model. Every `BotError`
becomes a reply in `TelegramAdapter._guard`, the one place where errors meet users.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from telegram import (
    Bot,
    BotCommand,
    CallbackQuery,
    Chat,
    InlineKeyboardMarkup,
    Update,
    User,
)
from telegram.constants import ChatType
from telegram.error import (
    BadRequest,
    Conflict,
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
from bot.chat.actions import IMAGE_VERBS, Action, Verb, decode
from bot.chat.failures import failure_text
from bot.chat.intake import Incoming, NotReceived, take_photos
from bot.chat.tasks import TaskSet
from bot.inbox import Inbox
from bot.options import PREVIEW_OPTIONS, parse_options, parse_train_words
from bot.replies import Offer
from bot.service import BotService, ProgressCallback, Reply, ResumedWork, UserRef
from bot.telegram.buttons import inline_button
from bot.telegram.channel import PHOTO_CHECK, Channel, ProgressMessage, Unreachable, acknowledge, quietly
from bot.telegram.clock import wait_event
from bot.telegram.http import AiohttpRequest
from bot.telegram.intake import Albums, Holds, Item, is_upload
from bot.telegram.redaction import TokenRedaction
from bot.telegram.settings import TELEGRAM_DOWNLOAD_LIMIT, TelegramSettings

_log = logging.getLogger(__name__)

PLATFORM = "telegram"
ALBUM_SIZE = 10  # the most photos one Telegram album (sendMediaGroup) holds
ALLOWED_UPDATES = ("message", "callback_query")
_PAGE = 100  # the most updates getUpdates returns at once
_HELD_RETRY_S = 0.5  # how long to wait for a held upload to settle before polling again
_HELD_POLL_S = 0.1  # the pace of polls while uploads are held (Telegram then answers at once)

_App = Application[Any, Any, Any, Any, Any, Any]


class TelegramStartError(RuntimeError):
    """Telegram could not be served: a rejected token, or a webhook that could not be set up."""


async def serve_telegram(
    service: BotService,
    inbox: Inbox,
    settings: TelegramSettings,
    token: str,
    *,
    stop: asyncio.Event,
    webhook_secret: str | None = None,
    resumed: ResumedWork | None = None,
) -> None:
    """Serve Telegram until ``stop`` is set, then stop gracefully.

    ``inbox`` keeps each upload from its arrival until it is answered, across restarts.
    ``resumed``: what `BotService.resume_all` finishes after a restart; Telegram users get theirs in
    their private chat as it comes. Cancelling the task stops at once instead: whatever uploads were not yet
    handled are fetched again by the next start. Raises `TelegramStartError` when Telegram rejects
    the token.
    """
    adapter = TelegramAdapter(
        service, inbox, settings, token, webhook_secret=webhook_secret, resumed=resumed
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
        inbox: Inbox,
        settings: TelegramSettings,
        token: str,
        *,
        webhook_secret: str | None = None,
        resumed: ResumedWork | None = None,
    ) -> None:
        if not token or token != token.strip():
            raise ValueError("telegram: the bot token is empty or has spaces; set TELEGRAM_TOKEN")
        if inbox.platform != PLATFORM:
            raise ValueError(f"telegram: the inbox given is {inbox.platform!r}'s, not {PLATFORM!r}'s")
        self._service = service
        self._inbox = inbox
        self._settings = settings
        self._token = token
        # Telegram sends this in a header with every webhook request; a fresh one each start is
        # enough because start() registers it with setWebhook.
        self._webhook_secret = webhook_secret or secrets.token_urlsafe(32)
        self._redaction = TokenRedaction(token)
        self._tasks = TaskSet("Telegram")
        self._holds = Holds(on_release=self._released)
        # Uploads kept in the inbox (so Telegram is told at once that they arrived),
        # dropped from it once answered; and the updates the poller must not handle twice.
        self._kept: set[int] = set()
        self._seen: set[int] = set()
        self._albums = Albums(settings.album_wait_s, self._tasks)
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
            # aiohttp instead of PTB's httpx: see bot/telegram/http.py for why.
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
        app.add_handler(MessageHandler(filters.ALL, self._on_anything_else))
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
                    hold = is_upload(update) and update.update_id not in kept
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
                await wait_event(self._holds.changed, _HELD_RETRY_S)
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
        """Keep the uploads among ``updates`` in the inbox; returns the ids kept.

        Kept uploads can be confirmed to Telegram at once: a crash before they are answered
        replays them from the inbox at the next start. One that cannot be kept (the database
        failed) is held back from Telegram instead, as before there was an inbox.
        """
        uploads = [u for u in updates if is_upload(u)]
        if not uploads:
            return set()
        results = await asyncio.gather(
            *(self._inbox.keep(str(u.update_id), u.to_dict()) for u in uploads),
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
            pending = await self._inbox.replay()
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
            await self._inbox.done(str(update_id))
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
        item = Item.of(message, update.update_id)
        if item is None:
            return
        bot, chat_id = context.bot, chat.id
        if message.media_group_id is None:
            await self._enrol(bot, user, chat_id, [item])
            return
        self._holds.claim(update.update_id)  # settled when the whole album has been answered
        interval = self._settings.progress_interval_s

        def answer_album() -> Callable[[list[Item]], Awaitable[None]]:
            # The answer's message opens with the first item, and gets the results when the
            # album is complete: one message per album, and no silence while it gathers.
            channel = Channel(bot, chat_id, item.message_id, interval=interval)
            opening = self._tasks.spawn(acknowledge(channel))
            return lambda items: self._enrol_album(user, channel, opening, items)

        self._albums.add((chat_id, user.id, message.media_group_id), item, answer_album)

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        action = decode(query.data)
        if action is None:
            await self._answer(query, texts.TELEGRAM_UNKNOWN_BUTTON)
            return
        if not action.belongs_to(query.from_user.id):
            # Someone else's button: say so, and do nothing else.
            refusal = texts.TELEGRAM_NOT_YOUR_BUTTON if action.verb is Verb.AGREE else texts.NOT_YOUR_IMAGE
            await self._answer(query, refusal)
            return
        await self._answer(query, None)
        # Buttons only ever sit in their requester's private chat: answer there, whatever the
        # callback claims about its message.
        presser = query.from_user.id
        message = query.message
        reply_to = message.message_id if message is not None and message.chat.id == presser else None
        channel = Channel(context.bot, presser, reply_to, interval=self._settings.progress_interval_s)
        await self._guard(channel, self._act_on_button(channel, query, action))

    async def _on_anything_else(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
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
        error = context.error if context.error is not None else RuntimeError("an update failed")
        text = failure_text(error, PLATFORM)  # logs, with its traceback, what is not a BotError
        if isinstance(update, Update) and update.effective_chat is not None:
            chat_id = update.effective_chat.id
            if update.effective_chat.type != ChatType.PRIVATE and update.effective_user is not None:
                chat_id = update.effective_user.id
            await self._say(context.bot, chat_id, text, None)

    # --- commands -------------------------------------------------------------------------------

    def _command_table(self) -> dict[str, Callable[[Channel, User, str], Awaitable[None]]]:
        return {
            "start": self._start,
            "agree": self._quick_command(lambda u, _: self._service.agree(u)),
            "photo": self._photo_hint,
            "photos": self._quick_command(lambda u, _: self._service.photos(u)),
            "preview": self._job_command("preview", self._preview),
            "train": self._job_command("training", self._train, notify=True),
            "draw": self._job_command("drawing", self._draw),
            "pack": self._pack,
            "styles": self._quick_command(lambda u, _: self._service.styles()),
            "status": self._quick_command(lambda u, _: self._service.status(u)),
            "forget": self._quick_command(lambda u, _: self._service.forget(u)),
        }

    async def _preview(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        options = parse_options(rest, allowed=PREVIEW_OPTIONS)
        return await self._service.preview(
            user, options.prompt or None, on_progress=on_progress,
            style=options.style, aspect=options.aspect, fast=options.fast,
        )

    async def _train(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        method, class_word = parse_train_words(rest)
        return await self._service.train(user, method, on_progress=on_progress, class_word=class_word)

    async def _draw(self, user: UserRef, rest: str, on_progress: ProgressCallback) -> Reply:
        options = parse_options(rest)
        return await self._service.draw(
            user, options.prompt, on_progress=on_progress,
            style=options.style, aspect=options.aspect, boost=options.boost, fast=options.fast,
        )

    async def _pack(self, channel: Channel, user: User, rest: str) -> None:
        """/pack NAME: one progress message for the whole pack, then its albums; /pack: the list."""
        if not rest.strip():
            await channel.send((await self._service.pack(_user_ref(user), None)).text)
            return
        await self._run_with_progress(
            channel, user.id, "pack", lambda p: self._service.pack(_user_ref(user), rest, on_progress=p)
        )

    async def _start(self, channel: Channel, user: User, rest: str) -> None:
        reply = await self._service.start(_user_ref(user))
        markup = None
        if Offer.CONSENT in reply.offers:
            markup = InlineKeyboardMarkup([[inline_button(Action(Verb.AGREE, user.id), texts.BUTTON_LABELS[Verb.AGREE])]])
        await channel.send(reply.text, markup)

    async def _photo_hint(self, channel: Channel, user: User, rest: str) -> None:
        await channel.send(texts.TELEGRAM_SEND_PHOTOS)

    def _quick_command(
        self, call: Callable[[UserRef, str], Awaitable[Reply]]
    ) -> Callable[[Channel, User, str], Awaitable[None]]:
        """A command answered by one service call at once: its reply, no progress message."""

        async def command(channel: Channel, user: User, rest: str) -> None:
            reply = await call(_user_ref(user), rest)
            await channel.send(reply.text)

        return command

    def _job_command(
        self,
        label: str,
        call: Callable[[UserRef, str, ProgressCallback], Awaitable[Reply]],
        *,
        notify: bool = False,
    ) -> Callable[[Channel, User, str], Awaitable[None]]:
        """A command that runs a job (``label``: "preview", "training"...) with a progress message."""

        async def command(channel: Channel, user: User, rest: str) -> None:
            await self._run_with_progress(
                channel, user.id, label, lambda p: call(_user_ref(user), rest, p), notify=notify
            )

        return command

    async def _run_with_progress(
        self,
        channel: Channel,
        owner_id: int,
        label: str,
        call: Callable[[ProgressCallback], Awaitable[Reply]],
        *,
        notify: bool = False,
    ) -> None:
        """One progress message, edited while the job runs; then the result and its images.

        With ``notify`` the result comes as a new message (edits make no sound): training ends
        long after the user last looked.
        """
        progress = await channel.open_progress(texts.progress(label, {}))
        reply = await call(progress.update)
        if notify:
            await progress.finish(texts.TELEGRAM_PROGRESS_DONE.format(what=label))
            await channel.send(reply.text)
        else:
            await progress.finish(reply.text)
        await self._send_images(channel, reply, owner_id)

    async def _send_images(self, channel: Channel, reply: Reply, owner_id: int) -> None:
        if reply.album:
            return await self._send_albums(channel, reply)
        for index, image in enumerate(reply.images, start=1):
            data = await asyncio.to_thread(image.path.read_bytes)
            keys = [
                inline_button(Action(verb, owner_id, image.image_id), texts.BUTTON_LABELS[verb])
                for verb in IMAGE_VERBS
            ]
            buttons = InlineKeyboardMarkup([keys[row : row + 2] for row in range(0, len(keys), 2)])  # rows of two
            name = f"avatarbooth-{image.image_id}{image.path.suffix or '.png'}"
            caption = texts.image_line(index, image.score, image.detail)
            if reply.as_files:  # at full size (an upscale): Telegram would recompress a photo
                await channel.send_document(data, name, caption, buttons)
                continue
            try:
                await channel.send_photo(data, name, caption, buttons)
            except BadRequest as exc:  # too large or oddly shaped for a photo: send the file
                _log.info("sending image %d as a document: %s", image.image_id, exc)
                await channel.send_document(data, name, caption, buttons)

    async def _send_albums(self, channel: Channel, reply: Reply) -> None:
        """A pack's images as albums of up to 10 (Telegram's limit), each captioned with its score."""
        photos = []
        for index, image in enumerate(reply.images, start=1):
            data = await asyncio.to_thread(image.path.read_bytes)
            photos.append((data, f"avatarbooth-{image.image_id}{image.path.suffix or '.png'}",
                           texts.image_line(index, image.score, image.detail)))
        for start in range(0, len(photos), ALBUM_SIZE):
            chunk = photos[start : start + ALBUM_SIZE]
            if len(chunk) == 1:  # an album holds at least two
                await channel.send_photo(*chunk[0], None)
            else:
                await channel.send_album(chunk)

    async def _act_on_button(self, channel: Channel, query: CallbackQuery, action: Action) -> None:
        user = _user_ref(query.from_user)
        service = self._service
        image_id = action.image_id
        if action.verb is Verb.AGREE:
            reply = await service.agree(user)
            await channel.send(reply.text)
            if query.message is not None and query.message.chat.id == channel.chat_id:
                await quietly(channel.remove_buttons(query.message.message_id))
        elif action.verb in (Verb.REROLL, Verb.MORE, Verb.UPSCALE):
            # A forged button (someone else's image, or none) is refused before "drawing..." opens.
            await service.check_image(user, image_id)
            draw = {Verb.REROLL: service.reroll, Verb.MORE: service.more_like, Verb.UPSCALE: service.upscale}[action.verb]
            label = texts.UPSCALING if action.verb is Verb.UPSCALE else "drawing"
            await self._run_with_progress(
                channel, action.owner, label, lambda p: draw(user, image_id, on_progress=p)
            )
        elif action.verb is Verb.FULL:
            path = await service.image_file(user, image_id)
            data = await asyncio.to_thread(Path(path).read_bytes)
            await channel.send_document(data, f"avatarbooth-{image_id}{path.suffix or '.png'}", None, None)
        elif action.verb is Verb.DELETE:
            reply = await service.delete_image(user, image_id)
            if query.message is not None and query.message.chat.id == channel.chat_id:
                await quietly(channel.delete(query.message.message_id))
            await channel.send(reply.text)

    # --- photos ---------------------------------------------------------------------------------

    async def _enrol_album(
        self,
        user: User,
        channel: Channel,
        opening: asyncio.Task[ProgressMessage | None],
        items: list[Item],
    ) -> None:
        progress = await opening
        ordered = sorted(items, key=lambda item: item.message_id)
        await self._guard(channel, self._check_photos(channel, _user_ref(user), ordered, progress))
        for item in items:  # not reached when cancelled: the album comes again after a restart
            self._holds.release(item.update_id)

    async def _enrol(self, bot: Bot, user: User, chat_id: int, items: Sequence[Item]) -> None:
        """Answer one photo with one message: its line and where the user stands."""
        channel = Channel(bot, chat_id, items[0].message_id, interval=self._settings.progress_interval_s)
        await self._guard(channel, self._check_photos(channel, _user_ref(user), items, None))

    async def _check_photos(
        self,
        channel: Channel,
        user: UserRef,
        items: Sequence[Item],
        progress: ProgressMessage | None,
    ) -> None:
        if progress is None:
            progress = await channel.open_progress(PHOTO_CHECK)
        files = [self._incoming(channel.bot, item) for item in items]
        reply = await take_photos(self._service, user, files, on_progress=progress.update)
        await progress.finish(reply.text)

    def _incoming(self, bot: Bot, item: Item) -> Incoming:
        """The file as Telegram announces it; reading it fetches it from Telegram."""
        limit = self._settings.download_limit

        async def read() -> bytes:
            try:
                remote = await bot.get_file(item.file_id)
                return bytes(await remote.download_as_bytearray())
            except BadRequest as exc:
                if "too big" in exc.message.lower():
                    raise NotReceived(_over(limit or TELEGRAM_DOWNLOAD_LIMIT)) from exc
                _log.warning("could not fetch a file from Telegram: %s", exc)
                raise NotReceived(texts.TELEGRAM_DOWNLOAD_FAILED) from exc
            except TelegramError as exc:
                _log.warning("could not fetch a file from Telegram: %s", exc)
                raise NotReceived(texts.TELEGRAM_DOWNLOAD_FAILED) from exc

        over = _over(limit) if limit is not None else ""
        return Incoming(item.filename, item.size, read, platform_limit=limit, over_platform_limit=over)

    # --- errors, access, resuming ---------------------------------------------------------------

    async def _guard(self, channel: Channel, work: Awaitable[None]) -> None:
        """Run one command; its `BotError`, or any failure, becomes a reply. Never a silent drop."""
        try:
            await work
        except Unreachable:
            return
        except TelegramError as exc:
            _log.warning("Telegram refused a request: %s", exc)
            await quietly(channel.fail(texts.SOMETHING_BROKE))
        except Exception as exc:  # a BotError says what to do; anything else is logged as our bug
            await quietly(channel.fail(failure_text(exc, PLATFORM)))

    def _access(self, chat: Chat) -> _Access:
        allowed = self._settings.allowed_chats
        if chat.type == ChatType.PRIVATE:
            return _Access.PRIVATE if not allowed or chat.id in allowed else _Access.DENIED
        if chat.type in (ChatType.GROUP, ChatType.SUPERGROUP):
            return _Access.GROUP if chat.id in allowed else _Access.PRIVATE_ONLY
        return _Access.DENIED

    def _channel(self, bot: Bot, user: User, chat: Chat, message_id: int, *, private: bool) -> Channel:
        """Where a command's answers go: the chat itself, or for a group the user's private chat."""
        interval = self._settings.progress_interval_s
        if not private:
            return Channel(bot, chat.id, message_id, interval=interval)
        return Channel(bot, user.id, None, interval=interval, group=(chat.id, message_id))

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
        channel = Channel(bot, user_id, None, interval=self._settings.progress_interval_s)
        try:
            await channel.send(reply.text)
            await self._send_images(channel, reply, user_id)
        except TelegramError as exc:
            _log.warning("could not deliver finished work to a Telegram user: %s", exc)

    async def _say(self, bot: Bot, chat_id: int, text: str, reply_to: int | None) -> None:
        await quietly(Channel(bot, chat_id, reply_to, interval=0).send(text))

    @staticmethod
    async def _answer(query: CallbackQuery, text: str | None) -> None:
        await quietly(query.answer(text, show_alert=text is not None))


def _user_ref(user: User) -> UserRef:
    return UserRef(PLATFORM, str(user.id))


def _over(limit: int) -> str:
    return texts.TELEGRAM_FILE_TOO_BIG.format(limit_mb=limit // (1024 * 1024))


class _Access(enum.Enum):
    PRIVATE = "private"  # a private chat the bot serves
    GROUP = "group"  # a group listed in allowed_chats: commands, answered privately
    PRIVATE_ONLY = "private_only"  # a group not listed: point people to a private chat
    DENIED = "denied"  # allowed_chats is set and this private chat is not in it


__all__ = [
    "TelegramAdapter",
    "TelegramStartError",
    "serve_telegram",
]

