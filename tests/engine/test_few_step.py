"""Few-step mode (engine.render.fast) on the tiny SDXL and its distilled LoRA in the published layout.

The reference is diffusers done by hand: ``load_lora_weights`` of the same file, ``set_adapters``,
Euler on trailing timesteps, 8 steps, guidance 0. The renderer switches adapters per layer instead,
so the two paths may differ by rounding: at most 1 of 255 per pixel channel. Draws after a few-step
draw repeat the same computation as before it and must be equal exactly.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from engine.presets import FEW_STEP_GUIDANCE, FEW_STEP_LORA, FEW_STEP_STEPS
from engine.render.fast import FEW_STEP, FewStep
from engine.render.renderer import AdapterRef, Renderer, RenderInputError
from engine.train.lora import LoraTrainSettings, train_lora
from tests.support import load_tiny_sdxl

SIZE = 64
PROMPT = "a photo of sks person"
DRAW: dict[str, Any] = {"seed": 3, "size": (SIZE, SIZE), "steps": 2, "guidance": 5.0}
MAX_ROUNDING = 1  # of 255 (see the module docstring)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def few_step_file(tiny_preset_dir: Path) -> Path:
    path = tiny_preset_dir / FEW_STEP_LORA
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def user_lora(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterRef:
    rng = np.random.default_rng(7)
    crops = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
    settings = LoraTrainSettings(steps=3, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, seed=7)
    path = tmp_path_factory.mktemp("user") / "user.safetensors"
    path.write_bytes(train_lora(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), crops, "sks", "person", settings).weights)
    return AdapterRef("user_a", path)


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def reference(preset_dir: Path, few_step_file: Path, user: AdapterRef | None = None) -> np.ndarray:
    """The few-step draw done the plain diffusers way."""
    pipe = load_tiny_sdxl(preset_dir)
    pipe.load_lora_weights(str(few_step_file), adapter_name="lightning")
    adapters = ["lightning"]
    if user is not None:
        pipe.load_lora_weights(str(user.path), adapter_name="user")
        adapters.insert(0, "user")
    pipe.set_adapters(adapters, [1.0] * len(adapters))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    image = pipe(
        PROMPT, num_inference_steps=FEW_STEP_STEPS, guidance_scale=FEW_STEP_GUIDANCE, width=SIZE, height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(DRAW["seed"])],
    ).images[0]
    return as_array(image)


def fast_draw(renderer: Renderer, adapter: AdapterRef | None = None) -> np.ndarray:
    (image,) = renderer.draw(PROMPT, adapter=adapter, fast=True, **DRAW)
    return as_array(image)


def draw(renderer: Renderer, adapter: AdapterRef | None = None) -> np.ndarray:
    (image,) = renderer.draw(PROMPT, adapter=adapter, **DRAW)
    return as_array(image)


def test_a_fast_draw_is_the_distilled_lora_with_its_sampler_and_leaves_the_base_as_it_was(
    tiny_preset_dir: Path, few_step_file: Path
) -> None:
    renderer = Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), few_step=FewStep(few_step_file))
    before = draw(renderer)
    scheduler = renderer._pipe.scheduler
    calls: list[int] = []
    hook = renderer._pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        fast = fast_draw(renderer)
    finally:
        hook.remove()
    assert calls == [1] * FEW_STEP_STEPS  # 8 UNet calls, one image each: no classifier-free guidance
    assert np.abs(fast - reference(tiny_preset_dir, few_step_file)).max() <= MAX_ROUNDING
    assert np.abs(fast - before).mean() > 10 * MAX_ROUNDING
    assert renderer._pipe.scheduler is scheduler
    assert np.array_equal(draw(renderer), before)


@pytest.mark.parametrize("hotswap_rank", [None, 16], ids=["adapters", "hotswap"])
def test_a_fast_draw_stacks_on_the_users_lora_and_their_next_draw_is_unchanged(
    tiny_preset_dir: Path, few_step_file: Path, user_lora: AdapterRef, hotswap_rank: int | None
) -> None:
    renderer = Renderer(
        load_tiny_sdxl(tiny_preset_dir), threading.Lock(), few_step=FewStep(few_step_file), hotswap_rank=hotswap_rank
    )
    user_before, base_before = draw(renderer, user_lora), draw(renderer)
    fast = fast_draw(renderer, user_lora)
    assert np.abs(fast - reference(tiny_preset_dir, few_step_file, user_lora)).max() <= MAX_ROUNDING
    assert np.abs(fast - fast_draw(renderer)).mean() > 2 * MAX_ROUNDING  # the user's LoRA was on
    assert np.array_equal(draw(renderer, user_lora), user_before)
    assert np.array_equal(draw(renderer), base_before)
    assert FEW_STEP in renderer._pipe.unet.peft_config  # loaded once, kept


def test_fast_mode_without_the_distilled_lora_says_how_to_get_it(tiny_preset_dir: Path) -> None:
    renderer = Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock())
    with pytest.raises(RenderInputError, match="models pull"):
        renderer.draw(PROMPT, fast=True, **DRAW)
    assert FewStep.for_preset(tiny_preset_dir / "few-step" / "absent.safetensors") is None
    assert FewStep.for_preset(None) is None
