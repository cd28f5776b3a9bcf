"""The training memory estimate: measured activations, counted weights and states, and the refusal."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from engine.api import ErrorCode, TrainingMethod, TrainRequest
from engine.train.memory import (
    GIB,
    NotEnoughGpuMemory,
    TrainingShape,
    _flash_like_attention,
    _SavedCounter,
    adafactor_state_numel,
    check_fits,
    lora_parameter_count,
    plan_training,
    unet_saved_bytes,
)
from engine.settings import EngineSettings
from engine.worker import WorkerContext, _run_job, do_train
from tests.support import noise_crops, png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl(tiny_preset_dir: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")


def test_activations_grow_with_pixels_and_batch_and_checkpointing_keeps_a_fraction(
    sdxl: StableDiffusionXLPipeline,
) -> None:
    small = unet_saved_bytes(sdxl.unet, 64, 1, checkpointing=False)
    large = unet_saved_bytes(sdxl.unet, 128, 1, checkpointing=False)
    pair = unet_saved_bytes(sdxl.unet, 64, 2, checkpointing=False)
    kept = unet_saved_bytes(sdxl.unet, 128, 1, checkpointing=True)
    assert 3.0 < large.activations / small.activations <= 4.0  # 4× the pixels; the text side stays
    assert 1.9 < pair.activations / small.activations <= 2.0
    assert kept.activations < 0.5 * large.activations
    assert small.weights == large.weights > 0  # the same weights are held, whatever the size


def test_attention_is_counted_as_flash_attention_keeps_it() -> None:
    q, k, v = (torch.empty(2, 4, 1024, 16, device="meta", requires_grad=True) for _ in range(3))
    counted = _SavedCounter(set())
    with _flash_like_attention(), torch.autograd.graph.saved_tensors_hooks(counted.pack, lambda t: t):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    four_of_qkvo = 4 * q.numel() * 4
    assert counted.outside == four_of_qkvo + 2 * 4 * 1024 * 4  # + log-sum-exp, never the 1024² scores
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_lora_count_matches_what_peft_adds(sdxl: StableDiffusionXLPipeline) -> None:
    from peft import LoraConfig

    targets = ("to_q", "to_k", "to_v", "to_out.0")
    unet = copy.deepcopy(sdxl.unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert lora_parameter_count(sdxl.unet, 4, targets) == trainable > 0


def test_adafactor_state_matches_what_transformers_keeps() -> None:
    from transformers.optimization import Adafactor

    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((8, 4, 3, 3), (16, 8), (5,))]
    optimizer = Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False, beta1=None)
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    for p in params:
        state = optimizer.state[p]
        kept = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1)
        assert kept == adafactor_state_numel(p.shape), p.shape


def test_dreambooth_plans_count_weights_gradients_and_optimizer_state(sdxl: StableDiffusionXLPipeline) -> None:
    modules = {"unet": sdxl.unet, "text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2,
               "vae": sdxl.vae}
    unet_params = sum(p.numel() for p in sdxl.unet.parameters())
    shape = TrainingShape("dreambooth", 64, with_prior=True, gradient_checkpointing=True)
    adamw = plan_training(modules, shape, torch.float16)
    adafactor = plan_training(modules, dataclasses.replace(shape, optimizer="adafactor"), torch.float16)
    assert adamw.parts["trainable"] == adamw.parts["gradients"] == 4 * unet_params
    assert adamw.parts["optimizer"] == 8 * unet_params
    assert adafactor.parts["optimizer"] < 0.5 * adamw.parts["optimizer"]
    assert adamw.parts["resident"] == 2 * sum(sum(p.numel() for p in m.parameters()) for m in modules.values())
    single = plan_training(modules, dataclasses.replace(shape, with_prior=False), torch.float16)
    assert adamw.parts["activations"] == 2 * single.parts["activations"]  # instance and class forwards


def test_a_plan_that_does_not_fit_names_the_settings_to_change(sdxl: StableDiffusionXLPipeline) -> None:
    plan = plan_training({"unet": sdxl.unet}, TrainingShape("dreambooth", 64), torch.float16)
    check_fits(plan, plan.total)  # exactly enough is enough
    with pytest.raises(NotEnoughGpuMemory) as refused:
        check_fits(plan, plan.total - 1)
    message = str(refused.value)
    assert "gradient_checkpointing = true" in message and 'dreambooth_optimizer = "adafactor"' in message
    assert f"{plan.total / GIB:.1f} GiB" in message


# --- the worker refuses before any work -------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WorkerContext:
    settings = EngineSettings(
        preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path_factory.mktemp("blobs"),
        redis_url="redis://unused", device="cpu", train_steps=1,
    )
    return WorkerContext.load(settings)


async def test_a_worker_whose_gpu_is_too_small_refuses_the_method_and_trains_nothing(app: WorkerContext) -> None:
    keys = [app.blobs.put("u1", "crops", png(crop), ".png") for crop in noise_crops(2, seed=4)]
    request = TrainRequest("t-mem", "u1", TrainingMethod.DREAMBOOTH, keys, "sks", "person", steps=1)
    small = dataclasses.replace(app, gpu_bytes=GIB // 1024)
    try:
        result = await _run_job({"app": small}, TrainRequest, request.to_dict(), do_train)
    finally:
        app.memory_plans.update(small.memory_plans)
    assert result["failed"] is True and result["code"] == ErrorCode.NOT_ENOUGH_GPU_MEMORY
    assert 'dreambooth_optimizer = "adafactor"' in result["detail"]
    assert not (app.blobs.root / "u1" / "models").exists()  # refused before training a step

    roomy = dataclasses.replace(app, gpu_bytes=1024 * GIB)
    trained = await _run_job({"app": roomy}, TrainRequest, request.to_dict(), do_train)
    assert trained.get("failed") is not True and trained["method"] == TrainingMethod.DREAMBOOTH
