"""DreamBooth on the tiny SDXL: what trains, what must not change, resume, and drawing by weight swap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load

from engine.train.checkpoints import CheckpointStore
from engine.train.prior import class_images
from engine.progress import TrainingProgress
from engine.render.renderer import AdapterRef, Renderer
from engine.personal.dreambooth import WEIGHTS_FORMAT, DreamBoothWeightsError, WeightSwapper, swap_unet_weights
from engine.train.dreambooth import DreamBoothSettings, build_trainable, train_dreambooth
from engine.train.lora import LoraTrainSettings, train_lora
from engine.train.stages import (
    TrainablePrompts,
    TrainingInputError,
    encode_instance_prompt,
    encode_tokens,
    prepare_prompts,
)
from storage.blobs import LocalBlobStore
from tests.support import noise_crops

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
PROMPT = "a photo of sks person"
DRAW = {"num_inference_steps": 2, "guidance_scale": 5.0, "width": SIZE, "height": SIZE}
# A high learning rate so that a few steps visibly change the images (losses on random weights are noise).
SETTINGS = DreamBoothSettings(
    steps=4, learning_rate=1e-3, resolution=SIZE, num_class_images=2, gradient_checkpointing=False, checkpoint_every=2
)
RESIDENT = ("unet", "vae", "text_encoder", "text_encoder_2")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights, named as without LoRA layers (a loaded-then-deleted adapter renames them)."""
    return {
        name.replace(".base_layer.", "."): tensor.detach().clone()
        for name, tensor in module.state_dict().items()
        if "lora_" not in name
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def draw(pipe: StableDiffusionXLPipeline, prompt: str = PROMPT) -> np.ndarray:
    (image,) = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(3), **DRAW).images
    return np.asarray(image)


@dataclass
class Run:
    pipe: StableDiffusionXLPipeline
    lock: threading.Lock
    resident_before: dict[str, dict[str, torch.Tensor]]
    classes: list[Image.Image]
    weights: bytes
    progress: list[TrainingProgress]
    path: Path


@pytest.fixture(scope="module")
def run(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One DreamBooth run with prior preservation, and its weights file on disk."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    resident = {name: snapshot(getattr(pipe, name)) for name in RESIDENT}
    folder = tmp_path_factory.mktemp("dreambooth")
    classes = class_images(
        pipe, lock, "tiny", "person", SETTINGS.num_class_images, folder / "classes", resolution=SIZE, steps=1
    )
    progress: list[TrainingProgress] = []
    outcome = train_dreambooth(pipe, lock, noise_crops(), "sks", "person", classes, SETTINGS, progress.append)
    path = folder / "user.safetensors"
    path.write_bytes(outcome.weights)
    return Run(pipe, lock, resident, classes, outcome.weights, progress, path)


def unet_weights(data: bytes) -> dict[str, torch.Tensor]:
    return {k.removeprefix("unet."): v for k, v in load(data).items() if k.startswith("unet.")}


# --- training ---------------------------------------------------------------------------------------


def test_every_unet_weight_is_saved_and_the_weights_moved(run: Run) -> None:
    saved = load(run.weights)
    base = run.resident_before["unet"]
    assert set(saved) == {f"unet.{k}" for k in base}  # the UNet only: text encoders are opt-in
    assert {t.dtype for t in saved.values()} == {run.pipe.unet.dtype}  # saved as the resident draws
    moved = [k for k in base if not torch.equal(saved[f"unet.{k}"], base[k])]
    assert len(moved) > len(base) // 2


def test_resident_modules_are_bit_identical_after_training(run: Run) -> None:
    for name, before in run.resident_before.items():
        assert same(before, snapshot(getattr(run.pipe, name))), name


def test_progress_is_reported_every_step(run: Run) -> None:
    assert [p.step for p in run.progress] == list(range(1, SETTINGS.steps + 1))
    assert {p.total for p in run.progress} == {SETTINGS.steps}
    assert all(np.isfinite(p.loss) for p in run.progress) and run.progress[-1].eta_s == 0


def test_the_prior_loss_uses_the_class_images(run: Run) -> None:
    without_prior = train_dreambooth(
        run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, replace(SETTINGS, prior_loss_weight=0.0)
    )
    other_classes = train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", noise_crops(2, seed=9), SETTINGS)
    again = train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, SETTINGS)

    assert again.weights == run.weights  # the same inputs train the same weights
    assert not same(unet_weights(without_prior.weights), unet_weights(run.weights))
    assert not same(unet_weights(other_classes.weights), unet_weights(run.weights))


