"""The tiny presets: real SDXL + InstantID and SD1.5 architectures in miniature, with random seeded weights.

Everything here is built offline in a few seconds on a CPU and written with ``save_pretrained`` (or in
the checkpoint layout of the real file), so the project's real loading code is what tests and the
demo exercise. The images they draw are noise.

Layout of a built ``tiny`` preset (SDXL)::

    dest/
    ├── sdxl/               StableDiffusionXLPipeline.save_pretrained
    ├── identitynet/        ControlNetModel.save_pretrained (InstantID's IdentityNet)
    ├── ip-adapter.bin      InstantID's adapter: image_proj.* (Resampler), ip_adapter.* (to_k/v_ip)
    ├── few-step/           sdxl_lightning_8step_lora.safetensors: SDXL-Lightning's layout, random weights
    ├── antelopev2/         scrfd_10g_bnkps.onnx + glintr100.onnx + genderage.onnx (engine.tiny.faces)
    └── .complete           written last

Layout of a built ``tiny-sd15`` preset (no InstantID: it exists for SDXL only)::

    dest/
    ├── sd15/               StableDiffusionPipeline.save_pretrained (one text encoder, no safety checker)
    ├── antelopev2/         as above
    └── .complete           written last
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

# engine.presets.FEW_STEP_LORA: presets imports this module to build the tiny presets, so this module
# cannot import presets; tests/engine/test_tiny.py checks the file lands where presets looks.
FEW_STEP_LORA = "few-step/sdxl_lightning_8step_lora.safetensors"

if TYPE_CHECKING:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

_log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
"""Written last into a finished build; a folder without it is not a preset."""

IMAGE_SIZE = 128
"""Pixel size of the tiny preset's images (latents are 16×16: the VAE downsamples by 8, like SDXL)."""

FACE_EMBEDDING_DIM = 512
"""Width of an antelopev2 (glintr100) face embedding, the Resampler's input."""

NUM_ID_TOKENS = 16
"""Identity tokens the Resampler produces, as in InstantID."""

_TEXT_HIDDEN = 32  # each CLIP text encoder; an SDXL UNet's cross-attention width is their sum
_POOLED_DIM = 32  # text_encoder_2 projection width (SDXL's pooled text embedding)
_TIME_EMBED_DIM = 8  # SDXL's addition_time_embed_dim; six micro-conditioning numbers
_RESAMPLER_HIDDEN = 64  # one 64-wide head: diffusers' loader infers heads = width // 64
_RESAMPLER_DEPTH = 4  # diffusers' loader assumes InstantID's depth of 4
_KEYPOINT_GAIN = 30.0  # see _wake_identitynet
_SDXL_VAE_SCALE = 0.13025
_SD15_VAE_SCALE = 0.18215

FEW_STEP_RANK = 4
"""Default rank of ``write_few_step_lora``'s LoRA (the published SDXL-Lightning LoRA's is 64)."""
_FEW_STEP_UP_GAIN = 1.0  # at the published scale alpha/rank = 1/8: a change of ~0.4x a typical base weight

# What the UNet is conditioned on besides the latents, per family: SDXL's UNet attends to both text
# encoders and takes the pooled text + six size numbers ("text_time"); SD1.5's attends to one encoder.
_SDXL_UNET_CONDITIONING: dict[str, Any] = {
    "cross_attention_dim": 2 * _TEXT_HIDDEN,
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 6 * _TIME_EMBED_DIM + _POOLED_DIM,
}
_SD15_UNET_CONDITIONING: dict[str, Any] = {
    "cross_attention_dim": _TEXT_HIDDEN,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
}

# Whole-word BPE merges so that prompt words the project uses are single tokens.
_WORDS = (
    "sks", "ohwx", "person", "man", "woman", "photo", "portrait", "astronaut", "of", "a", "an",
    "the", "in", "on", "with", "style", "me", "face", "selfie", "painting", "space", "suit",
)


