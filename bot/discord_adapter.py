"""The Discord adapter: slash commands, selfies sent by DM, and buttons under results.

`AvatarBoothBot` is a `commands.Bot` that receives the `BotService` and its `DiscordSettings` through
its constructor; `setup_hook` registers the persistent buttons and syncs the slash commands (to the
configured guilds, or globally). `serve_discord` runs it until a stop event.

How an interaction is answered:

- it is acknowledged first (a deferred response, ephemeral for private replies), before any
  database, download or queue call, well inside Discord's 3 s;
- progress is edited into that response while its token is valid (15 min, less a margin); near the
  end of that window the response says the result will come as a new message;
- results that come late (training; anything after the token ran out) arrive as a new message that
  mentions the user, in the channel or, failing that, by DM;
- images go out under the upload limit (the interaction's, at most 10 MiB elsewhere), re-encoded
  when larger, with Reroll / More like this / Delete buttons whose custom ids carry the image and
  the requester (`ab:<action>:<image id>:<user id>`), so they resolve after a restart and only
  for the requester.

`_converse` is the one place where a `BotError` (or anything unexpected) becomes a reply.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image, UnidentifiedImageError

from bot import texts
from bot.errors import BotError
from bot.service import BotService, ImageOut, Reply, ResumedWork, Upload, UserRef
from bot.settings import CLASS_WORD_CHOICES
from engine.api import ASPECT_RATIOS, Refusal, TrainingMethod
from bot.styles import STYLES

_log = logging.getLogger(__name__)

PLATFORM = "discord"
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # bytes per file where no interaction says otherwise
TOKEN_LIFETIME = timedelta(minutes=15)
TOKEN_MARGIN = timedelta(seconds=60)  # stop using a token this long before it expires
MESSAGE_LIMIT = 2000  # characters of message content
PHOTO_OPTIONS = ("photo1", "photo2", "photo3", "photo4", "photo5")
REROLL, MORE, DELETE = "reroll", "more", "delete"
_IMAGE_FILE = re.compile(r"avatarbooth-(?P<image_id>[0-9]+)\.[a-z]+")

Interaction = discord.Interaction[discord.Client]


@dataclass(frozen=True)
class DiscordSettings:
    """``[discord]`` in config.toml. The bot token is not here: it comes only from DISCORD_TOKEN."""

    enabled: bool = False
    # Sync the slash commands to these servers (instant; for development). Empty: globally.
    guild_ids: tuple[int, ...] = ()
    # Photos sent to the bot by direct message are enrolled as if attached to /enroll.
    dm_uploads: bool = True

    def __post_init__(self) -> None:
        for guild_id in self.guild_ids:
            if isinstance(guild_id, bool) or not isinstance(guild_id, int) or guild_id <= 0:
                raise ValueError(
                    f"[discord] guild_ids must be server ids (positive integers), got {guild_id!r}"
                )


def user_ref(user: discord.abc.User) -> UserRef:
    return UserRef(PLATFORM, str(user.id))


# --- buttons ---------------------------------------------------------------------------------------


class ImageButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    # At most 18 digits: every id fits SQLite's signed 64 bits (Discord's snowflakes are 17-19 digits,
    # below 2**63; a forged, longer number matches nothing and the press does nothing).
    template=r"ab:(?P<action>reroll|more|delete):(?P<image_id>[0-9]{1,18}):(?P<owner_id>[0-9]{1,19})",
):
    """Reroll, More like this or Delete under a generated image; only its requester may press it."""

    def __init__(
        self, action: str, image_id: int, owner_id: int, *, label: str, row: int | None = None
    ) -> None:
        style = discord.ButtonStyle.danger if action == DELETE else discord.ButtonStyle.secondary
        super().__init__(
            discord.ui.Button(
                label=label, style=style, custom_id=f"ab:{action}:{image_id}:{owner_id}", row=row
            )
        )
        self.action = action
        self.image_id = image_id
        self.owner_id = owner_id

    @classmethod
    async def from_custom_id(
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ImageButton:
        label = item.label if isinstance(item, discord.ui.Button) and item.label else ""
        return cls(match["action"], int(match["image_id"]), int(match["owner_id"]), label=label)

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await _only_for(interaction, self.owner_id, texts.NOT_YOUR_IMAGE)

    async def callback(self, interaction: Interaction) -> None:
        bot = interaction.client
        if isinstance(bot, AvatarBoothBot):
            await bot.image_action(interaction, self.action, self.image_id)


class AgreeButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"ab:agree:(?P<owner_id>[0-9]{1,19})",
):
    """The consent button under /start: records the consent of the user who ran /start."""

    def __init__(self, owner_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=texts.DISCORD_AGREE_BUTTON,
                style=discord.ButtonStyle.primary,
                custom_id=f"ab:agree:{owner_id}",
            )
        )
        self.owner_id = owner_id

    @classmethod
    async def from_custom_id(
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> AgreeButton:
        return cls(int(match["owner_id"]))

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        return await _only_for(interaction, self.owner_id, texts.DISCORD_NOT_YOUR_CONSENT)

    async def callback(self, interaction: Interaction) -> None:
        bot = interaction.client
        if isinstance(bot, AvatarBoothBot):
            await bot.agree_pressed(interaction)


async def _only_for(interaction: Interaction, owner_id: int, refusal: str) -> bool:
    """True for the button's owner; anyone else gets a private refusal."""
    if interaction.user.id == owner_id:
        return True
    await interaction.response.send_message(refusal, ephemeral=True)
    return False