def test_a_killed_run_resumes_from_its_last_checkpoint(run: Run, tmp_path: Path) -> None:
    store = CheckpointStore(LocalBlobStore(tmp_path / "blobs"), "u1", "train-5")
    seen: list[int] = []

    def die_at_step_3(progress: TrainingProgress) -> None:
        seen.append(progress.step)
        if progress.step == 3:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        train_dreambooth(
            run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, SETTINGS, die_at_step_3, checkpoints=store
        )
    resumed_steps: list[int] = []
    outcome = train_dreambooth(
        run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, SETTINGS,
        lambda p: resumed_steps.append(p.step), checkpoints=store,
    )

    assert seen == [1, 2, 3] and resumed_steps == [3, 4]  # checkpoint at step 2: steps 3-4 run again
    assert outcome.weights == run.weights  # bit-identical to the uninterrupted run
    store.clear()
    assert store.load_latest() is None


def test_adafactor_trains_and_resumes_with_a_fraction_of_adamws_state(run: Run, tmp_path: Path) -> None:
    settings = replace(SETTINGS, optimizer="adafactor")
    straight = train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, settings)
    assert not same(unet_weights(straight.weights), unet_weights(run.weights))  # another optimizer, other steps
    base = run.resident_before["unet"]
    assert any(not torch.equal(t, base[k]) for k, t in unet_weights(straight.weights).items())

    store = CheckpointStore(LocalBlobStore(tmp_path / "blobs"), "u1", "train-6")

    def die_at_step_3(progress: TrainingProgress) -> None:
        if progress.step == 3:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, settings,
                         die_at_step_3, checkpoints=store)
    checkpoint = store.load_latest()
    assert checkpoint is not None
    state_numel = sum(
        t.numel() for s in checkpoint.optimizer_state["state"].values() for t in s.values() if torch.is_tensor(t)
    )
    assert state_numel < 0.5 * sum(t.numel() for t in base.values())  # AdamW keeps 2 per weight
    resumed = train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, settings,
                               checkpoints=store)
    assert resumed.weights == straight.weights  # the same computation repeated: bit for bit


def test_an_unknown_optimizer_is_refused_by_name() -> None:
    with pytest.raises(TrainingInputError, match="optimizer must be one of adamw, adafactor"):
        replace(SETTINGS, optimizer="sgd").check()


def test_gradient_checkpointing_trains_the_same_weights(run: Run) -> None:
    outcome = train_dreambooth(
        run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, replace(SETTINGS, gradient_checkpointing=True)
    )
    saved, expected = unet_weights(outcome.weights), unet_weights(run.weights)
    assert same(saved, expected)  # recomputing activations changes nothing on the CPU


def test_text_encoders_train_when_asked(run: Run) -> None:
    settings = replace(SETTINGS, steps=2, train_text_encoder=True)
    outcome = train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", run.classes, settings)

    saved = load(outcome.weights)
    for name in ("text_encoder", "text_encoder_2"):
        base = run.resident_before[name]
        assert {k.removeprefix(f"{name}.") for k in saved if k.startswith(f"{name}.")} == set(base)
        assert any(not torch.equal(saved[f"{name}.{k}"], base[k]) for k in base)
    for name, before in run.resident_before.items():
        assert same(before, snapshot(getattr(run.pipe, name))), name


