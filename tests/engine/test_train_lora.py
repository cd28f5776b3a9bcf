"""LoRA training on the tiny SDXL: what trains, what must not change, and that the file reloads exactly."""

from __future__ import annotations

import json
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

from engine.train.prior import class_images
from engine.progress import TrainingProgress
from engine.render.renderer import AdapterRef, Renderer
from engine.train.lora import (
    LoraTrainOutcome,
    LoraTrainSettings,
    build_trainable,
    build_trainable_text_encoders,
    start_training,
    train_lora,
)
from engine.train.stages import TrainingInputError, TrainingState, adamw, encode_latents, prepare_data
from tests.support import noise_crops

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
PROMPT = "a photo of sks person"
DRAW = {"seed": 3, "size": (SIZE, SIZE), "steps": 2, "guidance": 5.0}
# A high learning rate so that a few steps visibly change the images (losses on random weights are noise).
SETTINGS = LoraTrainSettings(steps=4, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, seed=0)


def load_pipe(preset_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []


@dataclass
class Run:
    pipe: StableDiffusionXLPipeline
    lock: threading.Lock
    resident_before: dict[str, dict[str, torch.Tensor]]
    lora_before: dict[str, torch.Tensor]
    state: TrainingState
    outcome: LoraTrainOutcome
    progress: list[TrainingProgress]


@pytest.fixture(scope="module")
def run(tiny_preset_dir: Path) -> Run:
    """One training run on a resident pipeline, with everything the tests compare."""
    pipe, lock = load_pipe(tiny_preset_dir), threading.Lock()
    resident = {name: snapshot(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    state = start_training(build_trainable(pipe, lock, SETTINGS), SETTINGS)
    lora_before = {k: v for k, v in snapshot(state.unet).items() if "lora_" in k}
    progress: list[TrainingProgress] = []
    outcome = train_lora(pipe, lock, noise_crops(), "sks", "person", SETTINGS, progress.append, state=state)
    return Run(pipe, lock, resident, lora_before, state, outcome, progress)


def test_training_moves_the_lora_weights(run: Run) -> None:
    after = snapshot(run.state.unet)
    assert run.lora_before, "the trainable copy has no LoRA layers"
    # peft starts lora_B at zero (the adapter is a no-op until trained): every B must have moved off it.
    b_names = [k for k in run.lora_before if "lora_B" in k]
    assert b_names and all(not torch.equal(run.lora_before[k], after[k]) for k in b_names)
    assert all(torch.count_nonzero(after[k]) > 0 for k in b_names)
    assert any(not torch.equal(run.lora_before[k], after[k]) for k in run.lora_before if "lora_A" in k)


def test_trainable_copy_keeps_the_base_weights(run: Run) -> None:
    base = run.resident_before["unet"]
    copy_base = {
        k.replace(".base_layer", ""): v for k, v in snapshot(run.state.unet).items() if "lora_" not in k
    }
    assert_same(base, copy_base)


def test_resident_modules_are_bit_identical_after_training(run: Run) -> None:
    for name, before in run.resident_before.items():
        assert_same(before, snapshot(getattr(run.pipe, name)))
    assert not getattr(run.pipe.unet, "peft_config", None), "the resident UNet got an adapter"


def test_progress_is_reported_every_step(run: Run) -> None:
    assert [p.step for p in run.progress] == list(range(1, SETTINGS.steps + 1))
    assert {p.total for p in run.progress} == {SETTINGS.steps}
    assert all(np.isfinite(p.loss) and p.eta_s >= 0 for p in run.progress)
    assert run.progress[-1].eta_s == 0
    assert run.outcome.steps == SETTINGS.steps
    assert run.outcome.final_loss == run.progress[-1].loss


def test_saved_lora_draws_the_same_image_in_a_fresh_process(run: Run, tiny_preset_dir: Path, tmp_path: Path) -> None:
    lora = tmp_path / "user.safetensors"
    lora.write_bytes(run.outcome.weights)
    renderer = Renderer(run.pipe, run.lock)
    base = np.asarray(renderer.draw(PROMPT, **DRAW)[0])
    in_process = np.asarray(renderer.draw(PROMPT, adapter=AdapterRef("u1", lora), **DRAW)[0])

    fresh = draw_in_subprocess(tiny_preset_dir / "sdxl", lora, tmp_path / "fresh.png")

    assert np.array_equal(fresh, in_process)
    assert not np.array_equal(in_process, base), "the trained LoRA does not change the image"


def draw_in_subprocess(sdxl_dir: Path, lora: Path, out: Path) -> np.ndarray:
    """Load the base with from_pretrained and the LoRA with load_lora_weights in a new interpreter."""
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from diffusers import StableDiffusionXLPipeline
        import threading, torch
        torch.set_num_threads({torch.get_num_threads()})
        pipe = StableDiffusionXLPipeline.from_pretrained({str(sdxl_dir)!r})
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights({str(lora)!r}, adapter_name="fresh")
        pipe.set_adapters(["fresh"])
        (image,) = pipe(
            prompt={PROMPT!r}, negative_prompt=None, num_images_per_prompt=1,
            num_inference_steps={DRAW["steps"]}, guidance_scale={DRAW["guidance"]},
            width={SIZE}, height={SIZE}, generator=[torch.Generator("cpu").manual_seed({DRAW["seed"]})],
        ).images
        image.save({str(out)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.asarray(Image.open(out))


def test_lora_file_carries_its_config(run: Run, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "user.safetensors"
    path.write_bytes(run.outcome.weights)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (SETTINGS.rank, SETTINGS.alpha)


def test_equal_adapters_are_equal_bytes_in_any_process(tiny_preset_dir: Path) -> None:
    """Content-addressed storage needs it: a re-run job must find its adapter under the same key.
    (safetensors writes its metadata map in a per-process order, and peft's targets are a set.)"""
    script = textwrap.dedent(
        f"""
        import hashlib, threading
        from diffusers import StableDiffusionXLPipeline
        from engine.personal.lora import save_lora
        from engine.train.lora import LoraTrainSettings, build_trainable
        pipe = StableDiffusionXLPipeline.from_pretrained({str(tiny_preset_dir / "sdxl")!r})
        unet = build_trainable(pipe, threading.Lock(), LoraTrainSettings(rank=4, alpha=4, seed=0))
        print(hashlib.sha256(save_lora(unet)).hexdigest())
        """
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    digests = []
    for process in runs:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        digests.append(out.split()[-1])
    assert digests[0] == digests[1]


def test_build_trainable_leaves_out_adapters_loaded_for_drawing(run: Run, tmp_path: Path) -> None:
    pipe = run.pipe
    lora = tmp_path / "other.safetensors"
    lora.write_bytes(run.outcome.weights)
    pipe.load_lora_weights(str(lora), adapter_name="someone_else")
    try:
        trainable = build_trainable(pipe, run.lock, SETTINGS)
        assert list(trainable.peft_config) == ["default"]
        assert "someone_else" in pipe.unet.peft_config
    finally:
        pipe.delete_adapters(["someone_else"])


def test_v_prediction_base_trains(tiny_preset_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler

    pipe, lock = load_pipe(tiny_preset_dir), threading.Lock()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    settings = LoraTrainSettings(steps=1, rank=2, alpha=2, resolution=SIZE)
    outcome = train_lora(pipe, lock, noise_crops(1), "sks", "person", settings)
    assert outcome.steps == 1 and np.isfinite(outcome.final_loss)


def test_prepare_data_scales_to_unit_range_and_resizes() -> None:
    pixels = prepare_data([Image.new("RGB", (80, 80), (0, 255, 0)), *noise_crops(1)], SIZE)
    assert pixels.shape == (2, 3, SIZE, SIZE)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_latents_include_mirrored_crops_only_when_flipping(run: Run) -> None:
    pixels = prepare_data(noise_crops(2), SIZE)
    latents = encode_latents(run.pipe, run.lock, pixels, flip=True)
    assert latents.mean.shape == (4, 4, SIZE // 8, SIZE // 8)
    assert not torch.equal(latents.mean[0], latents.mean[2])  # a crop and its mirror differ
    # Flips are opt-in (they erase facial asymmetries): by default only the crops themselves.
    assert encode_latents(run.pipe, run.lock, pixels).mean.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert not LoraTrainSettings().random_flip


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"rank": 0}, {"resolution": 60}, {"batch_size": 0}, {"learning_rate": 0.0}],
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(TrainingInputError):
        LoraTrainSettings(**bad).check()  # type: ignore[arg-type]


def test_no_crops_is_refused() -> None:
    with pytest.raises(TrainingInputError, match="at least one"):
        prepare_data([], SIZE)


# --- prior preservation, text-encoder LoRA, gradient checkpointing ----------------------------------


class CountingLock:
    """A real lock that counts how often it was taken (``class_images`` draws each image under it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self.taken += 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def lora_tensors(weights: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(weights)


def test_prior_preservation_changes_the_lora_and_class_images_are_drawn_once(
    tiny_preset_dir: Path, tmp_path: Path
) -> None:
    pipe, lock = load_pipe(tiny_preset_dir), CountingLock()
    draw = {"resolution": SIZE, "steps": 1}
    classes = class_images(pipe, lock, "tiny", "person", 2, tmp_path, **draw)  # type: ignore[arg-type]
    first_draws = lock.taken
    again = class_images(pipe, lock, "tiny", "person", 2, tmp_path, **draw)  # type: ignore[arg-type]
    assert first_draws == 2 and lock.taken == first_draws, "the second call drew instead of using the cache"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(classes, again, strict=True))

    plain_lock = threading.Lock()
    results = {
        weight: train_lora(
            pipe, plain_lock, noise_crops(), "sks", "person",
            LoraTrainSettings(steps=2, rank=2, alpha=2, learning_rate=5e-2, resolution=SIZE, prior_loss_weight=weight),
            class_images=classes,
        )
        for weight in (0.0, 1.0)
    }
    without, with_prior = (lora_tensors(results[w].weights) for w in (0.0, 1.0))
    assert without.keys() == with_prior.keys()
    assert any(not torch.equal(without[k], with_prior[k]) for k in without)
    # No class images: prior preservation is off, whatever the weight (same run as weight 0).
    no_classes = train_lora(
        pipe, plain_lock, noise_crops(), "sks", "person",
        LoraTrainSettings(steps=2, rank=2, alpha=2, learning_rate=5e-2, resolution=SIZE),
    )
    plain = lora_tensors(no_classes.weights)
    assert all(torch.equal(plain[k], without[k]) for k in without)


@dataclass
class TextEncoderRun:
    pipe: StableDiffusionXLPipeline
    lock: threading.Lock
    settings: LoraTrainSettings
    encoders_before: dict[str, dict[str, torch.Tensor]]
    outcome: LoraTrainOutcome


@pytest.fixture(scope="module")
def te_run(tiny_preset_dir: Path) -> TextEncoderRun:
    """One run with text-encoder LoRA on its own resident pipeline."""
    pipe, lock = load_pipe(tiny_preset_dir), threading.Lock()
    before = {name: snapshot(getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2")}
    settings = LoraTrainSettings(
        steps=2, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, train_text_encoder=True
    )
    return TextEncoderRun(pipe, lock, settings, before, train_lora(pipe, lock, noise_crops(), "sks", "person", settings))


def test_text_encoder_lora_is_saved_and_the_resident_encoders_are_untouched(te_run: TextEncoderRun) -> None:
    for name, before in te_run.encoders_before.items():
        assert_same(before, snapshot(getattr(te_run.pipe, name)))
    keys = lora_tensors(te_run.outcome.weights).keys()
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(".lora" in k for k in keys)


def test_text_encoder_lora_draws_the_same_in_a_fresh_process(
    te_run: TextEncoderRun, tiny_preset_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save

    full, unet_only = tmp_path / "full.safetensors", tmp_path / "unet.safetensors"
    full.write_bytes(te_run.outcome.weights)
    tensors = lora_tensors(te_run.outcome.weights)
    unet_only.write_bytes(save({k: v for k, v in tensors.items() if k.startswith("unet.")}))
    renderer = Renderer(te_run.pipe, te_run.lock)
    in_process = np.asarray(renderer.draw(PROMPT, adapter=AdapterRef("full", full), **DRAW)[0])
    without_te = np.asarray(renderer.draw(PROMPT, adapter=AdapterRef("unet", unet_only), **DRAW)[0])

    fresh = draw_in_subprocess(tiny_preset_dir / "sdxl", full, tmp_path / "fresh.png")

    assert np.array_equal(fresh, in_process)
    assert not np.array_equal(in_process, without_te), "the text-encoder half of the file is not used"
    # The resident encoders now hold adapters loaded for drawing: a new run's copies carry only their own.
    copies = build_trainable_text_encoders(te_run.pipe, te_run.lock, te_run.settings)
    assert all(list(encoder.peft_config) == ["default"] for encoder in copies.values())


def test_the_trainable_copy_attends_with_pytorch_sdpa(run: Run) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = run.state.unet.attn_processors
    assert processors and all(type(p) is AttnProcessor2_0 for p in processors.values())


def test_the_fused_adamw_update_is_the_default_one_within_rounding(run: Run) -> None:
    """``adamw`` fuses the update on CUDA only; here the fused kernel (which the CPU has too) is
    checked against the default one, on the LoRA's own shapes, over three steps."""
    assert not run.state.optimizer.defaults["fused"]  # the CPU keeps the default: bit-for-bit as before
    lora = [p for p in run.state.unet.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=generator) for p in lora] for _ in range(3)]
    copies = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.detach().clone()) for p in lora]
        optimizer = adamw(params, lr=5e-2, weight_decay=1e-2)
        if fused:
            optimizer = torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2, fused=True)
        for step in grads:
            for param, grad in zip(params, step, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        copies[fused] = params
    moved = max((a - b).abs().max().item() for a, b in zip(copies[False], lora, strict=True))
    assert moved > 1e-2  # the steps did move the weights
    for default, fused in zip(copies[False], copies[True], strict=True):
        assert torch.allclose(default, fused, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_the_same_lora(te_run: TextEncoderRun, tiny_preset_dir: Path) -> None:
    pipe, lock = load_pipe(tiny_preset_dir), threading.Lock()
    settings = replace(te_run.settings, gradient_checkpointing=True)
    checkpointed = lora_tensors(train_lora(pipe, lock, noise_crops(), "sks", "person", settings).weights)
    plain = lora_tensors(te_run.outcome.weights)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-5) for k in plain)