_BUTTON_LABELS = {
    REROLL: texts.DISCORD_REROLL_BUTTON,
    MORE: texts.DISCORD_MORE_BUTTON,
    DELETE: texts.DISCORD_DELETE_BUTTON,
}


def _result_view(images: Sequence[ImageOut], owner_id: int) -> discord.ui.View | None:
    """One row of buttons per image (Discord allows 5 rows); numbered when there are several."""
    buttons = []
    for number, image in enumerate(images[:5], start=1):
        for action, label in _BUTTON_LABELS.items():
            text = f"{label} {number}" if len(images) > 1 else label
            buttons.append((action, image.image_id, text))
    return _view_of(buttons, owner_id)


def _view_of(buttons: Sequence[tuple[str, int, str]], owner_id: int) -> discord.ui.View | None:
    """A never-expiring view of image buttons, one row per image id, in the order given."""
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    rows: dict[int, int] = {}
    for action, image_id, label in buttons:
        row = rows.setdefault(image_id, len(rows))
        view.add_item(ImageButton(action, image_id, owner_id, label=label, row=row))
    return view


def _view_without(message: discord.Message | None, image_id: int) -> discord.ui.View | None:
    """The message's image buttons less those of `image_id`."""
    if message is None:
        return None
    template = ImageButton.__discord_ui_compiled_template__
    kept: list[tuple[str, int, str]] = []
    owner_id = 0
    for row in message.components:
        for child in getattr(row, "children", []):
            match = template.fullmatch(getattr(child, "custom_id", None) or "")
            if match is None or int(match["image_id"]) == image_id:
                continue
            owner_id = int(match["owner_id"])
            kept.append((match["action"], int(match["image_id"]), getattr(child, "label", None) or ""))
    return _view_of(kept, owner_id)


# --- images under the upload limit -------------------------------------------------------------


@dataclass(frozen=True)
class _ImageFile:
    filename: str
    data: bytes

    def to_file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), filename=self.filename)