def build_tiny_sdxl(dest: Path, *, seed: int = 0) -> Path:
    """Build and save a miniature SDXL pipeline (random weights, seeded) into ``dest``.

    ``dest`` must not exist yet or be empty. Returns ``dest``; load it with
    ``StableDiffusionXLPipeline.from_pretrained(dest)``.
    """
    pipe = _tiny_sdxl_pipeline(seed)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_sd15(dest: Path, *, seed: int = 0) -> Path:
    """Build and save a miniature SD1.5 pipeline (random weights, seeded) into ``dest``.

    ``dest`` must not exist yet or be empty. Returns ``dest``; load it with
    ``StableDiffusionPipeline.from_pretrained(dest)``.
    """
    pipe = _tiny_sd15_pipeline(seed)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_preset(dest: Path, *, seed: int = 0) -> Path:
    """Build the whole tiny SDXL preset into ``dest`` (see the module docstring), or reuse a finished one.

    Built atomically (``_build_atomically``), so a half-built preset is never seen. A finished build
    from before few-step mode gets its few-step LoRA added. Returns ``dest``.
    """
    _build_atomically(dest, lambda work: _build_parts(work, seed), label="tiny preset")
    if not (dest / FEW_STEP_LORA).is_file():  # a build from before few-step mode
        write_few_step_lora(_tiny_unet(seed), dest / FEW_STEP_LORA, seed=seed + 3)
    return dest


def build_tiny_sd15_preset(dest: Path, *, seed: int = 0) -> Path:
    """Build the tiny SD1.5 preset (``sd15/`` + ``antelopev2/``) into ``dest``, or reuse a finished one.

    Built atomically like ``build_tiny_preset``. Returns ``dest``.
    """
    return _build_atomically(dest, lambda work: _build_sd15_parts(work, seed), label="tiny sd15 preset")


def _build_atomically(dest: Path, build_parts: Callable[[Path], None], *, label: str) -> Path:
    """Run ``build_parts`` on a temporary sibling folder, mark it complete, and rename it to ``dest``.

    A ``dest`` that already holds the marker is reused as it is.
    """
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-building-", dir=dest.parent))
    try:
        build_parts(work)
        (work / COMPLETE_MARKER).write_text(f"{label}\n")
        _install(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _build_sd15_parts(work: Path, seed: int) -> None:
    """Write every part of the tiny SD1.5 preset into ``work``."""
    from engine.tiny.faces import build_tiny_face_models

    build_tiny_sd15(work / "sd15", seed=seed)
    build_tiny_face_models(work / "antelopev2")


def _build_parts(work: Path, seed: int) -> None:
    """Write every part of the tiny SDXL preset into ``work``."""
    from diffusers import ControlNetModel

    from engine.tiny.faces import build_tiny_face_models

    build_tiny_sdxl(work / "sdxl", seed=seed)
    unet = _tiny_unet(seed)  # same config and weights as the saved one, without reloading it
    _seed(seed + 1)
    identitynet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    _wake_identitynet(identitynet)
    identitynet.save_pretrained(work / "identitynet", safe_serialization=True)
    _save_instantid_adapter(work / "ip-adapter.bin", unet, seed + 2)
    write_few_step_lora(unet, work / FEW_STEP_LORA, seed=seed + 3)
    build_tiny_face_models(work / "antelopev2")


def write_few_step_lora(unet: UNet2DConditionModel, path: Path, *, seed: int = 0, rank: int = FEW_STEP_RANK) -> Path:
    """Write a random LoRA for ``unet`` (an SDXL UNet, any size) in SDXL-Lightning's published layout.

    Kohya-style keys on diffusers module names, ``lora_unet_<module path, dots as underscores>`` with
    ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` each, over ``few_step_lora_modules``;
    convolutions get a k×k down and a 1×1 up; float16 throughout, alpha included; no metadata; alpha
    is rank/8, the published scale (rank 64, alpha 8). Both factors are random and non-zero (a fresh
    LoRA's up-projection is zero), so the LoRA changes the image as the distilled one does. The same
    ``seed`` writes the same bytes, to a temporary sibling renamed into place. Returns ``path``.
    """
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, weight_shape in few_step_lora_modules(unet).items():  # (out, in) or (out, in, k, k)
        fan_in = math.prod(weight_shape[1:])
        down = torch.randn((rank, *weight_shape[1:]), generator=generator) / fan_in**0.5
        up = _FEW_STEP_UP_GAIN * torch.randn((weight_shape[0], rank), generator=generator)
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = (up if len(weight_shape) == 2 else up[:, :, None, None]).half()
        state[f"{key}.alpha"] = torch.tensor(rank / 8, dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)  # a concurrent builder's file holds the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def few_step_lora_modules(unet: UNet2DConditionModel) -> dict[str, tuple[int, ...]]:
    """The modules SDXL-Lightning's LoRA adapts, with their weights' shapes: every Linear and Conv2d
    of the transformer blocks, the attentions' proj_in/proj_out, the resnets' (conv1, conv2,
    time_emb_proj, conv_shortcut) and the down/upsamplers' convolutions; not conv_in, conv_out, nor the
    time and added-condition embeddings. On SDXL base that is the published file's 788 modules.

    LoRA layers already in ``unet`` (peft's) are seen through: their base layer is the module.
    """
    import torch

    adapted = ("transformer_blocks", "proj_in", "proj_out", ".resnets.", "samplers.")
    found: dict[str, tuple[int, ...]] = {}
    for name, module in cast("torch.nn.Module", unet).named_modules():  # diffusers' classes are untyped
        name = name.removesuffix(".base_layer")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in name:
            continue
        if any(part in name for part in adapted):
            found[name] = tuple(module.weight.shape)
    return found


def _wake_identitynet(controlnet: Any) -> None:
    """Give the fresh ControlNet weights under which keypoints and identity tokens change the image.

    ``from_unet`` zero-initialises the output convolutions, so a fresh ControlNet adds nothing; a
    trained IdentityNet does. The keypoint image is sparse (dots on black), so the condition
    embedding gets variance-keeping weights and a louder output, or its signal would vanish.
    """
    import torch

    for conv in [controlnet.controlnet_mid_block, *controlnet.controlnet_down_blocks]:
        conv.reset_parameters()
    embedding = controlnet.controlnet_cond_embedding
    for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        embedding.conv_out.weight.mul_(_KEYPOINT_GAIN)


def _install(work: Path, dest: Path) -> None:
    """Move a finished build into place; a concurrent builder that finished first wins."""
    if dest.exists() and not (dest / COMPLETE_MARKER).is_file():
        shutil.rmtree(dest)  # an old, incomplete folder (not ours to keep)
    try:
        os.replace(work, dest)
    except OSError:
        if not (dest / COMPLETE_MARKER).is_file():
            raise
        _log.info("the build at %s was finished by another builder", dest)


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _tiny_sdxl_pipeline(seed: int) -> StableDiffusionXLPipeline:
    """The miniature SDXL pipeline, in memory."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_clip_tokenizer()
    text_config = _tiny_clip_text_config(tokenizer)
    _seed(seed + 10)
    text_encoder = CLIPTextModel(text_config)
    _seed(seed + 11)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(seed + 12, scaling_factor=_SDXL_VAE_SCALE),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_tiny_unet(seed),
        scheduler=_tiny_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _tiny_sd15_pipeline(seed: int) -> StableDiffusionPipeline:
    """The miniature SD1.5 pipeline, in memory: one CLIP text encoder, no safety checker."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    _seed(seed + 10)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed + 12, scaling_factor=_SD15_VAE_SCALE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_tiny_unet(seed, conditioning=_SD15_UNET_CONDITIONING),
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(seed: int, *, scaling_factor: float) -> AutoencoderKL:
    """A 4-block VAE (8x downsampling, like SD1.5's and SDXL's) in miniature."""
    from diffusers import AutoencoderKL

    _seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def _tiny_scheduler() -> EulerDiscreteScheduler:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


def _tiny_unet(seed: int, *, conditioning: dict[str, Any] = _SDXL_UNET_CONDITIONING) -> UNet2DConditionModel:
    """The UNet in miniature; ``conditioning`` sets its family (SDXL's text_time by default)."""
    from diffusers import UNet2DConditionModel

    _seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **conditioning,
    )


