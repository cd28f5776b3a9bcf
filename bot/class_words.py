"""What "me" in a user's prompts becomes: the class word named with /train, else the one the photos'
apparent genders agree on (`BotService` chooses between these and the configured word)."""

from __future__ import annotations

from collections.abc import Sequence

from bot.errors import UnknownClassWord
from bot.settings import CLASS_WORD_CHOICES
from engine.api import ApparentGender

_CLASS_WORDS = {ApparentGender.FEMALE: "woman", ApparentGender.MALE: "man"}


def class_word_for(apparent_genders: Sequence[str | None]) -> str:
    """"woman" or "man" when more than half of the photos read so; "person" when unknown or mixed."""
    for gender, word in _CLASS_WORDS.items():
        if sum(g == gender for g in apparent_genders) * 2 > len(apparent_genders):
            return word
    return "person"


def known_gender(value: str | None) -> str | None:
    """A worker's apparent gender when it is one the database keeps; anything else counts as unknown."""
    return value if value in tuple(ApparentGender) else None


def check_class_word(word: str | None) -> str | None:
    """The class word a user named, in lower case; None when none was named."""
    named = (word or "").strip().lower()
    if not named:
        return None
    if named not in CLASS_WORD_CHOICES:
        raise UnknownClassWord((word or "").strip(), CLASS_WORD_CHOICES)
    return named
