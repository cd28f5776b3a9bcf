"""The SD1.5 family on its tiny preset: loading, LoRA training and drawing, and no zero-shot preview."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from engine.api import DrawRequest, ErrorCode, PreviewRequest, TrainingMethod, TrainRequest
from engine.pipelines.base import ResidentBase
from engine.errors import PreviewUnavailable, WeightsMissing
from engine.presets import FAMILY_SD15, PRESET_NAMES, load_preset
from engine.render.renderer import AdapterRef, Renderer, img2img_for
from engine.settings import EngineSettings
from engine.tiny.models import COMPLETE_MARKER, build_tiny_sd15_preset
from engine.train.lora import LoraTrainOutcome, LoraTrainSettings, train_lora
from engine.worker import WorkerContext, _run_job, do_draw, do_preview, do_train
from tests.support import noise_crops, png

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
PROMPT = "a photo of sks person"
DRAW = {"seed": 3, "size": (SIZE, SIZE), "steps": 2, "guidance": 7.5}
SETTINGS = LoraTrainSettings(steps=4, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, seed=0)
RESIDENT_MODULES = ("unet", "vae", "text_encoder")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [name for name in before if not torch.equal(before[name], after[name])]


@pytest.fixture(scope="module")
def app(tiny_sd15_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WorkerContext:
    """The real worker context on the tiny SD1.5 preset (no Redis: progress reports are dropped)."""
    settings = EngineSettings(
        preset="tiny-sd15",
        models_dir=tiny_sd15_preset_dir.parent,
        blobs_dir=tmp_path_factory.mktemp("blobs"),
        redis_url="redis://unused",
        device="cpu",
        train_steps=2,
        draw_steps=2,
    )
    return WorkerContext.load(settings)


@pytest.fixture
def renderer(app: WorkerContext) -> Iterator[Renderer]:
    """The worker's renderer; the adapters a test loads are unloaded after it."""
    yield app.renderer
    for adapter_id in app.renderer.loaded_adapters:
        app.renderer.forget(adapter_id)


@dataclass
class Run:
    lora_before: dict[str, torch.Tensor]
    lora_after: dict[str, torch.Tensor]
    resident_before: dict[str, dict[str, torch.Tensor]]
    resident_after: dict[str, dict[str, torch.Tensor]]
    outcome: LoraTrainOutcome


@pytest.fixture(scope="module")
def run(app: WorkerContext) -> Run:
    """One LoRA training run on the resident SD1.5 pipeline, with the weights the tests compare."""
    from engine.train.lora import build_trainable, start_training

    pipe, lock = app.base.text2img, app.base.gpu_lock
    resident_before = {name: snapshot(getattr(pipe, name)) for name in RESIDENT_MODULES}
    state = start_training(build_trainable(pipe, lock, SETTINGS), SETTINGS)
    lora_before = {k: v for k, v in snapshot(state.unet).items() if "lora_" in k}
    outcome = train_lora(pipe, lock, noise_crops(), "sks", "person", SETTINGS, state=state)
    lora_after = {k: v for k, v in snapshot(state.unet).items() if "lora_" in k}
    resident_after = {name: snapshot(getattr(pipe, name)) for name in RESIDENT_MODULES}
    return Run(lora_before, lora_after, resident_before, resident_after, outcome)


# --- the preset ----------------------------------------------------------------------------------------


def test_tiny_sd15_preset_has_its_parts_and_is_reused(tiny_sd15_preset_dir: Path) -> None:
    parts = (COMPLETE_MARKER, "sd15/model_index.json", "sd15/tokenizer/tokenizer.json",
             "antelopev2/scrfd_10g_bnkps.onnx", "antelopev2/glintr100.onnx")
    assert [p for p in parts if not (tiny_sd15_preset_dir / p).is_file()] == []
    assert not (tiny_sd15_preset_dir / "sdxl").exists() and not (tiny_sd15_preset_dir / "ip-adapter.bin").exists()
    assert [p.name for p in tiny_sd15_preset_dir.parent.iterdir() if "building" in p.name] == []
    marker = tiny_sd15_preset_dir / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    assert build_tiny_sd15_preset(tiny_sd15_preset_dir) == tiny_sd15_preset_dir
    assert marker.stat().st_mtime_ns == before


