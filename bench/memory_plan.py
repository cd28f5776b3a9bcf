"""Expected peak GPU memory of each training method on the full-size presets, from engine.train.memory.

Builds the published architectures (bench/gpu.py's configs) on the meta device: no weights, no memory,
a few seconds per UNet forward. Prints one JSON object (per preset and method: the parts in GiB and the
total) and, with --markdown, the table docs/memory.md shows.

    python bench/memory_plan.py --markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from bench.gpu import (  # noqa: E402
    CLIP_G_TEXT,
    CLIP_L_TEXT,
    INSTANTID_RESAMPLER_WIDTH,
    SD15_UNET,
    SD15_VAE,
    SDXL_UNET,
    SDXL_VAE,
    ip_attention_state,
    resampler_state,
)
from engine.train.memory import GIB, TrainingShape, plan_training  # noqa: E402
from engine.train.dreambooth import DreamBoothSettings  # noqa: E402
from engine.train.lora import LoraTrainSettings  # noqa: E402

# CompVis/stable-diffusion-safety-checker's vision tower (CLIP ViT-L/14), what engine.pipelines.nsfw keeps resident.
SAFETY_VISION: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "projection_dim": 768,
}


def sdxl_modules() -> dict[str, torch.nn.Module]:
    """The sdxl preset's resident modules (pipeline, IdentityNet, InstantID's adapter, safety checker)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        modules: dict[str, torch.nn.Module] = {
            "unet": unet,
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)),
            "controlnet": ControlNetModel.from_unet(unet),
        }
        adapter = {**resampler_state(INSTANTID_RESAMPLER_WIDTH, unet), **ip_attention_state(unet)}
        modules["identity"] = torch.nn.ParameterList([torch.nn.Parameter(t) for t in adapter.values()])
        modules["safety_checker"] = _safety_checker()
    return modules


def sd15_modules() -> dict[str, torch.nn.Module]:
    """The sd15 preset's resident modules (pipeline and safety checker)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**SD15_UNET),
            "vae": AutoencoderKL(**SD15_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            "safety_checker": _safety_checker(),
        }


def _safety_checker() -> torch.nn.Module:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(vision_config=SAFETY_VISION, projection_dim=SAFETY_VISION["projection_dim"])
    return StableDiffusionSafetyChecker(config)


def shapes(resolution: int, sdxl: bool) -> dict[str, TrainingShape]:
    """The rows of the table: each method with the engine's defaults for the preset, and the variants."""
    lora, booth = LoraTrainSettings(), DreamBoothSettings()
    lora_shape = TrainingShape(
        "lora", resolution, lora.batch_size, lora.with_prior, gradient_checkpointing=sdxl,
        lora_rank=lora.rank, lora_targets=tuple(lora.target_modules),
    )
    booth_shape = TrainingShape(
        "dreambooth", resolution, booth.batch_size, booth.with_prior, booth.gradient_checkpointing,
        optimizer=booth.optimizer,
    )
    return {
        "lora (default)": lora_shape,
        f"lora, gradient_checkpointing = {str(not sdxl).lower()}": dataclasses.replace(
            lora_shape, gradient_checkpointing=not sdxl
        ),
        "ti (default)": TrainingShape("ti", resolution, autocast=False),
        "dreambooth (default: adamw)": booth_shape,
        'dreambooth, optimizer "adafactor"': dataclasses.replace(booth_shape, optimizer="adafactor"),
        "dreambooth, train_text_encoder": dataclasses.replace(booth_shape, train_text_encoder=True),
        'dreambooth, "adafactor" + train_text_encoder': dataclasses.replace(
            booth_shape, optimizer="adafactor", train_text_encoder=True
        ),
    }


def plans() -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for preset, modules, resolution in (("sdxl", sdxl_modules(), 1024), ("sd15", sd15_modules(), 512)):
        out[preset] = {}
        for row, shape in shapes(resolution, preset == "sdxl").items():
            plan = plan_training(modules, shape, torch.float16)
            out[preset][row] = {name: round(size / GIB, 1) for name, size in plan.parts.items()}
            out[preset][row]["total"] = round(plan.total / GIB, 1)
    return out


def markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    columns = ["resident", "trainable", "gradients", "optimizer", "activations", "weight_copies", "overhead", "total"]
    lines = ["| preset | run | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for preset, rows in table.items():
        for row, parts in rows.items():
            lines.append(f"| {preset} | {row} | " + " | ".join(f"{parts[c]:.1f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="also print the table for docs/memory.md")
    args = parser.parse_args(argv)
    table = plans()
    if args.markdown:
        print(markdown(table))
    print(json.dumps({"unit": "GiB", "plans": table}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
