"""The callback data of the buttons under results, and of the consent button.

Results come as photos with buttons (draw again, more like this, full size, delete) whose callback
data carry the image id and the requester's Telegram id, so they keep working after a restart and
do nothing for anyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

from telegram import InlineKeyboardButton

_CALLBACK_VERSION = "ab1"
_ACTIONS = frozenset("armfd")  # agree, draw again (reroll), more like this, full size, delete
_MAX_ID = 2**63  # ids are signed 64-bit integers: a larger number in forged button data is no id


@dataclass(frozen=True)
class Button:
    """Callback data: ``ab1:<action>:<requester's Telegram id>:<image id>`` (at most 64 bytes).

    Actions: a agree, r draw again, m more like this, f full size, d delete.
    """

    action: str
    user_id: int
    image_id: int = 0

    @property
    def data(self) -> str:
        return f"{_CALLBACK_VERSION}:{self.action}:{self.user_id}:{self.image_id}"

    def button(self, label: str) -> InlineKeyboardButton:
        return InlineKeyboardButton(label, callback_data=self.data)

    @classmethod
    def parse(cls, data: object) -> Button | None:
        if not isinstance(data, str):
            return None
        parts = data.split(":")
        if len(parts) != 4 or parts[0] != _CALLBACK_VERSION or parts[1] not in _ACTIONS:
            return None
        try:
            user_id, image_id = int(parts[2]), int(parts[3])
        except ValueError:
            return None
        if not (0 <= user_id < _MAX_ID and 0 <= image_id < _MAX_ID):  # SQLite's and Telegram's 64 bits
            return None
        return cls(parts[1], user_id, image_id)
