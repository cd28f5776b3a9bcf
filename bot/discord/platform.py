"""What every module of the Discord adapter shares: the platform's name and message limit, the
interaction type, and how a Discord user becomes a `UserRef`."""

from __future__ import annotations

import discord

from bot.service import UserRef

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters of message content

Interaction = discord.Interaction[discord.Client]


def user_ref(user: discord.abc.User) -> UserRef:
    """The service's name for a Discord user."""
    return UserRef(PLATFORM, str(user.id))


def clip(text: str) -> str:
    """`text` cut to fit one Discord message."""
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
