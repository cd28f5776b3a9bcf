"""Inline buttons carrying the shared button ids (`bot.chat.actions`).

Results come as photos with buttons (draw again, more like this, 2× upscale, full size, delete) whose
callback data carry the verb, the image id and the requester's Telegram id, so they keep working
after a restart and do nothing for anyone else. Every id fits Telegram's 64 bytes of callback data.
"""

from __future__ import annotations

from telegram import InlineKeyboardButton

from bot.chat.actions import Action


def inline_button(action: Action, label: str) -> InlineKeyboardButton:
    """A button labelled ``label`` that sends ``action`` back when pressed."""
    return InlineKeyboardButton(label, callback_data=action.encode())
