"""The CLIP-based NSFW image check on the tiny checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import WeightsMissing


# --- the NSFW image check ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.pipelines.nsfw import build_tiny_safety_checker

    return build_tiny_safety_checker(tmp_path_factory.mktemp("models") / "safety_checker")


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(count)]


def test_the_tiny_checker_loads_like_the_real_one_and_flags_nothing(checker_dir: Path) -> None:
    from engine.pipelines.nsfw import NsfwChecker

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

    from engine.pipelines.nsfw import NsfwChecker

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
    from engine.pipelines.nsfw import build_tiny_safety_checker

    before = (checker_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_safety_checker(checker_dir) == checker_dir
    assert (checker_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_missing_checker_says_how_to_get_it(tmp_path: Path) -> None:
    from engine.pipelines.nsfw import NsfwChecker

    with pytest.raises(WeightsMissing, match="avatarbooth models pull"):
        NsfwChecker.load(tmp_path / "safety_checker")