def test_preset_says_it_has_no_preview(tiny_sd15_preset_dir: Path, tiny_preset_dir: Path) -> None:
    preset = load_preset("tiny-sd15", tiny_sd15_preset_dir.parent)

    assert (preset.family, preset.supports_preview) == (FAMILY_SD15, False)
    assert preset.pipeline_dir == preset.sd15_dir == tiny_sd15_preset_dir / "sd15"
    assert preset.note and "noise" in preset.note
    assert load_preset("tiny", tiny_preset_dir.parent).supports_preview  # SDXL: yes


def test_sd15_preset_without_weights_names_only_what_sd15_needs(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing) as raised:
        load_preset("sd15", tmp_path)

    message = str(raised.value)
    assert str(tmp_path / "sd15" / "sd15" / "model_index.json") in message
    assert str(tmp_path / "sd15" / "antelopev2" / "glintr100.onnx") in message
    assert "ip-adapter" not in message and "identitynet" not in message
    assert "avatarbooth models pull --preset sd15" in message


def test_preset_names_and_config_agree() -> None:
    from avatarbooth.config import KNOWN_PRESETS

    assert {"sd15", "tiny-sd15"} <= set(PRESET_NAMES)
    assert set(KNOWN_PRESETS) == set(PRESET_NAMES)


