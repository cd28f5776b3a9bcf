"""Where one command's replies go, and images that fit under Discord's upload limit.

How an interaction is answered (`InteractionReplies`):

- it is acknowledged first (a deferred response, ephemeral for private replies), before any
  download or queue call, well inside Discord's 3 s (a button may first check, with one quick
  database read, that its image is the presser's: `Conversations.answer`'s ``check``);
- progress is edited into that response while its token is valid (15 min, less a margin); near the
  end of that window the response says the result will come as a new message;
- results that come late (training; anything after the token ran out) arrive as a new message that
  mentions the user, in the channel or, failing that, by DM;
- images go out under the upload limit (the interaction's, at most 10 MiB elsewhere), re-encoded
  when larger, with the buttons of `bot.discord.buttons` under them.

A direct message is answered by one status message, edited as work goes (`MessageReplies`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import discord
from PIL import Image, UnidentifiedImageError

from bot import texts
from bot.chat.progress import ProgressThrottle
from bot.discord.buttons import result_view, view_kwargs
from bot.discord.platform import Interaction, clip
from bot.service import ImageOut, Reply

_log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # bytes per file where no interaction says otherwise
ALBUM_SIZE = 10  # the most files one Discord message holds
TOKEN_LIFETIME = timedelta(minutes=15)
TOKEN_MARGIN = timedelta(seconds=60)  # stop using a token this long before it expires
_IMAGE_FILE = re.compile(r"avatarbooth-(?P<image_id>[0-9]+)\.[a-z]+")


# --- images under the upload limit -------------------------------------------------------------


@dataclass(frozen=True)
class ImageFile:
    """One image, fitted, under the name that `shows_image` recognises."""

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


def image_files(images: Sequence[ImageOut], limit: int) -> list[ImageFile]:
    """Read and fit each image (blocking: run it in a thread)."""
    files = []
    for image in images:
        data, suffix = fit_under(Path(image.path).read_bytes(), limit)
        files.append(ImageFile(f"avatarbooth-{image.image_id}{suffix}", data))
    return files


def album_messages(files: list[ImageFile]) -> list[list[ImageFile]]:
    """A pack's files split into messages of at most ALBUM_SIZE (one message, empty, for none)."""
    return [files[start : start + ALBUM_SIZE] for start in range(0, len(files), ALBUM_SIZE)] or [[]]


def shows_image(filename: str, image_id: int) -> bool:
    """Whether an attachment named `filename` is the file `image_files` made for `image_id`."""
    match = _IMAGE_FILE.fullmatch(filename)
    return match is not None and int(match["image_id"]) == image_id


# --- where one command's replies go ---------------------------------------------------------------


@dataclass
class Answer:
    """What a command produced: the service's reply, and buttons of its own (e.g. consent)."""

    reply: Reply
    view: discord.ui.View | None = None


class Replies(Protocol):
    """Where progress and the answer of one command go."""

    async def progress(self, line: str) -> None: ...

    async def deliver(self, answer: Answer, *, announce: bool) -> None: ...

    async def close(self) -> None: ...


