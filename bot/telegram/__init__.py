"""Telegram: python-telegram-bot's `Application` in front of `BotService`.

`adapter` serves it (`serve_telegram`); `settings` is the ``[telegram]`` section of config.toml and
imports no chat library. The rest are the adapter's parts: `channel` (where answers go, progress
messages), `intake` (uploads, albums, holds, running tasks), `buttons` (inline buttons with the shared ids), `http`
(PTB's requests over aiohttp), `redaction` (the token kept out of logs) and `clock`.
"""
