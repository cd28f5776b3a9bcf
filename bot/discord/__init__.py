"""The Discord adapter: slash commands, selfies sent by DM, and buttons under results.

`bot.discord.bot.serve_discord` runs it; `bot.discord.settings` holds its ``[discord]`` settings and
loads nothing of the discord library, so reading the configuration does not.
"""