def _tiny_clip_text_config(tokenizer: Any) -> Any:
    """The CLIP text config in miniature, with the published SD1.5/SDXL configs' legacy ``eos_token_id=2``.

    With 2, transformers pools at ``input_ids.argmax(-1)`` (the highest id, end-of-text in the base
    vocabulary but an added Textual Inversion word when there is one); the tiny models keep that value
    so that the tests meet the real bases' configs (``engine.pipelines.base.pool_at_end_of_text`` fixes it on load).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_POOLED_DIM,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=2,  # the legacy value of the published SD1.5/SDXL text encoder configs
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_clip_tokenizer() -> Any:
    """A byte-level CLIP BPE tokenizer: every byte is a token, plus whole-word merges for ``_WORDS``."""
    return clip_tokenizer()


def clip_tokenizer(vocab_size: int | None = None, *, pad_token: str = "<|endoftext|>") -> Any:
    """A byte-level CLIP BPE tokenizer: every byte is a token, plus whole-word merges for ``_WORDS``.

    Any text tokenizes (no unknown tokens); saved and loaded with ``save_pretrained``/``from_pretrained``.
    With ``vocab_size`` (CLIP's is 49408) filler merges of byte pairs pad the vocabulary to that size,
    start- and end-of-text taking the last two ids as in CLIP; "!" is id 0, as in CLIP, and SDXL's
    second tokenizer pads with it (``pad_token="!"``).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(vocab_size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def clip_vocab_and_merges(vocab_size: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and ranked merges of ``clip_tokenizer`` (what CLIP's vocab.json and merges.txt hold)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge what earlier merges leave of the word, so they cannot split it again.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], merges)
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            tokens.append(merged)
    tokens = list(dict.fromkeys(tokens))
    if vocab_size is not None:
        known, wanted = set(tokens), vocab_size - 2
        for first in alphabet:  # ranked after the word merges, so the words stay whole
            for second in alphabet:
                if len(tokens) >= wanted:
                    break
                if first + second not in known:
                    merges.append((first, second))
                    tokens.append(first + second)
                    known.add(first + second)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _apply_merges(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly apply the best-ranked merge present."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def _save_instantid_adapter(path: Path, unet: UNet2DConditionModel, seed: int) -> None:
    """Write an adapter checkpoint in InstantID's key layout for ``unet``'s cross-attention."""
    import torch

    _seed(seed)
    state = {
        "image_proj": _resampler_state(unet.config.cross_attention_dim),
        "ip_adapter": _ip_attn_state(unet),
    }
    torch.save(state, path)


def _resampler_state(output_dim: int, width: int = _RESAMPLER_HIDDEN) -> dict[str, torch.Tensor]:
    """Random weights in the original IP-Adapter/InstantID Resampler's key layout (InstantID's is 1280 wide)."""
    import torch

    dim, inner, ff = width, width, 4 * width

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f) / in_f**0.5

    def bias(size: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(size)

    def norm_weight(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size)

    # Trained weights have biases, and their size matters: proj_in's bias is larger than what a unit
    # face vector contributes through proj_in (≈ 0.04 per channel) and smaller than what the raw
    # recognizer vector (norm ≈ 22) contributes (≈ 1), so the identity tokens depend on the input's
    # scale as in InstantID. A zero bias would make the LayerNorm after it scale-invariant.
    state = {
        "latents": torch.randn(1, NUM_ID_TOKENS, dim) / dim**0.5,
        "proj_in.weight": linear(dim, FACE_EMBEDDING_DIM),
        "proj_in.bias": bias(dim, 0.5),
        "proj_out.weight": linear(output_dim, dim),
        "proj_out.bias": bias(output_dim, 0.02),
        "norm_out.weight": norm_weight(output_dim),
        "norm_out.bias": bias(output_dim, 0.02),
    }
    for i in range(_RESAMPLER_DEPTH):
        attn, mlp = f"layers.{i}.0", f"layers.{i}.1"
        for norm in ("norm1", "norm2"):
            state[f"{attn}.{norm}.weight"] = norm_weight(dim)
            state[f"{attn}.{norm}.bias"] = bias(dim, 0.02)
        state[f"{attn}.to_q.weight"] = linear(inner, dim)
        state[f"{attn}.to_kv.weight"] = linear(2 * inner, dim)
        state[f"{attn}.to_out.weight"] = linear(dim, inner)
        state[f"{mlp}.0.weight"] = norm_weight(dim)
        state[f"{mlp}.0.bias"] = bias(dim, 0.02)
        state[f"{mlp}.1.weight"] = linear(ff, dim)
        state[f"{mlp}.3.weight"] = linear(dim, ff)
    return state


def _ip_attn_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """``<n>.to_k_ip.weight``/``<n>.to_v_ip.weight`` per cross-attention, numbered as IP-Adapter does.

    IP-Adapter numbers all attention processors (self- and cross-attention alternate) and keeps
    the cross-attention ones, so they get the odd numbers 1, 3, 5, ... in ``attn_processors`` order.
    """
    import torch

    state: dict[str, torch.Tensor] = {}
    cross_dim = unet.config.cross_attention_dim
    cross_names = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for number, name in zip(range(1, 2 * len(cross_names), 2), cross_names):
        hidden = _attn_hidden_size(unet, name)
        for proj in ("to_k_ip", "to_v_ip"):
            state[f"{number}.{proj}.weight"] = torch.randn(hidden, cross_dim) / cross_dim**0.5
    return state


def _attn_hidden_size(unet: UNet2DConditionModel, processor_name: str) -> int:
    channels = list(unet.config.block_out_channels)
    if processor_name.startswith("mid_block"):
        return channels[-1]
    block_id = int(processor_name.split(".")[1])
    if processor_name.startswith("up_blocks"):
        return channels[::-1][block_id]
    return channels[block_id]
