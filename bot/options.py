"""The options of /preview and /draw (``--style S``, ``--ar W:H``, ``--boost``, ``--fast``) and the
words of /train, read the same way wherever commands arrive as text (console, Telegram)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from bot.errors import MissingOptionValue, RepeatedOption, UnknownOption
from bot.settings import CLASS_WORD_CHOICES


@dataclass(frozen=True)
class PromptOptions:
    """What a /preview or /draw line asked for: its options and the prompt after them."""

    prompt: str
    style: str | None = None
    aspect: str | None = None
    boost: bool = False
    fast: bool = False  # few-step mode: faster, a little less detail


_VALUE_OPTIONS = {"--style": ("style", "--style anime"), "--ar": ("aspect", "--ar 3:4")}
_FLAG_OPTIONS = {"--boost": "boost", "--fast": "fast"}  # each sets its PromptOptions field to True
PROMPT_OPTIONS = (*_VALUE_OPTIONS, *_FLAG_OPTIONS)
"""What /draw takes."""
PREVIEW_OPTIONS = ("--style", "--ar", "--fast")
"""What /preview takes: the boost is for drawing from a trained model."""


def parse_options(rest: str, allowed: Collection[str] = PROMPT_OPTIONS) -> PromptOptions:
    """Leading ``--name value``, ``--name=value`` and ``--flag`` words, then the prompt.

    >>> parse_options("--ar 3:4 --boost --fast me as an astronaut")
    PromptOptions(prompt='me as an astronaut', style=None, aspect='3:4', boost=True, fast=True)

    Raises ``UnknownOption`` for an option not in ``allowed``, ``MissingOptionValue`` for a
    value option with nothing after it and ``RepeatedOption`` for one given twice (which value was
    meant is the user's to say, not ours to guess).
    """
    values: dict[str, str] = {}
    flags: set[str] = set()
    seen: set[str] = set()
    remaining = rest.strip()
    while remaining.startswith("--"):
        word, remaining = _next_word(remaining)
        name, has_value, value = word.partition("=")
        if name not in allowed or (name in _FLAG_OPTIONS and has_value):
            raise UnknownOption(word)
        if name in seen:
            raise RepeatedOption(name)
        seen.add(name)
        if name in _FLAG_OPTIONS:
            flags.add(_FLAG_OPTIONS[name])
            continue
        field_name, example = _VALUE_OPTIONS[name]
        if not has_value:
            value, remaining = _next_word(remaining)
        if not value:
            raise MissingOptionValue(name, example)
        values[field_name] = value
    return PromptOptions(
        remaining, style=values.get("style"), aspect=values.get("aspect"),
        boost="boost" in flags, fast="fast" in flags,
    )


def parse_train_words(rest: str) -> tuple[str | None, str | None]:
    """/train's words, ``[method] [class word]``: (method, class word), None for what is left out.

    A lone class word ("/train woman") is the class word; anything after the method is the class word
    as typed, for the service to accept or refuse.

    >>> parse_train_words("ti woman"), parse_train_words("Woman"), parse_train_words("lora")
    (('ti', 'woman'), (None, 'Woman'), ('lora', None))
    """
    method, _, class_word = rest.strip().partition(" ")
    if not class_word and method.lower() in CLASS_WORD_CHOICES:
        return None, method
    return method or None, class_word.strip() or None


def _next_word(text: str) -> tuple[str, str]:
    words = text.split(maxsplit=1)
    return (words[0] if words else ""), (words[1] if len(words) > 1 else "")