class InteractionReplies:
    """Replies to one interaction: acknowledge, progress into the response, then the result.

    `update=True` is for buttons that change their own message (delete, agree): the acknowledgement
    shows nothing and the reply text goes out as a private follow-up.
    """

    def __init__(
        self,
        interaction: Interaction,
        *,
        private: bool,
        progress_interval_s: float,
        update: bool = False,
    ) -> None:
        self._interaction = interaction
        self._private = private
        self._update = update
        self._deadline = interaction.created_at + TOKEN_LIFETIME - TOKEN_MARGIN
        self._progress = ProgressThrottle(self._edit_progress, progress_interval_s)
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
            self._progress.push(line)

    async def _edit_progress(self, line: str) -> bool:
        if not self._token_usable():
            return False
        try:
            await self._interaction.edit_original_response(content=clip(line))
        except discord.HTTPException as exc:
            _log.warning("could not show progress on Discord: %s", exc)
            return False
        return True

    async def _hand_off_at_deadline(self) -> None:
        """Before the token runs out, say that the result will come as a new message."""
        delay = (self._deadline - discord.utils.utcnow()).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        self._handed_off = True
        await self._progress.close()
        note = texts.DISCORD_HANDOFF
        if self._last_line:
            note = f"{self._last_line}\n{note}"
        try:
            await self._interaction.edit_original_response(content=clip(note))
        except discord.HTTPException as exc:
            _log.warning("could not hand a Discord response over to a new message: %s", exc)

    async def deliver(self, answer: Answer, *, announce: bool) -> None:
        await self._stop_progress()
        reply = answer.reply
        user = self._interaction.user
        if self._update:
            await self._interaction.followup.send(clip(reply.text), ephemeral=True)
            return
        if reply.album:
            await self._deliver_album(reply)
            return
        if announce or not self._token_usable():
            await self._announce(reply, answer.view)
            return
        files = await self._files(reply.images, self._interaction.filesize_limit)
        view = answer.view or result_view(reply.images, user.id)
        await self._interaction.edit_original_response(
            content=clip(reply.text), attachments=[f.to_file() for f in files], view=view
        )

    async def _announce(self, reply: Reply, view: discord.ui.View | None) -> None:
        """A new message mentioning the user: a follow-up while the token lives, else channel or DM."""
        user = self._interaction.user
        content = clip(f"{user.mention} {reply.text}")
        mentions = discord.AllowedMentions(users=[user])
        buttons = view_kwargs(view or result_view(reply.images, user.id))
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
        await user.send(clip(reply.text), files=[f.to_file() for f in files], **buttons)

    async def _deliver_album(self, reply: Reply) -> None:
        """A pack: the reply with its first 10 images (a message's most), then messages of 10 more;
        no buttons (one row per image would not fit)."""
        limit = min(self._interaction.filesize_limit, DEFAULT_UPLOAD_LIMIT)
        files = await self._files(reply.images, limit)
        chunks = album_messages(files)
        if self._token_usable():
            await self._interaction.edit_original_response(
                content=clip(reply.text), attachments=[f.to_file() for f in chunks[0]]
            )
            for chunk in chunks[1:]:
                await self._interaction.followup.send(files=[f.to_file() for f in chunk])
            return
        user = self._interaction.user
        channel = self._interaction.channel
        place: discord.abc.Messageable = channel if isinstance(channel, discord.abc.Messageable) and not self._private else user
        mentions = discord.AllowedMentions(users=[user])
        for number, chunk in enumerate(chunks):
            content = clip(f"{user.mention} {reply.text}") if number == 0 else None
            await place.send(content, files=[f.to_file() for f in chunk], allowed_mentions=mentions)

    async def _files(self, images: Sequence[ImageOut], limit: int) -> list[ImageFile]:
        return await asyncio.to_thread(image_files, images, limit)

    async def _stop_progress(self) -> None:
        if self._handoff is not None and not self._handoff.done():
            self._handoff.cancel()
            await asyncio.gather(self._handoff, return_exceptions=True)
        await self._progress.close()

    async def close(self) -> None:
        await self._stop_progress()


class MessageReplies:
    """Replies to a direct message (selfies sent by DM): one status message, edited as work goes."""

    def __init__(self, message: discord.Message, *, progress_interval_s: float) -> None:
        self._message = message
        self._status: discord.Message | None = None
        self._progress = ProgressThrottle(self._edit_progress, progress_interval_s)

    async def acknowledge(self, text: str) -> None:
        self._status = await self._message.reply(clip(text), mention_author=False)

    async def _edit(self, text: str) -> None:
        if self._status is not None:
            await self._status.edit(content=text)

    async def _edit_progress(self, line: str) -> bool:
        if self._status is None:
            return False
        try:
            await self._edit(clip(line))
        except discord.HTTPException as exc:
            _log.warning("could not show progress on Discord: %s", exc)
            return False
        return True

    async def progress(self, line: str) -> None:
        self._progress.push(line)

    async def deliver(self, answer: Answer, *, announce: bool) -> None:
        await self._progress.close()
        await self._edit(clip(answer.reply.text))

    async def close(self) -> None:
        await self._progress.close()
