"""A command's failure turned into what its user reads: the same on every platform."""

from __future__ import annotations

import logging

from bot import texts
from bot.errors import BotError

_log = logging.getLogger(__name__)


def failure_text(error: Exception, platform: str) -> str:
    """A `BotError` says its own message (what went wrong and what to do next). Anything else is
    our fault: logged with its traceback for the operator, and the user told to try again later."""
    if isinstance(error, BotError):
        return error.user_message
    _log.error("a %s command failed", platform, exc_info=error)
    return texts.SOMETHING_BROKE
