"""The Discord bot: `AvatarBoothBot` and `serve_discord`, which runs it until a stop event.

`AvatarBoothBot` is a `commands.Bot` that receives the `BotService` and its `DiscordSettings` through
its constructor and hands the service to the `SlashCommands` Cog; `setup_hook` adds that Cog and the
persistent buttons and syncs the slash commands (to the configured guilds, or globally). The bot
itself answers direct messages, delivers work finished while it was down, and stops what still runs
when it closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import texts
from bot.chat.failures import failure_text
from bot.discord.buttons import ChatButton, result_view, view_kwargs
from bot.discord.commands import SlashCommands
from bot.discord.conversations import Conversations
from bot.discord.platform import PLATFORM, Interaction, clip
from bot.discord.replies import DEFAULT_UPLOAD_LIMIT, album_messages, image_files
from bot.discord.settings import DiscordSettings
from bot.service import BotService, Reply, ResumedWork

_log = logging.getLogger(__name__)


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
        self.conversations = Conversations(progress_interval_s=progress_interval_s)
        self.slash_commands = SlashCommands(service, self.conversations)
        self._resumed = resumed
        self._delivering: asyncio.Task[None] | None = None
        self.tree.error(self._on_command_error)

    async def setup_hook(self) -> None:
        """Register the persistent buttons (so old messages' buttons work) and sync the commands;
        then send what finished while the bot was down."""
        self.add_dynamic_items(ChatButton)
        await self.add_cog(self.slash_commands)
        await self._sync_commands()
        if self._resumed is not None:
            self._delivering = asyncio.create_task(self._deliver_all_resumed(self._resumed))

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

    async def _deliver_all_resumed(self, resumed: ResumedWork) -> None:
        async for user, reply in resumed.replies(PLATFORM):
            if not user.platform_user_id.isdigit():
                continue
            self.conversations.spawn(self._deliver_resumed(int(user.platform_user_id), reply))

    async def _deliver_resumed(self, user_id: int, reply: Reply) -> None:
        """One user's finished work, with its buttons, in a direct message."""
        try:
            channel = await self.create_dm(discord.Object(user_id))
            files = await asyncio.to_thread(image_files, reply.images, DEFAULT_UPLOAD_LIMIT)
            if reply.album:  # a pack: messages of 10 files, no buttons
                for number, chunk in enumerate(album_messages(files)):
                    await channel.send(clip(reply.text) if number == 0 else None, files=[f.to_file() for f in chunk])
                return
            await channel.send(
                clip(reply.text),
                files=[f.to_file() for f in files],
                **view_kwargs(result_view(reply.images, user_id)),
            )
        except discord.HTTPException as exc:  # e.g. the user does not accept DMs from the bot
            _log.warning("could not deliver finished work to a Discord user: %s", exc)

    async def close(self) -> None:
        """Stop commands still running (each tells its user), then disconnect."""
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)
        await self.conversations.stop_all()
        await super().close()

    async def _on_command_error(
        self, interaction: Interaction, error: app_commands.AppCommandError
    ) -> None:
        """Errors discord.py raises before our command runs (stale commands, bad options)."""
        if isinstance(error, (app_commands.CommandNotFound, app_commands.CommandSignatureMismatch)):
            text = texts.DISCORD_COMMAND_OUTDATED
        elif isinstance(error, app_commands.TransformerError):
            text = texts.DISCORD_BAD_OPTION
        else:  # a command that raised: what escaped it is said the way every adapter says it
            cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
            text = failure_text(cause, PLATFORM)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            _log.error("could not report a command error on Discord: %s", exc)

    # --- direct messages ------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        """Selfies sent by DM are enrolled (when `dm_uploads`); other DMs get a pointer to /help."""
        if message.author.bot or message.guild is not None:
            return
        if not message.attachments:
            await self._answer_dm(message, texts.DISCORD_DM_HINT)
            return
        if not self.settings.dm_uploads:
            await self._answer_dm(message, texts.DISCORD_DM_UPLOADS_OFF)
            return
        replies = self.conversations.replies_to_message(message)
        attachments = list(message.attachments)
        try:
            await replies.acknowledge(texts.DISCORD_CHECKING_UPLOADS.format(count=len(attachments)))
        except discord.HTTPException as exc:
            _log.error("could not answer a direct message: %s", exc)
            return
        enroll = self.slash_commands.enroll_attachments
        await self.conversations.converse(replies, lambda: enroll(message.author, attachments, replies))

    async def _answer_dm(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False)
        except discord.HTTPException as exc:
            _log.error("could not answer a direct message: %s", exc)


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


__all__ = ["AvatarBoothBot", "intents", "serve_discord"]
