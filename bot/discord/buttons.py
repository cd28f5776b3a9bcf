"""The buttons: Reroll / More like this / Delete under results, and I agree under /start.

Their custom ids carry what they act on and who may press them (`ab:<action>:<image id>:<user id>`,
`ab:agree:<user id>`), so they are `DynamicItem`s that resolve after a restart and only for their owner.
A press is answered by the commands Cog, found on the bot by its name (`COG_NAME`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import discord
from discord.ext import commands

from bot import texts
from bot.discord.platform import Interaction
from bot.service import ImageOut

REROLL, MORE, DELETE = "reroll", "more", "delete"
COG_NAME = "AvatarBooth"  # the Cog that answers presses

BUTTON_LABELS = {
    REROLL: texts.DISCORD_REROLL_BUTTON,
    MORE: texts.DISCORD_MORE_BUTTON,
    DELETE: texts.DISCORD_DELETE_BUTTON,
}


@runtime_checkable
class ButtonPresses(Protocol):
    """What answers a press by the button's owner."""

    async def image_action(self, interaction: Interaction, action: str, image_id: int) -> None: ...

    async def agree_pressed(self, interaction: Interaction) -> None: ...


def presses_of(interaction: Interaction) -> ButtonPresses | None:
    """The Cog registered under `COG_NAME` on the interaction's bot, if there is one."""
    client = interaction.client
    cog = client.get_cog(COG_NAME) if isinstance(client, commands.Bot) else None
    return cog if isinstance(cog, ButtonPresses) else None


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
        return await only_for(interaction, self.owner_id, texts.NOT_YOUR_IMAGE)

    async def callback(self, interaction: Interaction) -> None:
        presses = presses_of(interaction)
        if presses is not None:
            await presses.image_action(interaction, self.action, self.image_id)


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
        return await only_for(interaction, self.owner_id, texts.DISCORD_NOT_YOUR_CONSENT)

    async def callback(self, interaction: Interaction) -> None:
        presses = presses_of(interaction)
        if presses is not None:
            await presses.agree_pressed(interaction)


async def only_for(interaction: Interaction, owner_id: int, refusal: str) -> bool:
    """True for the button's owner; anyone else gets a private refusal."""
    if interaction.user.id == owner_id:
        return True
    await interaction.response.send_message(refusal, ephemeral=True)
    return False


def consent_view(owner_id: int) -> discord.ui.View:
    """The I agree button for the user who ran /start."""
    view = discord.ui.View(timeout=None)
    view.add_item(AgreeButton(owner_id))
    return view


def result_view(images: Sequence[ImageOut], owner_id: int) -> discord.ui.View | None:
    """One row of buttons per image (Discord allows 5 rows); numbered when there are several."""
    buttons = []
    for number, image in enumerate(images[:5], start=1):
        for action, label in BUTTON_LABELS.items():
            text = f"{label} {number}" if len(images) > 1 else label
            buttons.append((action, image.image_id, text))
    return view_of(buttons, owner_id)


def view_of(buttons: Sequence[tuple[str, int, str]], owner_id: int) -> discord.ui.View | None:
    """A never-expiring view of image buttons, one row per image id, in the order given."""
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    rows: dict[int, int] = {}
    for action, image_id, label in buttons:
        row = rows.setdefault(image_id, len(rows))
        view.add_item(ImageButton(action, image_id, owner_id, label=label, row=row))
    return view


def view_without(message: discord.Message | None, image_id: int) -> discord.ui.View | None:
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
    return view_of(kept, owner_id)


def view_kwargs(view: discord.ui.View | None) -> dict[str, Any]:
    """``view=`` for a send call when there are buttons, else nothing."""
    return {} if view is None else {"view": view}