def test_resident_base_loads_sd15_with_from_pretrained(
    tiny_sd15_preset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[tuple[str, dict[str, Any]]] = []
    original = StableDiffusionPipeline.from_pretrained.__func__  # type: ignore[attr-defined]

    def spy(klass: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append((Path(path).name, kwargs))
        return original(klass, path, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", _refuse)

    base = ResidentBase.load(load_preset("tiny-sd15", tiny_sd15_preset_dir.parent), device="cpu")

    assert [name for name, _ in loaded] == ["sd15"]
    assert loaded[0][1]["safety_checker"] is None and loaded[0][1]["requires_safety_checker"] is False
    assert type(base.text2img) is StableDiffusionPipeline
    assert base.instantid is None and base.identity is None
    assert base.unet.config.addition_embed_type is None  # no SDXL text_time conditioning
    assert base.unet.config.cross_attention_dim == base.text2img.text_encoder.config.hidden_size


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("an SDXL pipeline was loaded for an SD1.5 preset")


# --- LoRA training -----------------------------------------------------------------------------------


def test_training_moves_the_lora_weights(run: Run) -> None:
    b_names = [k for k in run.lora_before if "lora_B" in k]
    assert b_names, "the trainable copy has no LoRA layers"
    assert all(not torch.equal(run.lora_before[k], run.lora_after[k]) for k in b_names)
    assert run.outcome.steps == SETTINGS.steps and np.isfinite(run.outcome.final_loss)


def test_resident_modules_are_bit_identical_after_training(run: Run, app: WorkerContext) -> None:
    for name in RESIDENT_MODULES:
        assert changed(run.resident_before[name], run.resident_after[name]) == [], name


def test_lora_file_holds_unet_layers_only(run: Run, tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "user.safetensors"
    path.write_bytes(run.outcome.weights)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)


def test_saved_lora_draws_the_same_image_in_a_fresh_process(
    run: Run, renderer: Renderer, tiny_sd15_preset_dir: Path, tmp_path: Path
) -> None:
    lora = tmp_path / "user.safetensors"
    lora.write_bytes(run.outcome.weights)
    base = np.asarray(renderer.draw(PROMPT, **DRAW)[0])  # type: ignore[arg-type]
    adapter = AdapterRef("u_fresh", lora)
    in_process = np.asarray(renderer.draw(PROMPT, adapter=adapter, **DRAW)[0])  # type: ignore[arg-type]

    fresh = draw_in_subprocess(tiny_sd15_preset_dir / "sd15", lora, tmp_path / "fresh.png")

    assert np.array_equal(fresh, in_process)
    assert not np.array_equal(in_process, base), "the trained LoRA does not change the image"


def draw_in_subprocess(sd15_dir: Path, lora: Path, out: Path) -> np.ndarray:
    """A fresh StableDiffusionPipeline (from_pretrained) with the LoRA (load_lora_weights), in a new interpreter."""
    script = textwrap.dedent(
        f"""
        from diffusers import StableDiffusionPipeline
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        pipe = StableDiffusionPipeline.from_pretrained(
            {str(sd15_dir)!r}, safety_checker=None, requires_safety_checker=False
        )
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


# --- drawing -----------------------------------------------------------------------------------------


def test_each_user_gets_their_own_adapter(app: WorkerContext, renderer: Renderer, tmp_path: Path) -> None:
    refs = {}
    for user, seed in (("user_a", 1), ("user_b", 2)):
        settings = LoraTrainSettings(steps=3, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, seed=seed)
        weights = train_lora(app.base.text2img, app.base.gpu_lock, noise_crops(2, seed), "sks", "person", settings).weights
        (tmp_path / f"{user}.safetensors").write_bytes(weights)
        refs[user] = AdapterRef(user, tmp_path / f"{user}.safetensors")

    def draw(adapter: AdapterRef | None = None) -> np.ndarray:
        return np.asarray(renderer.draw(PROMPT, adapter=adapter, **DRAW)[0])  # type: ignore[arg-type]

    base, a, b, a_again, base_again = draw(), draw(refs["user_a"]), draw(refs["user_b"]), draw(refs["user_a"]), draw()

    assert np.array_equal(a, a_again) and np.array_equal(base, base_again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, base) and not np.array_equal(b, base)
    assert renderer.loaded_adapters == ["user_b", "user_a"]


def test_variations_use_the_sd15_img2img_pipeline(app: WorkerContext, renderer: Renderer) -> None:
    img2img = img2img_for(app.base.text2img)
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    assert img2img.unet is app.base.unet and img2img.vae is app.base.text2img.vae

    start = noise_crops(1, seed=9)[0]
    (image,) = renderer.draw(PROMPT, variation_of=start, strength=0.5, **DRAW)  # type: ignore[arg-type]
    assert image.size == (SIZE, SIZE)


# --- the worker ----------------------------------------------------------------------------------------


def test_preview_on_sd15_fails_clearly(app: WorkerContext) -> None:
    request = PreviewRequest(job_id="p1", owner="u1", embedding_keys=["u1/faces/none.json"], prompt="me")

    with pytest.raises(PreviewUnavailable, match="SDXL") as raised:
        do_preview(app, request)
    assert "/train" in str(raised.value)


async def test_preview_job_on_sd15_returns_a_failure_that_says_why(app: WorkerContext) -> None:
    payload = PreviewRequest(job_id="p2", owner="u1", embedding_keys=["u1/faces/none.json"], prompt="me").to_dict()

    result = await _run_job({"app": app}, PreviewRequest, payload, do_preview)

    assert result["failed"] is True and result["code"] == ErrorCode.PREVIEW_UNAVAILABLE
    assert "InstantID is SDXL-only" in result["detail"]


def test_worker_trains_and_draws_on_sd15(app: WorkerContext, renderer: Renderer) -> None:
    keys = [app.blobs.put("u1", "crops", png(crop), ".png") for crop in noise_crops(2, seed=4)]
    trained = do_train(app, TrainRequest("t1", "u1", TrainingMethod.LORA, keys, "sks", "person", steps=2))

    personal = do_draw(app, DrawRequest("d1", "u1", "me on the moon", [], trained.adapter_key,
                                        TrainingMethod.LORA, "sks", "person"))
    plain = do_draw(app, DrawRequest("d2", "u1", "me on the moon", []))

    assert trained.base_preset == "tiny-sd15" and trained.steps == 2
    assert personal.prompt_used == "sks person on the moon"
    assert plain.prompt_used == "a person on the moon"  # no InstantID fallback on SD1.5: the plain base
    images = [np.asarray(Image.open(app.blobs.path(r.image_keys[0]))) for r in (personal, plain)]
    assert images[0].shape == (app.preset.resolution, app.preset.resolution, 3)
    assert not np.array_equal(*images)


def test_training_after_the_renderer_forgot_every_adapter_still_trains(
    run: Run, app: WorkerContext, renderer: Renderer, tmp_path: Path
) -> None:
    """Deleting a pipeline's last adapter leaves disabled LoRA wrappers behind; the copy must not keep them."""
    lora = tmp_path / "gone.safetensors"
    lora.write_bytes(run.outcome.weights)
    renderer.draw(PROMPT, adapter=AdapterRef("u_gone", lora), **DRAW)  # type: ignore[arg-type]
    renderer.forget("u_gone")
    settings = LoraTrainSettings(steps=1, rank=2, alpha=2, learning_rate=5e-2, resolution=SIZE)

    outcome = train_lora(app.base.text2img, app.base.gpu_lock, noise_crops(1), "sks", "person", settings)

    assert outcome.steps == 1 and np.isfinite(outcome.final_loss)
