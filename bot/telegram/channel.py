"""Where a command's answers go (`Channel`), and the progress message edited while it runs.

Progress of previews, training and draws is edited into one message, at most every
``progress_interval_s``. A group command is answered in the user's private chat, and the group is
pointed there (or told how to open it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from telegram import Bot, InlineKeyboardMarkup, InputMediaPhoto, Message, ReplyParameters
from telegram.error import BadRequest, Forbidden, TelegramError

from bot import texts
from bot.chat.progress import ProgressThrottle
from bot.telegram.clock import now

_log = logging.getLogger(__name__)

PHOTO_CHECK = texts.progress(texts.job_label("check_photo"), {})  # "photo check..."

_T = TypeVar("_T")


class Unreachable(Exception):
    """The user's private chat is closed to the bot; the group was told how to open it."""


class Channel:
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
        self._progress: ProgressMessage | None = None

    async def send(self, text: str, markup: InlineKeyboardMarkup | None = None) -> Message:
        return await self._deliver(
            self.bot.send_message(
                self.chat_id, text, reply_markup=markup, reply_parameters=self._reply_parameters()
            )
        )

    async def send_photo(
        self, data: bytes, filename: str, caption: str, markup: InlineKeyboardMarkup | None
    ) -> Message:
        return await self._deliver(
            self.bot.send_photo(
                self.chat_id, data, caption=caption, filename=filename, reply_markup=markup,
                reply_parameters=self._reply_parameters(),
            )
        )

    async def send_album(self, photos: Sequence[tuple[bytes, str, str]]) -> Sequence[Message]:
        """2 to 10 photos (data, file name, caption) as one album; albums carry no buttons."""
        media = [InputMediaPhoto(data, caption=caption, filename=name) for data, name, caption in photos]
        return await self._deliver(
            self.bot.send_media_group(self.chat_id, media, reply_parameters=self._reply_parameters())
        )

    async def send_document(
        self, data: bytes, filename: str, caption: str | None, markup: InlineKeyboardMarkup | None
    ) -> Message:
        return await self._deliver(
            self.bot.send_document(
                self.chat_id, data, caption=caption, filename=filename, reply_markup=markup,
                reply_parameters=self._reply_parameters(),
            )
        )

    async def remove_buttons(self, message_id: int) -> None:
        await self.bot.edit_message_reply_markup(self.chat_id, message_id, reply_markup=None)

    async def delete(self, message_id: int) -> None:
        await self.bot.delete_message(self.chat_id, message_id)

    async def open_progress(self, text: str) -> ProgressMessage:
        self._progress = ProgressMessage(self, self._interval)
        await self._progress.open(text)
        return self._progress

    async def fail(self, text: str) -> None:
        """Say what went wrong: in the open progress message if there is one, else anew."""
        if self._progress is not None and not self._progress.closed:
            await self._progress.finish(text)
        else:
            await self.send(text)

    def _reply_parameters(self) -> ReplyParameters | None:
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
            raise Unreachable() from None
        if self._group is not None and not self._pointed:
            self._pointed = True
            group_id, message_id = self._group
            await quietly(
                self.bot.send_message(
                    group_id, texts.TELEGRAM_ANSWERED_PRIVATELY,
                    reply_parameters=ReplyParameters(message_id, allow_sending_without_reply=True),
                )
            )
        return sent


class ProgressMessage:
    """One message edited as progress lines come in, at most once per ``interval`` seconds.

    `update` never waits on Telegram: the shared `ProgressThrottle` shows the newest line when the
    interval allows and skips the lines in between. `finish` shows the final text.
    """

    def __init__(self, channel: Channel, interval: float) -> None:
        self._channel = channel
        self._message: Message | None = None
        self._shown = ""
        self._throttle = ProgressThrottle(self._edit, interval, clock=now)

    @property
    def closed(self) -> bool:
        return self._throttle.closed

    async def open(self, text: str) -> None:
        self._message = await self._channel.send(text)
        self._shown = text
        self._throttle.shown(text)  # the first edit waits its interval

    async def update(self, line: str) -> None:
        self._throttle.push(line)

    async def finish(self, text: str) -> None:
        """Show ``text`` now (a new message if the old one is gone); no more progress after it."""
        await self._throttle.close()
        if not await self._edit(text):
            await self._channel.send(text)

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
        self._shown = text
        return True


async def acknowledge(channel: Channel) -> ProgressMessage | None:
    """The "photo check..." message an album's answer will be edited into; None if it failed."""
    try:
        return await channel.open_progress(PHOTO_CHECK)
    except TelegramError as exc:
        _log.warning("could not acknowledge an album: %s", exc)
        return None


async def quietly(sending: Awaitable[object]) -> None:
    """Send something whose failure must not hide the reply it is part of (logged, not raised)."""
    try:
        await sending
    except Unreachable:
        pass
    except TelegramError as exc:
        _log.warning("Telegram refused a request: %s", exc)
