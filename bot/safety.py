"""Prompt safety: a blocklist of words a draw prompt may not contain.

Prompt policy belongs to the chat side (standard library only): it refuses a prompt before
anything is queued. The image-side check (a CLIP-based NSFW classifier) lives in ``engine.pipelines.nsfw``.

Matching is on whole words, so "Essex", "Scunthorpe", "grapes" or "therapist" never match "sex",
"cunt", "rape" or "rapist". Before comparing, a prompt is normalised so that cheap disguises match too:

* case and diacritics ("NÜDE"), compatibility forms (full-width "ｎｕｄｅ"), a few Cyrillic look-alikes,
  and invisible characters (zero-width spaces) are folded away;
* single characters split by dots, dashes or spaces are joined ("n.u.d.e", "n u d e");
* digits and symbols inside a word are read as letters ("nud3", "s3x", "pr0n", "@ss");
* a letter stretched three or more times counts once ("nuuude");
* a plural "s"/"es" is dropped ("nudes").

It is a first line only: a determined user can always find words a list does not hold, which is why
the worker also runs the image check.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from bot.errors import PromptBlocked

# Left out on purpose, for their everyday meanings in prompts: "cum" (magna cum laude), "gore" (Al Gore),
# "dick" (Philip K. Dick), "cock" (a rooster), "corpse" (zombie costumes).
DEFAULT_TERMS: tuple[str, ...] = (
    # nudity and sexual content
    "nude", "naked", "nudity", "nsfw", "topless", "bottomless", "undressed", "unclothed", "no clothes",
    "without clothes", "nipple", "nipples", "areola", "genitals", "genitalia", "penis", "vagina", "vulva",
    "breasts", "boobs", "tits", "butt naked", "sex", "sexy", "sexual", "intercourse", "porn", "porno",
    "pornographic", "pr0n", "xxx", "hentai", "ecchi", "erotic", "erotica", "fetish", "bdsm", "bondage",
    "orgasm", "masturbating", "masturbation", "blowjob", "handjob", "cumshot", "orgy", "stripper",
    "striptease", "lingerie", "onlyfans", "lewd", "explicit", "seductive", "cunt", "pussy", "rape", "raped",
    "rapist", "molest", "molested", "upskirt", "camel toe", "see-through clothes", "wet t-shirt",
    # minors together with anything above is the worst case; refuse the obvious words outright
    "loli", "lolicon", "shota", "shotacon", "jailbait", "underage", "preteen",
    # gore and violence against the person drawn
    "gory", "decapitated", "beheaded", "dismembered", "mutilated", "disembowelled", "dead body",
    "suicide", "self-harm", "lynching",
    # hate symbols
    "swastika", "nazi", "kkk",
)
"""The built-in list. Deployments extend or replace it with a file (``load_blocklist``)."""

# Digits and symbols read as the letters they stand for (leetspeak).
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s",
                       "!": "i", "|": "l", "+": "t"})
# Cyrillic and Greek letters that look like Latin ones, folded to the Latin letter.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "α": "a", "ε": "e", "ι": "i", "κ": "k", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ν": "v",
})
_SYMBOLS = "@$!|+"  # the symbols _LEET reads as letters
_WORD = re.compile(r"(?:[^\W_]|[@$!|+])+")  # letters and digits, and those symbols
_STRETCH = re.compile(r"(\w)\1{2,}")  # a character three or more times in a row
_SPLIT = re.compile(r"[\s.\-_*·•,'`~^/\\]+")  # what people put between the letters of a hidden word
_MIN_JOINED = 3  # "a b" is two words; "n u d e" is one


class BlocklistFileError(Exception):
    """A blocklist file that cannot be read; the message names the file."""


class PromptBlocklist:
    """Whole-word matching of prompts against a list of terms (single words or phrases).

    ``check`` returns the first term found (as it was written in the list), or None.
    """

    def __init__(self, terms: Iterable[str]) -> None:
        self._terms: dict[tuple[str, ...], str] = {}
        for term in terms:
            words = tuple(_normalised_words(term))
            if words:
                self._terms.setdefault(words, term.strip())
        self._longest = max((len(words) for words in self._terms), default=0)

    @classmethod
    def default(cls) -> PromptBlocklist:
        """The built-in list, ``DEFAULT_TERMS``."""
        return cls(DEFAULT_TERMS)

    @classmethod
    def from_file(cls, path: Path, *, include_defaults: bool = True) -> PromptBlocklist:
        """Terms from ``path`` (one per line; ``#`` starts a comment), plus the defaults unless told not to."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BlocklistFileError(f"cannot read the blocklist file {path}: {e}") from e
        terms = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        own = [term for term in terms if term]
        return cls([*DEFAULT_TERMS, *own] if include_defaults else own)

    @property
    def terms(self) -> list[str]:
        """The terms, as written, without duplicates."""
        return list(self._terms.values())

    def __len__(self) -> int:
        return len(self._terms)

    def check(self, prompt: str) -> str | None:
        """The first blocked term in ``prompt``, or None when the prompt is allowed."""
        folded = _fold(prompt)
        for words in _readings(_WORD.findall(folded)):
            found = self._find(words)
            if found is not None:
                return found
        return self._find_spelled_out(folded)

    def ensure_allowed(self, prompt: str) -> None:
        """Raise ``PromptBlocked`` when ``prompt`` holds a blocked term."""
        term = self.check(prompt)
        if term is not None:
            raise PromptBlocked(term)

    def _find(self, words: list[str]) -> str | None:
        for start in range(len(words)):
            for length in range(1, min(self._longest, len(words) - start) + 1):
                phrase = words[start : start + length]
                for variant in _plural_variants(phrase):
                    term = self._terms.get(variant)
                    if term is not None:
                        return term
        return None

    def _find_spelled_out(self, folded: str) -> str | None:
        """Single-word terms spelled out in single characters ("n.u.d.e", "a n u d e").

        Every character of such a run is a word of its own, so a term found anywhere inside the run
        starts and ends on word boundaries: substring matching is whole-word matching here.
        """
        for run in _spelled_out_runs(folded):
            for reading in _readings([run]):
                for (word, *rest), term in self._terms.items():
                    if not rest and word in reading[0]:
                        return term
        return None


def load_blocklist(path: Path | None = None, extra_terms: Iterable[str] = ()) -> PromptBlocklist:
    """The blocklist a deployment configured: the defaults, a file's terms when given, and ``extra_terms``."""
    base = PromptBlocklist.from_file(path) if path is not None else PromptBlocklist.default()
    extra = list(extra_terms)
    return PromptBlocklist([*base.terms, *extra]) if extra else base


# --- normalisation ------------------------------------------------------------------------------------


def _fold(text: str) -> str:
    """Compatibility forms, case, diacritics, look-alike letters and invisible characters folded away."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in ("Mn", "Cf"))
    return kept.casefold().translate(_LOOKALIKES)


def _normalised_words(text: str) -> list[str]:
    """The words of a list entry after folding (digits and symbols inside words kept as written)."""
    return [w.strip(_SYMBOLS) for w in _WORD.findall(_fold(text)) if w.strip(_SYMBOLS)]


def _readings(words: list[str]) -> Iterator[list[str]]:
    """The word lists a prompt is compared in: as written, leet read as letters, and stretching undone."""
    # Symbols at a word's ends are punctuation ("nude!") as written; read as leet, "@" and "$" are letters
    # wherever they stand ("@ss", "boob$"), "!" only inside a word ("n!pple").
    as_written = [w.strip(_SYMBOLS) for w in words if w.strip(_SYMBOLS)]
    seen: set[tuple[str, ...]] = set()
    as_leet = [_read_leet(w.strip("!|+")) for w in words if w.strip("!|+")]
    for reading in (as_written, as_leet):
        for final in (reading, [_STRETCH.sub(r"\1", w) for w in reading]):
            key = tuple(final)
            if final and key not in seen:
                seen.add(key)
                yield final


def _spelled_out_runs(folded: str) -> list[str]:
    """Runs of ``_MIN_JOINED`` or more single characters split by gaps, each joined into one string."""
    runs: list[str] = []
    run: list[str] = []
    for token in _SPLIT.split(folded):
        if len(token) == 1 and _WORD.fullmatch(token):
            run.append(token)
            continue
        if len(run) >= _MIN_JOINED:
            runs.append("".join(run))
        run = []
    if len(run) >= _MIN_JOINED:
        runs.append("".join(run))
    return runs


def _read_leet(word: str) -> str:
    """Digits and symbols read as letters, only in words that also hold letters ("1990" stays a number)."""
    if not any(c.isalpha() for c in word):
        return word
    return word.translate(_LEET)


def _plural_variants(phrase: list[str]) -> Iterator[tuple[str, ...]]:
    """The phrase, then with its last word's plural "s" or "es" dropped."""
    yield tuple(phrase)
    last = phrase[-1]
    if len(last) > 3 and last.endswith("s"):
        yield (*phrase[:-1], last[:-1])
        if last.endswith("es"):
            yield (*phrase[:-1], last[:-2])
