"""The tiny preset: what a build contains, that it is reused, and the presets that point at it."""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.errors import EngineError, UnknownPreset, WeightsMissing
from engine.presets import FEW_STEP_LORA, PRESET_NAMES, load_preset
from engine.tiny.models import (
    COMPLETE_MARKER,
    FACE_EMBEDDING_DIM,
    FEW_STEP_RANK,
    IMAGE_SIZE,
    build_tiny_preset,
    few_step_lora_modules,
)

pytestmark = pytest.mark.slow

PARTS = (
    COMPLETE_MARKER,
    "sdxl/model_index.json",
    "sdxl/tokenizer/tokenizer.json",
    "sdxl/tokenizer_2/tokenizer.json",
    "identitynet/config.json",
    "ip-adapter.bin",
    FEW_STEP_LORA,
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
    "antelopev2/genderage.onnx",
)


def _sdxl_pipe(tiny_preset_dir: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    load: Any = StableDiffusionXLPipeline.from_pretrained  # untyped
    pipe = load(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_unet(tiny_preset_dir: Path) -> Any:
    from diffusers import UNet2DConditionModel

    load: Any = UNet2DConditionModel.from_pretrained  # untyped
    return load(tiny_preset_dir / "sdxl", subfolder="unet")


def test_fresh_build_contains_every_part(tiny_preset_dir: Path) -> None:
    missing = [part for part in PARTS if not (tiny_preset_dir / part).is_file()]
    assert missing == []
    leftovers = [p.name for p in tiny_preset_dir.parent.iterdir() if "building" in p.name]
    assert leftovers == []


def test_second_build_reuses_the_first(tiny_preset_dir: Path) -> None:
    marker = tiny_preset_dir / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns

    assert build_tiny_preset(tiny_preset_dir) == tiny_preset_dir
    assert marker.stat().st_mtime_ns == before


def test_incomplete_folder_is_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "tiny"
    (dest / "sdxl").mkdir(parents=True)
    (dest / "sdxl" / "half-written").write_text("x")

    build_tiny_preset(dest)

    assert (dest / COMPLETE_MARKER).is_file()
    assert not (dest / "sdxl" / "half-written").exists()


def test_tokenizer_loads_offline_and_knows_the_prompt_words(tiny_preset_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_preset_dir / "sdxl" / "tokenizer")

    for word in ("sks", "person", "astronaut"):
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, tokenizer.convert_ids_to_tokens(ids)  # start, the word, end
    ids = tokenizer("zebra on Mars, 1999!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_pipeline_is_sdxl_in_miniature(tiny_preset_dir: Path) -> None:
    from diffusers import ControlNetModel

    pipe = _sdxl_pipe(tiny_preset_dir)
    load_controlnet: Any = ControlNetModel.from_pretrained  # untyped
    identitynet = load_controlnet(tiny_preset_dir / "identitynet")

    text_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == text_width
    assert identitynet.config.cross_attention_dim == text_width
    assert identitynet.config.addition_embed_type == "text_time"
    image = pipe("a photo of sks person", num_inference_steps=2).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_adapter_checkpoint_has_instantid_layout(tiny_preset_dir: Path) -> None:
    state = torch.load(tiny_preset_dir / "ip-adapter.bin", weights_only=True)
    unet = _sdxl_unet(tiny_preset_dir)

    assert set(state) == {"image_proj", "ip_adapter"}
    assert state["image_proj"]["proj_in.weight"].shape[1] == FACE_EMBEDDING_DIM
    assert "layers.3.0.to_kv.weight" in state["image_proj"]  # the Resampler's layout, depth 4
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    expected = {f"{2 * i + 1}.{p}.weight" for i in range(len(cross)) for p in ("to_k_ip", "to_v_ip")}
    assert set(state["ip_adapter"]) == expected


def test_tiny_preset_loads_from_its_folder(tiny_preset_dir: Path) -> None:
    preset = load_preset("tiny", tiny_preset_dir.parent)

    assert preset.root == tiny_preset_dir
    assert preset.family == "sdxl"
    assert preset.resolution == IMAGE_SIZE
    assert preset.sdxl_dir.is_dir() and preset.ip_adapter_path.is_file()
    assert preset.note and "noise" in preset.note


def test_sdxl_preset_without_weights_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissing) as raised:
        load_preset("sdxl", tmp_path)

    message = str(raised.value)
    assert "avatarbooth models pull --preset sdxl" in message
    assert str(tmp_path / "sdxl" / "ip-adapter.bin") in message
    assert isinstance(raised.value, EngineError)


def test_unknown_preset_lists_the_presets(tmp_path: Path) -> None:
    with pytest.raises(UnknownPreset) as raised:
        load_preset("sd15-turbo", tmp_path)

    assert all(name in str(raised.value) for name in PRESET_NAMES)


# --- the few-step LoRA ------------------------------------------------------------------------------

# SDXL-Lightning's 8-step LoRA as published (ByteDance/SDXL-Lightning, its Git LFS pointer): 393,854,592
# bytes, which is exactly a safetensors file of rank-64 float16 factors and float16 alphas on the
# modules ``few_step_lora_modules`` picks from SDXL base, keys named as the tiny file's, no metadata.
PUBLISHED_LORA_BYTES = 393_854_592
PUBLISHED_LORA_MODULES = 788
PUBLISHED_LORA_RANK = 64
_KEY = re.compile(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    return header


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings() -> Iterator[list[str]]:
    """What diffusers and peft log at WARNING or above while the test runs (diffusers' logger does not
    propagate to the root logger, so caplog does not see it)."""
    recorder = _Recorder()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(recorder)
    yield recorder.messages
    for logger in loggers:
        logger.removeHandler(recorder)


def test_few_step_lora_has_the_published_layout(tiny_preset_dir: Path) -> None:
    header = _safetensors_header(tiny_preset_dir / FEW_STEP_LORA)
    unet = _sdxl_unet(tiny_preset_dir)

    assert "__metadata__" not in header
    assert [key for key in header if not _KEY.fullmatch(key)] == []
    assert {entry["dtype"] for entry in header.values()} == {"F16"}
    modules = few_step_lora_modules(unet)
    for name, weight_shape in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        down, up = header[f"{key}.lora_down.weight"]["shape"], header[f"{key}.lora_up.weight"]["shape"]
        assert header[f"{key}.alpha"]["shape"] == []
        assert down == [FEW_STEP_RANK, *weight_shape[1:]]  # a k×k convolution's down keeps its kernel
        assert up == [weight_shape[0], FEW_STEP_RANK, *([1, 1] if len(weight_shape) == 4 else [])]
    assert len(header) == 3 * len(modules)
    names = set(modules)
    assert {"down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= names
    assert {"down_blocks.1.resnets.0.conv_shortcut", "mid_block.resnets.0.time_emb_proj"} <= names
    assert {"mid_block.attentions.0.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"} <= names
    assert not names & {"conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"}


def test_few_step_lora_covers_what_the_published_file_covers_on_sdxl_base() -> None:
    from bench.gpu import SDXL_UNET  # the published SDXL base UNet config
    from diffusers import UNet2DConditionModel

    build: Any = UNet2DConditionModel  # untyped
    with torch.device("meta"):
        unet = build(**SDXL_UNET)
    modules = few_step_lora_modules(unet)
    rank = PUBLISHED_LORA_RANK
    data = sum(2 * rank * (shape[0] + int(np.prod(shape[1:]))) + 2 for shape in modules.values())

    assert len(modules) == PUBLISHED_LORA_MODULES
    # What is left of the published size is the header: some 150 bytes for each of its 2364 tensors.
    assert 2364 * 100 < PUBLISHED_LORA_BYTES - data < 2364 * 200


def test_few_step_lora_loads_with_every_key_and_changes_the_image(
    tiny_preset_dir: Path, diffusers_warnings: list[str]
) -> None:
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    pipe = _sdxl_pipe(tiny_preset_dir)

    def draw() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        image = pipe("a photo of sks person", num_inference_steps=2, generator=generator).images[0]
        return np.asarray(image).astype(np.float64)

    before = draw()
    pipe.load_lora_weights(str(tiny_preset_dir / FEW_STEP_LORA), adapter_name="few_step")
    after = draw()

    # The only warnings: no LoRA for the text encoders, which the published file has none for either.
    assert [m for m in diffusers_warnings if not m.startswith("No LoRA keys associated to CLIPTextModel")] == []
    layers: dict[str, Any] = {name: m for name, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    state = load_file(tiny_preset_dir / FEW_STEP_LORA)
    assert set(layers) == set(few_step_lora_modules(pipe.unet))
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        assert torch.equal(layer.lora_A["few_step"].weight, state[f"{key}.lora_down.weight"].float())
        assert torch.equal(layer.lora_B["few_step"].weight, state[f"{key}.lora_up.weight"].float())
        assert layer.scaling["few_step"] == float(state[f"{key}.alpha"]) / FEW_STEP_RANK == 1 / 8
    assert np.isfinite(after).all()
    assert np.abs(after - before).mean() > 2.0  # of 255


def test_an_older_build_without_the_few_step_lora_gets_the_same_file(tmp_path: Path, tiny_preset_dir: Path) -> None:
    older = tmp_path / "tiny"
    older.mkdir()
    (older / COMPLETE_MARKER).write_text("tiny preset\n")  # a finished build from before few-step mode

    build_tiny_preset(older)

    assert (older / FEW_STEP_LORA).read_bytes() == (tiny_preset_dir / FEW_STEP_LORA).read_bytes()
    assert not (older / "sdxl").exists()  # the rest of a finished build is not built again
    assert [p.name for p in (older / FEW_STEP_LORA).parent.iterdir()] == [Path(FEW_STEP_LORA).name]


def test_tiny_sd15_has_no_few_step_lora(tiny_sd15_preset_dir: Path) -> None:
    preset = load_preset("tiny-sd15", tiny_sd15_preset_dir.parent)

    assert preset.few_step_lora_path is None
    assert not (tiny_sd15_preset_dir / Path(FEW_STEP_LORA).parent).exists()
