"""Prompt blocklist (whole words, folded disguises) and the CLIP-based NSFW image check on the tiny checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError, WeightsMissing
from engine.safety import BlocklistFileError, PromptBlocked, PromptBlocklist, load_blocklist


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


def test_ensure_allowed_raises_an_engine_error_naming_the_term(blocklist: PromptBlocklist) -> None:
    with pytest.raises(PromptBlocked) as caught:
        blocklist.ensure_allowed("me naked")
    assert isinstance(caught.value, EngineError)
    assert caught.value.term == "naked" and "'naked'" in str(caught.value)
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


# --- the NSFW image check ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.nsfw import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("models") / "safety_checker")


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(count)]


def test_the_tiny_checker_loads_like_the_real_one_and_flags_nothing(checker_dir: Path) -> None:
    from engine.nsfw import NsfwChecker

    assert sorted(p.name for p in checker_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    checker = NsfwChecker.load(checker_dir, "cpu")
    flags = checker.check(_images(3))
    assert flags == [False, False, False]
    assert checker.check([]) == []


def test_lowered_thresholds_flag_every_image_and_it_comes_back_black(checker_dir: Path) -> None:
    import torch

    from engine.nsfw import NsfwChecker

    checker = NsfwChecker.load(checker_dir, "cpu")
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(-2.0)  # every cosine (>= -1) now exceeds its threshold
    images = _images(2)
    screened = checker.screen(images)
    assert screened.flagged == [True, True] and screened.any_flagged
    for original, kept in zip(images, screened.images):
        assert kept.size == original.size
        assert np.asarray(kept).max() == 0


def test_building_again_reuses_the_folder(checker_dir: Path) -> None:
    from engine.nsfw import build_tiny_safety_checker

    before = (checker_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_safety_checker(checker_dir) == checker_dir
    assert (checker_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_missing_checker_says_how_to_get_it(tmp_path: Path) -> None:
    from engine.nsfw import NsfwChecker

    with pytest.raises(WeightsMissing, match="avatarbooth models pull"):
        NsfwChecker.load(tmp_path / "safety_checker")