def test_trainable_prompts_encode_as_the_pipeline_does(run: Run) -> None:
    settings = replace(SETTINGS, train_text_encoder=True)
    prompts = prepare_prompts(run.pipe, run.lock, "sks", "person", settings)
    assert isinstance(prompts, TrainablePrompts)
    encoders = [run.pipe.text_encoder, run.pipe.text_encoder_2]
    with torch.no_grad():
        ours = encode_tokens(encoders, prompts.instance_ids, prompts.time_ids)
    pipeline = encode_instance_prompt(run.pipe, run.lock, PROMPT, SIZE)
    # Two code paths (our encoder calls vs the pipeline's encode_prompt): last-bit differences from
    # kernel choice / memory alignment (seen on AVX-512), so a tight tolerance. time_ids are exact sizes.
    torch.testing.assert_close(ours.prompt_embeds, pipeline.prompt_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.pooled_embeds, pipeline.pooled_embeds, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.time_ids, pipeline.time_ids)


def test_prior_preservation_without_class_images_is_refused(run: Run) -> None:
    with pytest.raises(TrainingInputError, match="class images"):
        train_dreambooth(run.pipe, run.lock, noise_crops(), "sks", "person", [], SETTINGS)


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"learning_rate": 0.0}, {"prior_loss_weight": -1.0}, {"resolution": 60}, {"batch_size": 0},
     {"checkpoint_every": 0}],
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(TrainingInputError):
        DreamBoothSettings(**bad).check()  # type: ignore[arg-type]


# --- drawing by weight swap ---------------------------------------------------------------------------


def test_swapped_weights_draw_differently_and_the_base_comes_back(run: Run) -> None:
    base = draw(run.pipe)
    swapper = WeightSwapper(run.pipe)
    with swap_unet_weights(run.pipe, run.lock, run.path, swapper) as pipe:
        assert run.lock.locked()  # nobody else can draw while the user's weights are in
        personal = draw(pipe)
    assert not run.lock.locked()
    with swap_unet_weights(run.pipe, run.lock, run.path, swapper) as pipe:
        again = draw(pipe)

    assert not np.array_equal(personal, base)
    assert np.array_equal(personal, again)
    assert np.array_equal(draw(run.pipe), base)
    assert same(run.resident_before["unet"], snapshot(run.pipe.unet))


