"""``[discord]`` in config.toml, kept apart from the adapter so that reading the config does not load
the discord library."""

from __future__ import annotations

from dataclasses import dataclass


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


__all__ = ["DiscordSettings"]
