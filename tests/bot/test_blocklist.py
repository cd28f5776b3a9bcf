"""The prompt blocklist: whole words, folded disguises, files of extra terms."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import BotError, PromptBlocked
from bot.safety import BlocklistFileError, PromptBlocklist, load_blocklist


@pytest.fixture(scope="module")
def blocklist() -> PromptBlocklist:
    return PromptBlocklist.default()


@pytest.mark.parametrize(
    ("prompt", "term"),
    [
        ("me, nude, on a beach", "nude"),
        ("ME NUDE", "nude"),
        ("me in the nüde", "nude"),  # diacritics
        ("ｎｕｄｅ me", "nude"),  # full-width forms
        ("tоpless me", "topless"),  # a Cyrillic "о"
        ("nu\u200bde portrait", "nude"),  # a zero-width space
        ("me n.u.d.e at the lake", "nude"),
        ("me as a n u d e model", "nude"),
        ("n-a-k-e-d me", "naked"),
        ("nud3 me", "nude"),  # leetspeak
        ("pr0n star", "pr0n"),
        ("s3x!", "sex"),
        ("n@ked selfie", "naked"),
        ("nuuuude", "nude"),  # stretched
        ("nudes of me", "nude"),  # plural
        ("me with no clothes on", "no clothes"),  # a phrase
        ("me in a wet t-shirt", "wet t-shirt"),
    ],
)
def test_blocked_terms_are_found_through_simple_disguises(blocklist: PromptBlocklist, prompt: str, term: str) -> None:
    assert blocklist.check(prompt) == term


@pytest.mark.parametrize(
    "prompt",
    [
        "me as an astronaut",
        "me on holiday in Essex",
        "me in Middlesex and Sussex",
        "Scunthorpe United supporter me",
        "a bowl of grapes next to me",
        "me visiting my therapist",
        "me at a cocktail bar",
        "me with a classic assassin look",
        "unisex jacket on me",
        "me graduating magna cum laude",
        "me debating Al Gore",
        "3d render of me in the 1990s",
        "me in a studio, 85 mm, f/1.8",
        "",
    ],
)
def test_ordinary_prompts_pass(blocklist: PromptBlocklist, prompt: str) -> None:
    assert blocklist.check(prompt) is None


def test_ensure_allowed_raises_the_bot_error_naming_the_term(blocklist: PromptBlocklist) -> None:
    with pytest.raises(PromptBlocked) as caught:
        blocklist.ensure_allowed("me naked")
    assert isinstance(caught.value, BotError)
    assert caught.value.term == "naked" and "'naked'" in caught.value.user_message
    blocklist.ensure_allowed("me in a suit")


def test_a_blocklist_file_adds_terms_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# our own words\nCelebrity Name  # a phrase\n\nsp@m\n", encoding="utf-8")
    extended = PromptBlocklist.from_file(path)
    assert extended.check("me with celebrity   name") == "Celebrity Name"
    assert extended.check("me naked") == "naked"  # the defaults are kept
    only_own = PromptBlocklist.from_file(path, include_defaults=False)
    assert only_own.check("me naked") is None and len(only_own) == 2
    assert load_blocklist(path, extra_terms=["zebra"]).check("zebras and me") == "zebra"


def test_an_unreadable_blocklist_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BlocklistFileError, match="missing.txt"):
        PromptBlocklist.from_file(tmp_path / "missing.txt")
