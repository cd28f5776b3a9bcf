"""The ids carried by buttons, one format for every platform.

A button's id holds what it does, whose it is and which image it acts on, so a button keeps working
after a restart and does nothing for anyone else. Every id fits both Telegram's callback data (64
bytes) and Discord's custom ids (100 characters)::

    ab2:<verb>:<owner's platform user id>:<image id>      e.g. ab2:reroll:4711:42, ab2:agree:4711:0

Verbs added since (``upscale``) use the same format.

The formats of the previous release still decode, so buttons already sent keep working:
Telegram's ``ab1:<a|r|m|f|d>:<owner>:<image>`` and Discord's ``ab:<reroll|more|delete>:<image>:<owner>``
and ``ab:agree:<owner>``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

VERSION = "ab2"
MAX_ID = 2**63  # platform and database ids are signed 64-bit integers; a larger number is forged
_NUMBER = r"[0-9]{1,19}"


class Verb(enum.StrEnum):
    AGREE = "agree"  # record consent (the button under /start)
    REROLL = "reroll"  # draw the same prompt again
    MORE = "more"  # variations of this image
    FULL = "full"  # send the image as a file, at full size
    UPSCALE = "upscale"  # the image at twice its size, re-detailed by the model that drew it
    DELETE = "delete"  # delete the image


IMAGE_VERBS = (Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.FULL, Verb.DELETE)
"""The verbs of the buttons under a result, in the order they are shown."""

_TELEGRAM_LETTERS = {"a": Verb.AGREE, "r": Verb.REROLL, "m": Verb.MORE, "f": Verb.FULL, "d": Verb.DELETE}
_FORMATS = (
    re.compile(rf"ab2:(?P<verb>[a-z]+):(?P<owner>{_NUMBER}):(?P<image>{_NUMBER})"),
    re.compile(rf"ab1:(?P<letter>[armfd]):(?P<owner>{_NUMBER}):(?P<image>{_NUMBER})"),
    re.compile(rf"ab:(?P<verb>reroll|more|delete):(?P<image>{_NUMBER}):(?P<owner>{_NUMBER})"),
    re.compile(rf"ab:(?P<verb>agree):(?P<owner>{_NUMBER})"),
)
PATTERN = r"ab[12]?:[a-z]+:[0-9]{1,19}(?::[0-9]{1,19})?"
"""A regex every id of ours matches as a whole, for routers that need one (Discord's DynamicItem
templates); ``decode`` then says what it is."""


@dataclass(frozen=True)
class Action:
    """A pressed button: ``verb`` on ``image_id`` (0 for none), for the user ``owner`` only."""

    verb: Verb
    owner: int
    image_id: int = 0

    def encode(self) -> str:
        """The id to put on the button (``decode`` reads it back)."""
        return f"{VERSION}:{self.verb}:{self.owner}:{self.image_id}"

    def belongs_to(self, presser: int | str) -> bool:
        """Whether the user pressing it is the one it was made for."""
        return str(presser) == str(self.owner)


def decode(data: object) -> Action | None:
    """The action a button id stands for, or None for anything that is not one of ours (forged,
    truncated, out of range, of a format no release wrote)."""
    if not isinstance(data, str):
        return None
    for form in _FORMATS:
        match = form.fullmatch(data)
        if match is None:
            continue
        groups = match.groupdict()
        verb = _TELEGRAM_LETTERS[groups["letter"]] if groups.get("letter") else _verb(groups["verb"])
        owner, image_id = int(groups["owner"]), int(groups.get("image") or 0)
        if verb is None or owner >= MAX_ID or image_id >= MAX_ID:
            return None
        if (verb is Verb.AGREE) != (image_id == 0):  # agree names no image; every other verb does
            return None
        return Action(verb, owner, image_id)
    return None


def _verb(word: str) -> Verb | None:
    try:
        return Verb(word)
    except ValueError:
        return None
