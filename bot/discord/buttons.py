"""The buttons: Reroll / More like this / 2× upscale / Delete under results, and I agree under /start.

Their custom ids are the ones every adapter uses (`bot.chat.actions`): they carry what the button
does, whose it is and which image it acts on, so one `DynamicItem` (`ChatButton`) resolves them after
a restart and only for their owner. Ids of the previous release still decode, so buttons already
sent keep working. A press is answered by the commands Cog, found on the bot by its name
(`COG_NAME`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import discord
from discord.ext import commands

from bot import texts
from bot.chat.actions import PATTERN, Action, Verb, decode
from bot.discord.platform import Interaction
from bot.service import ImageOut

COG_NAME = "AvatarBooth"  # the Cog that answers presses

BUTTON_LABELS = {verb: texts.BUTTON_LABELS[verb] for verb in (Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.DELETE)}
"""The buttons under each result, in the order shown (Discord has no full-size button: the
attachment is the file)."""

_STYLES = {Verb.AGREE: discord.ButtonStyle.primary, Verb.DELETE: discord.ButtonStyle.danger}


@runtime_checkable
class ButtonPresses(Protocol):
    """What answers a press by the button's owner."""

    async def image_action(self, interaction: Interaction, verb: Verb, image_id: int) -> None: ...

    async def agree_pressed(self, interaction: Interaction) -> None: ...


def presses_of(interaction: Interaction) -> ButtonPresses | None:
    """The Cog registered under `COG_NAME` on the interaction's bot, if there is one."""
    client = interaction.client
    cog = client.get_cog(COG_NAME) if isinstance(client, commands.Bot) else None
    return cog if isinstance(cog, ButtonPresses) else None


class ChatButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=PATTERN,
):
    """Any of our buttons; only the user it was made for may press it.

    `action` is None for an id that matches the template but is none of ours (forged, out of
    range, a verb Discord never shows): such a press is refused like someone else's.
    """

    def __init__(self, button: discord.ui.Button[discord.ui.View], action: Action | None) -> None:
        super().__init__(button)
        self.action = action

    @classmethod
    def of(cls, action: Action, *, label: str, row: int | None = None) -> ChatButton:
        """A new button for `action`."""
        style = _STYLES.get(action.verb, discord.ButtonStyle.secondary)
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label=label, style=style, custom_id=action.encode(), row=row
        )
        return cls(button, action)

    @classmethod
    async def from_custom_id(
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ChatButton:
        action = decode(match.group(0))
        if action is not None and action.verb is not Verb.AGREE and action.verb not in BUTTON_LABELS:
            action = None
        return cls(discord.ui.Button(custom_id=match.group(0)), action)

    async def interaction_check(self, interaction: Interaction, /) -> bool:
        action = self.action
        if action is not None and action.belongs_to(interaction.user.id):
            return True
        agree = action is not None and action.verb is Verb.AGREE
        refusal = texts.DISCORD_NOT_YOUR_CONSENT if agree else texts.NOT_YOUR_IMAGE
        await interaction.response.send_message(refusal, ephemeral=True)
        return False

    async def callback(self, interaction: Interaction) -> None:
        presses = presses_of(interaction)
        if presses is None or self.action is None:
            return
        if self.action.verb is Verb.AGREE:
            await presses.agree_pressed(interaction)
        else:
            await presses.image_action(interaction, self.action.verb, self.action.image_id)


def consent_view(owner_id: int) -> discord.ui.View:
    """The I agree button for the user who ran /start."""
    view = discord.ui.View(timeout=None)
    view.add_item(ChatButton.of(Action(Verb.AGREE, owner_id), label=texts.BUTTON_LABELS[Verb.AGREE]))
    return view


def result_view(images: Sequence[ImageOut], owner_id: int) -> discord.ui.View | None:
    """One row of buttons per image (Discord allows 5 rows); numbered when there are several."""
    buttons = []
    for number, image in enumerate(images[:5], start=1):
        for verb, label in BUTTON_LABELS.items():
            text = f"{label} {number}" if len(images) > 1 else label
            buttons.append((Action(verb, owner_id, image.image_id), text))
    return view_of(buttons)


def view_of(buttons: Sequence[tuple[Action, str]]) -> discord.ui.View | None:
    """A never-expiring view of image buttons and their labels, one row per image, in the order given."""
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    rows: dict[int, int] = {}
    for action, label in buttons:
        row = rows.setdefault(action.image_id, len(rows))
        view.add_item(ChatButton.of(action, label=label, row=row))
    return view


def view_without(message: discord.Message | None, image_id: int) -> discord.ui.View | None:
    """The message's image buttons less those of `image_id` (in the current id format)."""
    if message is None:
        return None
    kept: list[tuple[Action, str]] = []
    for row in message.components:
        for child in getattr(row, "children", []):
            action = decode(getattr(child, "custom_id", None))
            if action is None or action.verb not in BUTTON_LABELS or action.image_id == image_id:
                continue
            kept.append((action, getattr(child, "label", None) or ""))
    return view_of(kept)


def view_kwargs(view: discord.ui.View | None) -> dict[str, Any]:
    """``view=`` for a send call when there are buttons, else nothing."""
    return {} if view is None else {"view": view}
