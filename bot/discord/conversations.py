"""Running commands: each one's replies, the one place where errors become replies, and shutdown.

`Conversations` is the one place where a `BotError` (or anything unexpected) becomes a reply, in
the words every adapter uses (`bot.chat.failures`). Every command and delivery still running is
in one `bot.chat.tasks.TaskSet`, so that `stop_all` can stop them when the bot closes (each tells
its user).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import discord

from bot import texts
from bot.chat.failures import failure_text
from bot.chat.tasks import TaskSet
from bot.discord.platform import PLATFORM, Interaction
from bot.discord.replies import Answer, InteractionReplies, MessageReplies, Replies
from bot.service import Reply

_log = logging.getLogger(__name__)


class Conversations:
    """The commands in progress on one bot, and how their replies are made."""

    def __init__(self, *, progress_interval_s: float) -> None:
        self.progress_interval_s = progress_interval_s
        self._tasks = TaskSet("Discord")

    def replies_to(
        self, interaction: Interaction, *, private: bool, update: bool = False
    ) -> InteractionReplies:
        """Replies to `interaction` (see `InteractionReplies` for `update`)."""
        return InteractionReplies(
            interaction, private=private, update=update, progress_interval_s=self.progress_interval_s
        )

    def replies_to_message(self, message: discord.Message) -> MessageReplies:
        """Replies to a direct message."""
        return MessageReplies(message, progress_interval_s=self.progress_interval_s)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, stopped too when the bot closes (e.g. a delivery of
        resumed work)."""
        self._tasks.spawn(work)

    async def answer(
        self,
        interaction: Interaction,
        work: Callable[[InteractionReplies], Awaitable[Answer]],
        *,
        private: bool,
        announce: bool = False,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Acknowledge at once, then run `work` and deliver its answer.

        `check` (quick: it runs inside Discord's 3 s) may refuse the command before anything is
        acknowledged; its error is the only reply, and a private one.
        """
        if check is not None and not await self._passes(interaction, check):
            return
        replies = self.replies_to(interaction, private=private)
        await replies.acknowledge()
        await self.converse(replies, lambda: work(replies), announce=announce)

    async def _passes(self, interaction: Interaction, check: Callable[[], Awaitable[None]]) -> bool:
        try:
            await check()
            return True
        except Exception as exc:
            text = failure_text(exc, PLATFORM)
        try:
            await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            _log.error("could not deliver a refusal on Discord: %s", exc)
        return False

    async def converse(
        self, replies: Replies, work: Callable[[], Awaitable[Answer]], *, announce: bool = False
    ) -> None:
        """Run a command and deliver its answer: the one place where errors become replies."""
        with self._tasks.tracking(asyncio.current_task()):  # discord.py's task: stopped on close
            try:
                try:
                    answer = await work()
                except asyncio.CancelledError:  # the bot is shutting down
                    await _say_interrupted(replies)
                    raise
                except Exception as exc:
                    answer = Answer(Reply(failure_text(exc, PLATFORM)))
                await replies.deliver(answer, announce=announce)
            except discord.HTTPException as exc:
                _log.error("could not deliver a reply on Discord: %s", exc)
            except Exception:
                _log.exception("could not deliver a reply on Discord")
            finally:
                await replies.close()

    async def stop_all(self) -> None:
        """Cancel every command and delivery still running, and wait for them to finish."""
        await self._tasks.cancel_all()


async def _say_interrupted(replies: Replies) -> None:
    """Best effort, briefly: the session closes right after."""
    try:
        await asyncio.wait_for(
            replies.deliver(Answer(Reply(texts.DISCORD_INTERRUPTED)), announce=False), 5.0
        )
    except (discord.HTTPException, asyncio.TimeoutError) as exc:
        _log.warning("could not tell a user that the bot stopped: %s", exc)
