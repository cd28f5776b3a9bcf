"""The slash commands and the answers to button presses, as one Cog over the injected `BotService`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot import texts
from bot.chat.actions import Verb
from bot.chat.intake import Incoming, NotReceived, take_photos
from bot.discord.buttons import COG_NAME, consent_view, view_without
from bot.discord.conversations import Conversations
from bot.discord.platform import Interaction, user_ref
from bot.discord.replies import Answer, InteractionReplies, Replies, shows_image
from bot.replies import Offer
from bot.service import BotService, Reply, UserRef
from bot.packs import load_packs
from bot.settings import CLASS_WORD_CHOICES
from bot.styles import STYLES
from engine.api import ASPECT_RATIOS, TrainingMethod

_log = logging.getLogger(__name__)

PHOTO_OPTIONS = ("photo1", "photo2", "photo3", "photo4", "photo5")
_TRAIN_CHOICES = [app_commands.Choice(name=m.value, value=m.value) for m in TrainingMethod]
_SUBJECT_CHOICES = [app_commands.Choice(name=word, value=word) for word in CLASS_WORD_CHOICES]
# Choices rather than free text: Discord shows them as a menu and refuses anything else itself.
_STYLE_CHOICES = [app_commands.Choice(name=s.title, value=s.name) for s in STYLES.values()]
# A menu of the packs shipped in bot/packs.toml (checked when the service is built, too).
_PACK_CHOICES = [app_commands.Choice(name=p.title, value=p.name) for p in load_packs().values()][:25]
_ASPECT_CHOICES = [app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS]
_PHOTO_DESCRIPTIONS = {
    name: texts.DISCORD_PHOTO_OPTION.format(n=n) for n, name in enumerate(PHOTO_OPTIONS, start=1)
}

Progress = Callable[[str], Awaitable[None]]
ServiceCall = Callable[[UserRef, Progress], Awaitable[Reply]]


class SlashCommands(commands.Cog, name=COG_NAME):
    """Every command is a call on the service; `conversations` acknowledges it and delivers the reply."""

    def __init__(self, service: BotService, conversations: Conversations) -> None:
        self.service = service
        self.conversations = conversations

    async def _answer_service_call(
        self, interaction: Interaction, call: ServiceCall, *, private: bool, announce: bool = False
    ) -> None:
        """A command that is one service call (with progress) and one reply."""

        async def work(replies: InteractionReplies) -> Answer:
            return Answer(await call(user_ref(interaction.user), replies.progress))

        await self.conversations.answer(interaction, work, private=private, announce=announce)

    async def enroll_attachments(
        self, user: discord.abc.User, attachments: Sequence[discord.Attachment], replies: Replies
    ) -> Answer:
        """Check the attachments (fetched at once: their URLs expire) and answer with one reply."""
        files = [_incoming(attachment) for attachment in attachments]
        return Answer(await take_photos(self.service, user_ref(user), files, on_progress=replies.progress))

    async def _enroll(self, interaction: Interaction, attachments: Sequence[discord.Attachment]) -> None:
        async def work(replies: InteractionReplies) -> Answer:
            return await self.enroll_attachments(interaction.user, attachments, replies)

        await self.conversations.answer(interaction, work, private=True)

    # --- buttons (see bot.discord.buttons) ------------------------------------------------------

    async def image_action(self, interaction: Interaction, verb: Verb, image_id: int) -> None:
        """A press on a result button by its owner (checked again by the service)."""
        user = user_ref(interaction.user)
        if verb is Verb.DELETE:
            replies = self.conversations.replies_to(interaction, private=True, update=True)
            await replies.acknowledge()
            await self.conversations.converse(replies, lambda: self._delete(interaction, image_id))
            return

        async def work(replies: InteractionReplies) -> Answer:
            if verb is Verb.REROLL:
                return Answer(await self.service.reroll(user, image_id, on_progress=replies.progress))
            if verb is Verb.UPSCALE:  # an attachment is the file itself: nothing recompresses it
                return Answer(await self.service.upscale(user, image_id, on_progress=replies.progress))
            return Answer(await self.service.more_like(user, image_id, on_progress=replies.progress))

        # A forged button (its owner's id on someone else's image) is refused before a public
        # "thinking..." could open for it.
        await self.conversations.answer(
            interaction, work, private=False, check=lambda: self.service.check_image(user, image_id)
        )

    async def _delete(self, interaction: Interaction, image_id: int) -> Answer:
        reply = await self.service.delete_image(user_ref(interaction.user), image_id)
        message = interaction.message
        if message is not None:
            kept = [a for a in message.attachments if not shows_image(a.filename, image_id)]
            await interaction.edit_original_response(
                attachments=kept, view=view_without(message, image_id)
            )
        return Answer(reply)

    async def agree_pressed(self, interaction: Interaction) -> None:
        """The consent button under /start, pressed by the user who ran /start."""

        async def work() -> Answer:
            reply = await self.service.agree(user_ref(interaction.user))
            await interaction.edit_original_response(view=None)  # the button has done its job
            return Answer(reply)

        replies = self.conversations.replies_to(interaction, private=True, update=True)
        await replies.acknowledge()
        await self.conversations.converse(replies, work)

    # --- the commands ---------------------------------------------------------------------------

    @app_commands.command(name="start", description=texts.DISCORD_COMMANDS["start"])
    async def start(self, interaction: Interaction) -> None:
        async def work(replies: InteractionReplies) -> Answer:
            reply = await self.service.start(user_ref(interaction.user))
            if Offer.CONSENT not in reply.offers:  # agreed already
                return Answer(reply)
            reply.add("", texts.DISCORD_CONSENT_BUTTON_HINT)
            return Answer(reply, consent_view(interaction.user.id))

        await self.conversations.answer(interaction, work, private=True)

    @app_commands.command(name="agree", description=texts.DISCORD_COMMANDS["agree"])
    async def agree(self, interaction: Interaction) -> None:
        await self._answer_service_call(interaction, lambda u, p: self.service.agree(u), private=True)

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
        await self._enroll(interaction, given)

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
        await self._enroll(interaction, given)

    @app_commands.command(name="photos", description=texts.DISCORD_COMMANDS["photos"])
    async def photos(self, interaction: Interaction) -> None:
        await self._answer_service_call(interaction, lambda u, p: self.service.photos(u), private=True)

    @app_commands.command(name="preview", description=texts.DISCORD_COMMANDS["preview"])
    @app_commands.describe(
        prompt=texts.DISCORD_PREVIEW_PROMPT_OPTION,
        style=texts.DISCORD_STYLE_OPTION,
        aspect=texts.DISCORD_ASPECT_OPTION,
        fast=texts.DISCORD_FAST_OPTION,
    )
    @app_commands.choices(style=_STYLE_CHOICES, aspect=_ASPECT_CHOICES)
    async def preview(
        self,
        interaction: Interaction,
        prompt: str | None = None,
        style: str | None = None,
        aspect: str | None = None,
        fast: bool = False,
    ) -> None:
        await self._answer_service_call(
            interaction,
            lambda u, p: self.service.preview(u, prompt, on_progress=p, style=style, aspect=aspect, fast=fast),
            private=False,
        )

    @app_commands.command(name="train", description=texts.DISCORD_COMMANDS["train"])
    @app_commands.describe(method=texts.DISCORD_TRAIN_METHOD_OPTION, subject=texts.DISCORD_TRAIN_SUBJECT_OPTION)
    @app_commands.choices(method=_TRAIN_CHOICES, subject=_SUBJECT_CHOICES)
    async def train(self, interaction: Interaction, method: str | None = None, subject: str | None = None) -> None:
        await self._answer_service_call(
            interaction,
            lambda u, p: self.service.train(u, method, on_progress=p, class_word=subject),
            private=False,
            announce=True,
        )

    @app_commands.command(name="draw", description=texts.DISCORD_COMMANDS["draw"])
    @app_commands.describe(
        prompt=texts.DISCORD_DRAW_PROMPT_OPTION,
        style=texts.DISCORD_STYLE_OPTION,
        aspect=texts.DISCORD_ASPECT_OPTION,
        boost=texts.DISCORD_BOOST_OPTION,
        fast=texts.DISCORD_FAST_OPTION,
    )
    @app_commands.choices(style=_STYLE_CHOICES, aspect=_ASPECT_CHOICES)
    async def draw(
        self,
        interaction: Interaction,
        prompt: str,
        style: str | None = None,
        aspect: str | None = None,
        boost: bool = False,
        fast: bool = False,
    ) -> None:
        await self._answer_service_call(
            interaction,
            lambda u, p: self.service.draw(
                u, prompt, on_progress=p, style=style, aspect=aspect, boost=boost, fast=fast
            ),
            private=False,
        )

    @app_commands.command(name="pack", description=texts.DISCORD_COMMANDS["pack"])
    @app_commands.describe(name=texts.DISCORD_PACK_OPTION)
    @app_commands.choices(name=_PACK_CHOICES)
    async def pack(self, interaction: Interaction, name: str | None = None) -> None:
        await self._answer_service_call(
            interaction, lambda u, p: self.service.pack(u, name, on_progress=p), private=name is None
        )

    @app_commands.command(name="status", description=texts.DISCORD_COMMANDS["status"])
    async def status(self, interaction: Interaction) -> None:
        await self._answer_service_call(interaction, lambda u, p: self.service.status(u), private=True)

    @app_commands.command(name="forget", description=texts.DISCORD_COMMANDS["forget"])
    async def forget(self, interaction: Interaction) -> None:
        await self._answer_service_call(interaction, lambda u, p: self.service.forget(u), private=True)

    @app_commands.command(name="help", description=texts.DISCORD_COMMANDS["help"])
    async def help(self, interaction: Interaction) -> None:
        async def discord_help(user: UserRef, progress: Progress) -> Reply:
            return Reply(texts.DISCORD_HELP)

        await self._answer_service_call(interaction, discord_help, private=True)


def _incoming(attachment: discord.Attachment) -> Incoming:
    async def read() -> bytes:
        try:
            return await attachment.read()
        except (discord.HTTPException, OSError) as exc:
            _log.warning("could not download a Discord attachment: %s", exc)
            raise NotReceived(texts.DISCORD_DOWNLOAD_FAILED) from exc

    return Incoming(attachment.filename, attachment.size, read)