def test_saved_weights_draw_the_same_image_in_a_fresh_process(run: Run, tiny_preset_dir: Path, tmp_path: Path) -> None:
    with swap_unet_weights(run.pipe, run.lock, run.path) as pipe:
        in_process = draw(pipe)

    script = textwrap.dedent(
        f"""
        import torch
        from diffusers import StableDiffusionXLPipeline
        from safetensors.torch import load_file
        torch.set_num_threads({torch.get_num_threads()})
        pipe = StableDiffusionXLPipeline.from_pretrained({str(tiny_preset_dir / "sdxl")!r})
        pipe.set_progress_bar_config(disable=True)
        weights = load_file({str(run.path)!r})
        pipe.unet.load_state_dict({{k.removeprefix("unet."): v for k, v in weights.items()}}, strict=True)
        (image,) = pipe(prompt={PROMPT!r}, generator=torch.Generator("cpu").manual_seed(3), **{DRAW!r}).images
        image.save({str(tmp_path / "fresh.png")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    assert np.array_equal(np.asarray(Image.open(tmp_path / "fresh.png")), in_process)


def test_swap_works_next_to_loaded_lora_adapters(run: Run, tmp_path: Path) -> None:
    """The renderer's LoRA layers rename the resident weights; the swap must still hit the right ones."""
    with swap_unet_weights(run.pipe, run.lock, run.path) as pipe:
        plain = draw(pipe)
    lora = tmp_path / "lora.safetensors"
    lora_settings = LoraTrainSettings(steps=1, rank=2, alpha=2, resolution=SIZE)
    lora.write_bytes(train_lora(run.pipe, run.lock, noise_crops(1), "sks", "person", lora_settings).weights)
    renderer = Renderer(run.pipe, run.lock)
    renderer.draw(PROMPT, adapter=AdapterRef("u2", lora), size=(SIZE, SIZE), steps=1)  # loaded, then disabled
    try:
        trainable, _ = build_trainable(run.pipe, run.lock, SETTINGS)
        assert not getattr(trainable, "peft_config", None)
        with swap_unet_weights(run.pipe, run.lock, run.path) as pipe:
            assert np.array_equal(draw(pipe), plain)
    finally:
        renderer.forget("u2")
    assert same(run.resident_before["unet"], snapshot(run.pipe.unet))


def test_a_file_for_another_base_is_refused_and_changes_nothing(run: Run) -> None:
    weights = load(run.weights)
    del weights["unet.conv_in.bias"]
    with pytest.raises(DreamBoothWeightsError, match="different base"):
        with WeightSwapper(run.pipe).swapped(weights):
            pass
    with pytest.raises(DreamBoothWeightsError, match="not a DreamBooth"):
        with WeightSwapper(run.pipe).swapped({"vae.x": torch.zeros(1)}):
            pass
    assert same(run.resident_before["unet"], snapshot(run.pipe.unet))


def test_swaps_do_not_nest(run: Run) -> None:
    swapper = WeightSwapper(run.pipe)
    weights = load(run.weights)
    with swapper.swapped(weights):
        with pytest.raises(DreamBoothWeightsError, match="already active"):
            with swapper.swapped(weights):
                pass
    assert same(run.resident_before["unet"], snapshot(run.pipe.unet))


def test_a_failing_draw_still_restores_the_base(run: Run) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with swap_unet_weights(run.pipe, run.lock, run.path):
            raise RuntimeError("boom")
    assert not run.lock.locked()
    assert same(run.resident_before["unet"], snapshot(run.pipe.unet))


def test_weights_file_is_plain_safetensors(run: Run) -> None:
    from safetensors import safe_open

    with safe_open(str(run.path), framework="pt") as f:
        assert f.metadata() == {"format": WEIGHTS_FORMAT}


# --- SD1.5 -------------------------------------------------------------------------------------------


def test_sd15_trains_and_swaps_with_its_one_text_encoder(tiny_sd15_preset_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_preset_dir / "sd15", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    before = {name: snapshot(getattr(pipe, name)) for name in ("unet", "text_encoder")}
    classes = class_images(pipe, lock, "tiny-sd15", "person", 1, tmp_path / "classes", resolution=SIZE, steps=1)
    settings = replace(SETTINGS, steps=2, train_text_encoder=True)

    prompts = prepare_prompts(pipe, lock, "sks", "person", settings)
    assert isinstance(prompts, TrainablePrompts)
    with torch.no_grad():
        ours = encode_tokens([pipe.text_encoder], prompts.instance_ids, prompts.time_ids)
    # Two code paths (encode_tokens vs the pipeline's encode_prompt): last-bit noise, so a tight tolerance.
    drawn = encode_instance_prompt(pipe, lock, PROMPT, SIZE).prompt_embeds
    torch.testing.assert_close(ours.prompt_embeds, drawn, rtol=1e-5, atol=1e-6)

    path = tmp_path / "user.safetensors"
    path.write_bytes(train_dreambooth(pipe, lock, noise_crops(), "sks", "person", classes, settings).weights)
    assert {k.split(".", 1)[0] for k in load(path.read_bytes())} == {"unet", "text_encoder"}
    base = draw(pipe)
    with swap_unet_weights(pipe, lock, path) as swapped:
        personal = draw(swapped)
    assert not np.array_equal(personal, base)
    assert np.array_equal(draw(pipe), base)
    assert all(same(before[name], snapshot(getattr(pipe, name))) for name in before)
