"""Hot-swapped LoRAs (one slot, weights copied in place) draw as separately loaded ones do, on the tiny SDXL.

Tolerance: the slot pads each LoRA to the slot's rank with zeros and keeps its scaling in a tensor,
so the sums run in another order than with the ordinary adapter: draws may differ by rounding, at
most 1 of 255 in any pixel channel (2e-6 in float was seen). The plain base is the same code path
either way and must be equal exactly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.render.hotswap import SLOT, SLOT_TARGETS
from engine.render.renderer import AdapterRef, Renderer
from engine.settings import EngineSettings
from engine.train.lora import LoraTrainSettings, train_lora
from tests.support import load_tiny_sdxl

SIZE = 64
PROMPT = "a photo of sks person"
DRAW: dict[str, Any] = {"seed": 5, "size": (SIZE, SIZE), "steps": 2, "guidance": 5.0}
RANK = 16
MAX_ROUNDING = 1  # of 255, per pixel channel (see the module docstring)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    """Users' LoRAs: two the slot takes (ranks 4 and 8, scales 1 and 2), one of rank 32 and one with
    text-encoder weights, which it does not."""
    pipe, lock, folder = load_tiny_sdxl(tiny_preset_dir), threading.Lock(), tmp_path_factory.mktemp("adapters")
    refs = {}
    for user, seed, rank, alpha, text_encoder in (
        ("user_a", 1, 4, 4, False),
        ("user_b", 2, 8, 16, False),
        ("rank_32", 3, 32, 32, False),
        ("with_te", 4, 4, 4, True),
    ):
        rng = np.random.default_rng(seed)
        crops = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
        settings = LoraTrainSettings(
            steps=3, rank=rank, alpha=alpha, learning_rate=5e-2, resolution=SIZE, seed=seed,
            train_text_encoder=text_encoder,
        )
        path = folder / f"{user}.safetensors"
        path.write_bytes(train_lora(pipe, lock, crops, "sks", "person", settings).weights)
        refs[user] = AdapterRef(user, path)
    return refs


@pytest.fixture(scope="module")
def ordinary(tiny_preset_dir: Path) -> Renderer:
    """Today's path: one adapter per user, switched with ``set_adapters``."""
    return Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock())


@pytest.fixture
def hotswap(tiny_preset_dir: Path) -> Iterator[Renderer]:
    yield Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), hotswap_rank=RANK)


def draw(renderer: Renderer, adapter: AdapterRef | None = None, **overrides: Any) -> np.ndarray:
    (image,) = renderer.draw(PROMPT, adapter=adapter, **{**DRAW, **overrides})
    return np.asarray(image).astype(np.int16)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(actual - expected).max() <= MAX_ROUNDING


def test_the_slot_covers_what_lora_training_targets() -> None:
    assert set(SLOT_TARGETS) == set(LoraTrainSettings().target_modules)


def test_two_users_alternating_draw_as_with_their_own_adapters(
    hotswap: Renderer, ordinary: Renderer, adapters: dict[str, AdapterRef]
) -> None:
    base = draw(ordinary)
    assert np.array_equal(draw(hotswap), base)
    seen = {}
    for user in ("user_a", "user_b", "user_a", "user_b"):
        swapped = draw(hotswap, adapters[user])
        assert_close(swapped, draw(ordinary, adapters[user]))
        assert np.abs(swapped - base).mean() > 10 * MAX_ROUNDING  # the LoRA visibly changes the draw
        seen[user] = swapped
        assert np.array_equal(draw(hotswap), base)  # and the plain base is back, exactly
    assert np.abs(seen["user_a"] - seen["user_b"]).mean() > 10 * MAX_ROUNDING
    assert hotswap.hotswapped_adapters == ["user_a", "user_b"]
    assert hotswap.loaded_adapters == []  # nothing went the ordinary way


def test_loras_the_slot_cannot_take_load_the_ordinary_way_and_say_why(
    hotswap: Renderer, ordinary: Renderer, adapters: dict[str, AdapterRef], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="engine.render.renderer"):
        for user in ("user_a", "rank_32", "with_te", "user_a", "rank_32"):
            assert_close(draw(hotswap, adapters[user]), draw(ordinary, adapters[user]))
    reasons = [r.getMessage() for r in caplog.records if "without hotswap" in r.getMessage()]
    assert reasons == [
        f"LoRA adapter rank_32 loads without hotswap: its rank 32 is above the hotswap rank {RANK}",
        "LoRA adapter with_te loads without hotswap: it has text-encoder weights, which diffusers cannot hotswap",
    ]
    assert hotswap.loaded_adapters == ["with_te", "rank_32"]
    assert hotswap.hotswapped_adapters == ["user_a"]
    assert np.array_equal(draw(hotswap), draw(ordinary))


def test_forgetting_the_slots_user_empties_the_slot(hotswap: Renderer, adapters: dict[str, AdapterRef]) -> None:
    first = draw(hotswap, adapters["user_a"])
    hotswap.forget("user_a")
    unet = hotswap._pipe.unet
    assert all(not p.any() for name, p in unet.named_parameters() if f".lora_B.{SLOT}." in name)
    assert hotswap.hotswapped_adapters == []
    assert np.array_equal(draw(hotswap, adapters["user_a"]), first)  # read again on the next draw


def test_settings_open_the_slot(tiny_preset_dir: Path) -> None:
    settings = EngineSettings("tiny", tiny_preset_dir, tiny_preset_dir, "redis://unused", lora_hotswap=True)
    pipe = load_tiny_sdxl(tiny_preset_dir)
    Renderer.from_settings(pipe, threading.Lock(), settings, (SIZE, SIZE))
    assert list(pipe.unet.peft_config) == [SLOT]
    assert not getattr(pipe.unet, "_compiled_call_impl", None)  # compile_unet is off by default


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts its calls: dynamo
    calls the backend once for each graph it compiles, so a recompilation shows as one more call."""

    def __init__(self) -> None:
        self.compilations = 0

    def __call__(self, graph: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
        self.compilations += 1
        return graph.forward


def test_switching_users_under_torch_compile_does_not_recompile(
    tiny_preset_dir: Path, ordinary: Renderer, adapters: dict[str, AdapterRef]
) -> None:
    torch._dynamo.reset()
    backend = CountingBackend()
    renderer = Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), hotswap_rank=RANK)
    renderer.compile(size=(SIZE, SIZE), backend=backend)
    warmed = backend.compilations
    assert warmed > 0
    for user in ("user_a", "user_b", None, "user_a", "user_b", None):
        adapter = adapters[user] if user else None
        assert_close(draw(renderer, adapter), draw(ordinary, adapter))
    assert backend.compilations == warmed
    draw(renderer, adapters["user_a"], size=(SIZE + 16, SIZE))  # the counter does see a recompilation
    assert backend.compilations > warmed
    torch._dynamo.reset()