def fit_under(data: bytes, limit: int) -> tuple[bytes, str]:
    """The image as is when it fits in `limit` bytes, else re-encoded as JPEG (smaller if need be).

    Returns the bytes and their suffix. Raises ValueError for data Pillow cannot read.
    """
    if len(data) <= limit:
        return data, _suffix_of(data)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not an image Pillow can read: {exc}") from exc
    while True:
        for quality in (90, 80, 70, 60, 50):
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality, optimize=True)
            if out.tell() <= limit:
                return out.getvalue(), ".jpg"
        if min(image.size) <= 16:
            raise ValueError(f"cannot fit the image in {limit} bytes")
        smaller = (max(1, image.width * 3 // 4), max(1, image.height * 3 // 4))
        image = image.resize(smaller, Image.Resampling.LANCZOS)


def _suffix_of(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def _image_files(images: Sequence[ImageOut], limit: int) -> list[_ImageFile]:
    """Read and fit each image (blocking: run it in a thread)."""
    files = []
    for image in images:
        data, suffix = fit_under(Path(image.path).read_bytes(), limit)
        files.append(_ImageFile(f"avatarbooth-{image.image_id}{suffix}", data))
    return files


# --- where one command's replies go ---------------------------------------------------------------


@dataclass
class _Answer:
    """What a command produced: the service's reply, and buttons of its own (e.g. consent)."""

    reply: Reply
    view: discord.ui.View | None = None


class _Replies(Protocol):
    async def progress(self, line: str) -> None: ...

    async def deliver(self, answer: _Answer, *, announce: bool) -> None: ...

    async def close(self) -> None: ...


class _ProgressEditor:
    """Shows the newest progress line, at most one edit per `interval` s, without blocking the job."""

    def __init__(self, edit: Callable[[str], Awaitable[Any]], interval: float) -> None:
        self._edit = edit
        self._interval = interval
        self._latest: str | None = None
        self._shown: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending = False
        self._closed = False

    def push(self, line: str) -> None:
        if self._closed:
            return
        self._latest = line
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._latest is not None and not self._closed:
            line, self._latest = self._latest, None
            if line == self._shown:
                continue
            self._sending = True
            try:
                await self._edit(_clip(line))
                self._shown = line
            except discord.HTTPException as exc:
                _log.warning("could not show progress on Discord: %s", exc)
            finally:
                self._sending = False
            if self._closed:
                return
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stop; an edit in flight finishes first, so it cannot land after the result."""
        self._closed = True
        self._latest = None
        task = self._task
        if task is None or task.done():
            return
        if not self._sending:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _InteractionReplies:
    """Replies to one interaction: acknowledge, progress into the response, then the result.

    `update=True` is for buttons that change their own message (delete, agree): the acknowledgement
    shows nothing and the reply text goes out as a private follow-up.
    """

    def __init__(
        self, bot: AvatarBoothBot, interaction: Interaction, *, private: bool, update: bool = False
    ) -> None:
        self._interaction = interaction
        self._private = private
        self._update = update
        self._deadline = interaction.created_at + TOKEN_LIFETIME - TOKEN_MARGIN
        self._editor = _ProgressEditor(self._edit_progress, bot.progress_interval_s)
        self._last_line: str | None = None
        self._handoff: asyncio.Task[None] | None = None
        self._handed_off = False

    async def acknowledge(self) -> None:
        """Defer: Discord shows "thinking..." (or nothing, for updates) until the result."""
        if self._update:
            await self._interaction.response.defer()
        else:
            await self._interaction.response.defer(ephemeral=self._private, thinking=True)
            self._handoff = asyncio.create_task(self._hand_off_at_deadline())

    def _token_usable(self) -> bool:
        return not self._handed_off and discord.utils.utcnow() < self._deadline

    async def progress(self, line: str) -> None:
        self._last_line = line
        if not self._update and self._token_usable():
            self._editor.push(line)

    async def _edit_progress(self, line: str) -> None:
        if self._token_usable():
            await self._interaction.edit_original_response(content=line)

    async def _hand_off_at_deadline(self) -> None:
        """Before the token runs out, say that the result will come as a new message."""
        delay = (self._deadline - discord.utils.utcnow()).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        self._handed_off = True
        await self._editor.close()
        note = texts.DISCORD_HANDOFF
        if self._last_line:
            note = f"{self._last_line}\n{note}"
        try:
            await self._interaction.edit_original_response(content=_clip(note))
        except discord.HTTPException as exc:
            _log.warning("could not hand a Discord response over to a new message: %s", exc)

    async def deliver(self, answer: _Answer, *, announce: bool) -> None:
        await self._stop_progress()
        reply = answer.reply
        user = self._interaction.user
        if self._update:
            await self._interaction.followup.send(_clip(reply.text), ephemeral=True)
            return
        if announce or not self._token_usable():
            await self._announce(reply, answer.view)
            return
        files = await self._files(reply.images, self._interaction.filesize_limit)
        view = answer.view or _result_view(reply.images, user.id)
        await self._interaction.edit_original_response(
            content=_clip(reply.text), attachments=[f.to_file() for f in files], view=view
        )

    async def _announce(self, reply: Reply, view: discord.ui.View | None) -> None:
        """A new message mentioning the user: a follow-up while the token lives, else channel or DM."""
        user = self._interaction.user
        content = _clip(f"{user.mention} {reply.text}")
        mentions = discord.AllowedMentions(users=[user])
        buttons = _view_kwargs(view or _result_view(reply.images, user.id))
        if self._token_usable():
            files = await self._files(reply.images, self._interaction.filesize_limit)
            await self._interaction.followup.send(
                content, files=[f.to_file() for f in files], allowed_mentions=mentions, **buttons
            )
            return
        limit = min(self._interaction.filesize_limit, DEFAULT_UPLOAD_LIMIT)
        files = await self._files(reply.images, limit)
        channel = self._interaction.channel
        if not self._private and isinstance(channel, discord.abc.Messageable):
            try:
                await channel.send(
                    content, files=[f.to_file() for f in files], allowed_mentions=mentions, **buttons
                )
                return
            except discord.HTTPException as exc:  # e.g. no permission to post there
                _log.warning("could not post a result in the channel, sending it by DM: %s", exc)
        await user.send(_clip(reply.text), files=[f.to_file() for f in files], **buttons)

    async def _files(self, images: Sequence[ImageOut], limit: int) -> list[_ImageFile]:
        return await asyncio.to_thread(_image_files, images, limit)

    async def _stop_progress(self) -> None:
        if self._handoff is not None and not self._handoff.done():
            self._handoff.cancel()
            await asyncio.gather(self._handoff, return_exceptions=True)
        await self._editor.close()

    async def close(self) -> None:
        await self._stop_progress()


class _MessageReplies:
    """Replies to a direct message (selfies sent by DM): one status message, edited as work goes."""

    def __init__(self, bot: AvatarBoothBot, message: discord.Message) -> None:
        self._message = message
        self._status: discord.Message | None = None
        self._editor = _ProgressEditor(self._edit, bot.progress_interval_s)

    async def acknowledge(self, text: str) -> None:
        self._status = await self._message.reply(_clip(text), mention_author=False)

    async def _edit(self, line: str) -> None:
        if self._status is not None:
            await self._status.edit(content=line)

    async def progress(self, line: str) -> None:
        self._editor.push(line)

    async def deliver(self, answer: _Answer, *, announce: bool) -> None:
        await self._editor.close()
        await self._edit(_clip(answer.reply.text))

    async def close(self) -> None:
        await self._editor.close()


def _view_kwargs(view: discord.ui.View | None) -> dict[str, Any]:
    return {} if view is None else {"view": view}


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


# --- the bot ---------------------------------------------------------------------------------------


def intents() -> discord.Intents:
    """Only non-privileged intents: guilds for slash commands, DMs for selfies sent privately.

    Message content is not needed: DMs to the bot carry their attachments without it.
    """
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.dm_messages = True
    return wanted


class AvatarBoothBot(commands.Bot):
    """AvatarBooth on Discord: every command is a call on the injected `BotService`."""

    def __init__(
        self,
        service: BotService,
        settings: DiscordSettings,
        *,
        progress_interval_s: float = 1.0,
        resumed: ResumedWork | None = None,
        **options: Any,
    ) -> None:
        """`options` go to `discord.Client` (e.g. `proxy`, or a `connector` in tests).

        ``resumed``: what `BotService.resume_all` finishes after a restart; Discord users get theirs
        by direct message, from when the bot has logged in (the interactions they came from expired).
        """
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents(),
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.service = service
        self.settings = settings
        self.progress_interval_s = progress_interval_s
        self._conversations: set[asyncio.Task[Any]] = set()  # commands still running
        self._resumed = resumed
        self._delivering: asyncio.Task[None] | None = None
        self.tree.error(self._on_command_error)

    async def setup_hook(self) -> None:
        """Register the persistent buttons (so old messages' buttons work) and sync the commands;
        then send what finished while the bot was down."""
        self.add_dynamic_items(ImageButton, AgreeButton)
        await self.add_cog(_Commands(self))
        await self._sync_commands()
        if self._resumed is not None:
            self._delivering = asyncio.create_task(self._deliver_all_resumed(self._resumed))

    async def _deliver_all_resumed(self, resumed: ResumedWork) -> None:
        async for user, reply in resumed.replies(PLATFORM):
            if not user.platform_user_id.isdigit():
                continue
            task = asyncio.create_task(self._deliver_resumed(int(user.platform_user_id), reply))
            self._conversations.add(task)
            task.add_done_callback(self._conversations.discard)

    async def _deliver_resumed(self, user_id: int, reply: Reply) -> None:
        """One user's finished work, with its buttons, in a direct message."""
        try:
            channel = await self.create_dm(discord.Object(user_id))
            files = await asyncio.to_thread(_image_files, reply.images, DEFAULT_UPLOAD_LIMIT)
            await channel.send(
                _clip(reply.text),
                files=[f.to_file() for f in files],
                **_view_kwargs(_result_view(reply.images, user_id)),
            )
        except discord.HTTPException as exc:  # e.g. the user does not accept DMs from the bot
            _log.warning("could not deliver finished work to a Discord user: %s", exc)

    async def close(self) -> None:
        """Stop commands still running (each tells its user), then disconnect."""
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)
        running = [task for task in self._conversations if not task.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await super().close()

    async def _sync_commands(self) -> None:
        if not self.settings.guild_ids:
            synced = await self.tree.sync()
            _log.info("synced %d slash commands globally (may take up to an hour)", len(synced))
            return
        for guild_id in self.settings.guild_ids:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            try:
                synced = await self.tree.sync(guild=guild)
            except discord.Forbidden:
                _log.error(
                    "cannot sync slash commands to guild %d: invite the bot there with the "
                    "'bot applications.commands' scopes (see docs/discord.md)",
                    guild_id,
                )
                continue
            _log.info("synced %d slash commands to guild %d", len(synced), guild_id)

    # --- running commands -------------------------------------------------------------------------

    async def answer(
        self,
        interaction: Interaction,
        work: Callable[[_InteractionReplies], Awaitable[_Answer]],
        *,
        private: bool,
        announce: bool = False,
    ) -> None:
        """Acknowledge at once, then run `work` and deliver its answer."""
        replies = _InteractionReplies(self, interaction, private=private)
        await replies.acknowledge()
        await self._converse(replies, lambda: work(replies), announce=announce)

    async def _converse(
        self, replies: _Replies, work: Callable[[], Awaitable[_Answer]], *, announce: bool = False
    ) -> None:
        """Run a command and deliver its answer: the one place where errors become replies."""
        task = asyncio.current_task()
        if task is not None:
            self._conversations.add(task)
        try:
            try:
                answer = await work()
            except BotError as exc:
                answer = _Answer(Reply(exc.user_message))
            except asyncio.CancelledError:  # the bot is shutting down
                await self._say_interrupted(replies)
                raise
            except Exception:
                _log.exception("a Discord command failed")
                answer = _Answer(Reply(texts.DISCORD_SOMETHING_BROKE))
            await replies.deliver(answer, announce=announce)
        except discord.HTTPException as exc:
            _log.error("could not deliver a reply on Discord: %s", exc)
        except Exception:
            _log.exception("could not deliver a reply on Discord")
        finally:
            await replies.close()
            if task is not None:
                self._conversations.discard(task)

    async def _say_interrupted(self, replies: _Replies) -> None:
        """Best effort, briefly: the session closes right after."""
        try:
            await asyncio.wait_for(
                replies.deliver(_Answer(Reply(texts.DISCORD_INTERRUPTED)), announce=False), 5.0
            )
        except (discord.HTTPException, asyncio.TimeoutError) as exc:
            _log.warning("could not tell a user that the bot stopped: %s", exc)

    async def _on_command_error(
        self, interaction: Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Errors discord.py raises before our command runs (stale commands, bad options)."""
        if isinstance(error, (app_commands.CommandNotFound, app_commands.CommandSignatureMismatch)):
            text = texts.DISCORD_COMMAND_OUTDATED
        elif isinstance(error, app_commands.TransformerError):
            text = texts.DISCORD_BAD_OPTION
        else:
            _log.error("a Discord command failed", exc_info=error)
            text = texts.DISCORD_SOMETHING_BROKE
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            _log.error("could not report a command error on Discord: %s", exc)

    # --- commands -------------------------------------------------------------------------------

    async def start_command(self, interaction: Interaction) -> None:
        async def work(replies: _InteractionReplies) -> _Answer:
            reply = await self.service.start(user_ref(interaction.user))
            view = discord.ui.View(timeout=None)
            view.add_item(AgreeButton(interaction.user.id))
            return _Answer(Reply(f"{reply.text}\n\n{texts.DISCORD_CONSENT_BUTTON_HINT}"), view)

        await self.answer(interaction, work, private=True)

    async def enroll_command(
        self, interaction: Interaction, attachments: Sequence[discord.Attachment]
    ) -> None:
        async def work(replies: _InteractionReplies) -> _Answer:
            return await self._enroll(interaction.user, attachments, replies)

        await self.answer(interaction, work, private=True)

    async def _enroll(
        self, user: discord.abc.User, attachments: Sequence[discord.Attachment], replies: _Replies
    ) -> _Answer:
        """Download every attachment at once (their URLs expire), then let the service check them."""
        limit = self.service.settings.max_upload_bytes
        lines: list[str] = []
        wanted: list[discord.Attachment] = []
        for index, attachment in enumerate(attachments, start=1):
            if attachment.size > limit:  # refused unread; the rest is checked by content, not name
                label = texts.photo_label(index, attachment.filename)
                reason = texts.refusal(Refusal.FILE_TOO_LARGE, self.service.settings)
                lines.append(texts.photo_refused(label, reason))
            else:
                wanted.append(attachment)
        downloaded = await asyncio.gather(*(a.read() for a in wanted), return_exceptions=True)
        uploads: list[Upload] = []
        for attachment, data in zip(wanted, downloaded):
            if isinstance(data, bytes):
                uploads.append(Upload(filename=attachment.filename, data=data))
            elif isinstance(data, (discord.HTTPException, OSError)):
                _log.warning("could not download a Discord attachment: %s", data)
                lines.append(texts.DISCORD_DOWNLOAD_FAILED.format(filename=attachment.filename))
            else:
                raise data
        if not uploads:
            lines.append(texts.DISCORD_NOTHING_TO_CHECK)
            return _Answer(Reply("\n".join(lines)))
        reply = await self.service.add_photos(user_ref(user), uploads, on_progress=replies.progress)
        reply.text = "\n".join([*lines, reply.text])
        return _Answer(reply)

    async def simple_command(
        self,
        interaction: Interaction,
        call: Callable[[UserRef, Callable[[str], Awaitable[None]]], Awaitable[Reply]],
        *,
        private: bool,
        announce: bool = False,
    ) -> None:
        """A command that is one service call (with progress) and one reply."""

        async def work(replies: _InteractionReplies) -> _Answer:
            return _Answer(await call(user_ref(interaction.user), replies.progress))

        await self.answer(interaction, work, private=private, announce=announce)

    # --- buttons ----------------------------------------------------------------------------------

    async def image_action(self, interaction: Interaction, action: str, image_id: int) -> None:
        """A press on a result button by its owner (checked again by the service)."""
        user = user_ref(interaction.user)
        if action == DELETE:
            replies = _InteractionReplies(self, interaction, private=True, update=True)
            await replies.acknowledge()
            await self._converse(replies, lambda: self._delete(interaction, image_id))
            return

        async def work(replies: _InteractionReplies) -> _Answer:
            if action == REROLL:
                return _Answer(await self.service.reroll(user, image_id, on_progress=replies.progress))
            return _Answer(await self.service.more_like(user, image_id, on_progress=replies.progress))

        await self.answer(interaction, work, private=False)

    async def _delete(self, interaction: Interaction, image_id: int) -> _Answer:
        reply = await self.service.delete_image(user_ref(interaction.user), image_id)
        message = interaction.message
        if message is not None:
            kept = [a for a in message.attachments if not _shows_image(a.filename, image_id)]
            await interaction.edit_original_response(
                attachments=kept, view=_view_without(message, image_id)
            )
        return _Answer(reply)

    async def agree_pressed(self, interaction: Interaction) -> None:
        async def work() -> _Answer:
            reply = await self.service.agree(user_ref(interaction.user))
            await interaction.edit_original_response(view=None)  # the button has done its job
            return _Answer(reply)

        replies = _InteractionReplies(self, interaction, private=True, update=True)
        await replies.acknowledge()
        await self._converse(replies, work)

    # --- direct messages ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Selfies sent by DM are enrolled (when `dm_uploads`); other DMs get a pointer to /help."""
        if message.author.bot or message.guild is not None:
            return
        if not message.attachments:
            await self._safe_reply(message, texts.DISCORD_DM_HINT)
            return
        if not self.settings.dm_uploads:
            await self._safe_reply(message, texts.DISCORD_DM_UPLOADS_OFF)
            return
        replies = _MessageReplies(self, message)
        attachments = list(message.attachments)
        try:
            await replies.acknowledge(texts.DISCORD_CHECKING_UPLOADS.format(count=len(attachments)))
        except discord.HTTPException as exc:
            _log.error("could not answer a direct message: %s", exc)
            return
        await self._converse(replies, lambda: self._enroll(message.author, attachments, replies))

    async def _safe_reply(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False)
        except discord.HTTPException as exc:
            _log.error("could not answer a direct message: %s", exc)


def _shows_image(filename: str, image_id: int) -> bool:
    match = _IMAGE_FILE.fullmatch(filename)
    return match is not None and int(match["image_id"]) == image_id


_TRAIN_CHOICES = [app_commands.Choice(name=m.value, value=m.value) for m in TrainingMethod]
_SUBJECT_CHOICES = [app_commands.Choice(name=word, value=word) for word in CLASS_WORD_CHOICES]
# Choices rather than free text: Discord shows them as a menu and refuses anything else itself.
_STYLE_CHOICES = [app_commands.Choice(name=s.title, value=s.name) for s in STYLES.values()]
_ASPECT_CHOICES = [app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS]
_PHOTO_DESCRIPTIONS = {
    name: texts.DISCORD_PHOTO_OPTION.format(n=n) for n, name in enumerate(PHOTO_OPTIONS, start=1)
}


class _Commands(commands.Cog, name="AvatarBooth"):
    """The slash commands; each hands over to the bot at once."""

    def __init__(self, bot: AvatarBoothBot) -> None:
        self.bot = bot

    @app_commands.command(name="start", description=texts.DISCORD_COMMANDS["start"])
    async def start(self, interaction: Interaction) -> None:
        await self.bot.start_command(interaction)

    @app_commands.command(name="agree", description=texts.DISCORD_COMMANDS["agree"])
    async def agree(self, interaction: Interaction) -> None:
        service = self.bot.service
        await self.bot.simple_command(interaction, lambda u, p: service.agree(u), private=True)

    @app_commands.command(name="enroll", description=texts.DISCORD_COMMANDS["enroll"])
    @app_commands.describe(**_PHOTO_DESCRIPTIONS)
    async def enroll(
        self,
        interaction: Interaction,
        photo1: discord.Attachment,
        photo2: discord.Attachment | None = None,
        photo3: discord.Attachment | None = None,
        photo4: discord.Attachment | None = None,
        photo5: discord.Attachment | None = None,
    ) -> None:
        given = [a for a in (photo1, photo2, photo3, photo4, photo5) if a is not None]
        await self.bot.enroll_command(interaction, given)

    @app_commands.command(name="photo", description=texts.DISCORD_COMMANDS["photo"])
    @app_commands.describe(**_PHOTO_DESCRIPTIONS)
    async def photo(
        self,
        interaction: Interaction,
        photo1: discord.Attachment,
        photo2: discord.Attachment | None = None,
        photo3: discord.Attachment | None = None,
        photo4: discord.Attachment | None = None,
        photo5: discord.Attachment | None = None,
    ) -> None:
        given = [a for a in (photo1, photo2, photo3, photo4, photo5) if a is not None]
        await self.bot.enroll_command(interaction, given)

    @app_commands.command(name="photos", description=texts.DISCORD_COMMANDS["photos"])
    async def photos(self, interaction: Interaction) -> None:
        service = self.bot.service
        await self.bot.simple_command(interaction, lambda u, p: service.photos(u), private=True)

    @app_commands.command(name="preview", description=texts.DISCORD_COMMANDS["preview"])
    @app_commands.describe(
        prompt=texts.DISCORD_PREVIEW_PROMPT_OPTION,
        style=texts.DISCORD_STYLE_OPTION,
        aspect=texts.DISCORD_ASPECT_OPTION,
    )
    @app_commands.choices(style=_STYLE_CHOICES, aspect=_ASPECT_CHOICES)
    async def preview(
        self,
        interaction: Interaction,
        prompt: str | None = None,
        style: str | None = None,
        aspect: str | None = None,
    ) -> None:
        service = self.bot.service
        await self.bot.simple_command(
            interaction,
            lambda u, p: service.preview(u, prompt, on_progress=p, style=style, aspect=aspect),
            private=False,
        )

    @app_commands.command(name="train", description=texts.DISCORD_COMMANDS["train"])
    @app_commands.describe(method=texts.DISCORD_TRAIN_METHOD_OPTION, subject=texts.DISCORD_TRAIN_SUBJECT_OPTION)
    @app_commands.choices(method=_TRAIN_CHOICES, subject=_SUBJECT_CHOICES)
    async def train(self, interaction: Interaction, method: str | None = None, subject: str | None = None) -> None:
        service = self.bot.service
        await self.bot.simple_command(
            interaction,
            lambda u, p: service.train(u, method, on_progress=p, class_word=subject),
            private=False,
            announce=True,
        )

    @app_commands.command(name="draw", description=texts.DISCORD_COMMANDS["draw"])
    @app_commands.describe(
        prompt=texts.DISCORD_DRAW_PROMPT_OPTION,
        style=texts.DISCORD_STYLE_OPTION,
        aspect=texts.DISCORD_ASPECT_OPTION,
        boost=texts.DISCORD_BOOST_OPTION,
    )
    @app_commands.choices(style=_STYLE_CHOICES, aspect=_ASPECT_CHOICES)
    async def draw(
        self,
        interaction: Interaction,
        prompt: str,
        style: str | None = None,
        aspect: str | None = None,
        boost: bool = False,
    ) -> None:
        service = self.bot.service
        await self.bot.simple_command(
            interaction,
            lambda u, p: service.draw(u, prompt, on_progress=p, style=style, aspect=aspect, boost=boost),
            private=False,
        )

    @app_commands.command(name="status", description=texts.DISCORD_COMMANDS["status"])
    async def status(self, interaction: Interaction) -> None:
        service = self.bot.service
        await self.bot.simple_command(interaction, lambda u, p: service.status(u), private=True)

    @app_commands.command(name="forget", description=texts.DISCORD_COMMANDS["forget"])
    async def forget(self, interaction: Interaction) -> None:
        service = self.bot.service
        await self.bot.simple_command(interaction, lambda u, p: service.forget(u), private=True)

    @app_commands.command(name="help", description=texts.DISCORD_COMMANDS["help"])
    async def help(self, interaction: Interaction) -> None:
        async def discord_help(user: UserRef, progress: Callable[[str], Awaitable[None]]) -> Reply:
            return Reply(texts.DISCORD_HELP)

        await self.bot.simple_command(interaction, discord_help, private=True)


# --- entry point -----------------------------------------------------------------------------------


async def serve_discord(
    service: BotService,
    settings: DiscordSettings,
    token: str,
    *,
    stop: asyncio.Event,
    **options: Any,
) -> None:
    """Run the Discord bot until `stop` is set (or it fails: a bad token raises LoginFailure).

    `token` comes from DISCORD_TOKEN; it is never logged. `options` go to `AvatarBoothBot`.
    """
    if not token.strip():
        raise ValueError("DISCORD_TOKEN is empty: set it in the environment or in .env")
    async with AvatarBoothBot(service, settings, **options) as bot:
        running = asyncio.create_task(bot.start(token), name="discord-bot")
        stopping = asyncio.create_task(stop.wait(), name="discord-stop")
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not running.done():
                await bot.close()
            await asyncio.gather(running, stopping, return_exceptions=True)
        error = running.exception() if running.done() and not running.cancelled() else None
        if error is not None:
            raise error


__all__ = [
    "AgreeButton",
    "AvatarBoothBot",
    "DiscordSettings",
    "ImageButton",
    "fit_under",
    "serve_discord",
]
