"""What every chat adapter shares, importing no platform library: button ids (`actions`), the
progress throttle (`progress`), errors turned into replies (`failures`) and background tasks
(`tasks`). The adapters (`bot.console`, `bot.telegram`, `bot.discord`) only speak their platform."""
