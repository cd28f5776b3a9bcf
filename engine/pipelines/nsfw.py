"""The image-side safety check: diffusers' CLIP-based ``StableDiffusionSafetyChecker`` on every output.

The real presets use the published checker (``CompVis/stable-diffusion-safety-checker``, fetched by
``avatarbooth models pull`` into ``<preset>/safety_checker/``); the tiny preset runs the same code on a
miniature random-weight checker that ``build_tiny_safety_checker`` writes offline. Both are folders of
``config.json`` + weights + ``preprocessor_config.json``, loaded by ``NsfwChecker.load``.

How the checker decides: the image's CLIP embedding is compared (cosine) with 17 concept embeddings
and 3 "special care" ones; an image is flagged when any cosine exceeds that concept's threshold
(``concept_embeds_weights``). The tiny checker's thresholds are 1.0, which no cosine exceeds: its
noise images are never flagged unless a test lowers them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import WeightsMissing

if TYPE_CHECKING:
    import torch
    from PIL import Image

_log = logging.getLogger(__name__)

SAFETY_CHECKER_DIR = "safety_checker"
"""The checker's folder inside a preset's folder."""

PREPROCESSOR_CONFIG = "preprocessor_config.json"

_TINY_IMAGE_SIZE = 32  # the tiny checker's CLIP input side (the real one's is 224)
_TINY_PROJECTION = 16  # width of the CLIP embedding the concepts are compared in (the real one's is 768)
_NUM_CONCEPTS, _NUM_SPECIAL = 17, 3  # fixed by StableDiffusionSafetyChecker's parameter shapes
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ScreenedImages:
    """Images after the check: flagged ones replaced by black images of the same size."""

    images: list[Image.Image]
    flagged: list[bool]

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)


class NsfwChecker:
    """A loaded safety checker and the CLIP image processor that prepares its input."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model  # diffusers' StableDiffusionSafetyChecker
        self.processor = processor  # transformers' CLIP image processor (PIL backend without torchvision)
        self.device = device

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> NsfwChecker:
        """Load the checker folder ``path`` with ``from_pretrained`` (local files only) onto ``device``.

        ``dtype`` defaults to float16 on CUDA and float32 elsewhere. Raises ``WeightsMissing`` when the
        folder is incomplete.
        """
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor

        _require_checker_files(path)
        target = torch.device(device)
        dtype = dtype or (torch.float16 if target.type == "cuda" else torch.float32)
        model: Any = StableDiffusionSafetyChecker.from_pretrained(path, dtype=dtype, local_files_only=True)
        model = model.to(target).eval()
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)  # type: ignore[no-untyped-call]
        _log.info("safety checker loaded from %s on %s", path, target)
        return cls(model, processor, target)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """One flag per image: True where the checker finds NSFW content."""
        if not images:
            return []
        import numpy as np
        import torch

        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        clip_input = pixels.pixel_values.to(self.device, self.model.dtype)
        # The checker blanks the entries of ``images`` it flags; we pass placeholders and blank our own.
        placeholders = [np.zeros((1, 1, 3), dtype=np.float32) for _ in images]
        with torch.inference_mode():
            _, flagged = self.model(clip_input=clip_input, images=placeholders)
        return [bool(flag) for flag in flagged]

    def screen(self, images: Sequence[Image.Image]) -> ScreenedImages:
        """``check`` the images and replace each flagged one by a black image of its size."""
        from PIL import Image

        flagged = self.check(images)
        kept = [Image.new("RGB", image.size) if bad else image for image, bad in zip(images, flagged)]
        return ScreenedImages(images=kept, flagged=flagged)


def _require_checker_files(path: Path) -> None:
    weights = [path / name for name in ("model.safetensors", "pytorch_model.bin")]
    missing = [str(path / name) for name in ("config.json", PREPROCESSOR_CONFIG) if not (path / name).is_file()]
    if not any(w.is_file() for w in weights):
        missing.append(f"{path}/model.safetensors")
    if missing:
        raise WeightsMissing(
            f"The safety checker's files are missing: {', '.join(missing)}. "
            "Run `avatarbooth models pull --preset <preset>` to fetch them (the tiny preset builds its own)."
        )


# --- the tiny checker -------------------------------------------------------------------------------


def build_tiny_safety_checker(dest: Path, *, seed: int = 0) -> Path:
    """Write a miniature random-weight safety checker folder to ``dest`` (offline, well under a second).

    Same class, file names and preprocessor config format as the published checker, so ``NsfwChecker.load``
    runs unchanged on it. Written into a temporary sibling and renamed; an existing complete folder is
    reused. Returns ``dest``.
    """
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-building-", dir=dest.parent))
    try:
        _write_tiny_checker(work, seed)
        if dest.exists() and not _is_complete(dest):
            shutil.rmtree(dest)  # a half-written folder from an older build
        try:
            os.replace(work, dest)
        except OSError:
            if not _is_complete(dest):
                raise  # another builder finishing first is fine; anything else is not
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _is_complete(path: Path) -> bool:
    try:
        _require_checker_files(path)
    except WeightsMissing:
        return False
    return True


def _write_tiny_checker(folder: Path, seed: int) -> None:
    import json

    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        # The checker builds only the vision tower; the text part is there because CLIPConfig wants one.
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": _TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=_TINY_PROJECTION,
    )
    width = _TINY_PROJECTION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            model.concept_embeds.copy_(torch.randn(_NUM_CONCEPTS, width))
            model.special_care_embeds.copy_(torch.randn(_NUM_SPECIAL, width))
            model.concept_embeds_weights.fill_(1.0)  # no cosine exceeds 1: nothing is flagged
            model.special_care_embeds_weights.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    # The published checker's preprocessor file, scaled down: same keys, same (older) integer-size format.
    preprocessor = {
        "crop_size": _TINY_IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(_CLIP_MEAN),
        "image_std": list(_CLIP_STD),
        "resample": 3,
        "size": _TINY_IMAGE_SIZE,
    }
    (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor, indent=2) + "\n")
