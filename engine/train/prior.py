"""Class images for DreamBooth's prior-preservation loss, drawn once by the base model and cached.

Prior preservation trains on the base model's own pictures of the class ("a photo of a person") next
to the user's photos, so the fine-tuned model keeps knowing what a person looks like in general. The
pictures depend only on the base model, the class word and the drawing settings, not on the user, so
they are drawn once per worker machine and reused by every later run.

Image ``i`` of a set is always drawn with seed ``seed + i``: a larger count reuses the images already on
disk and draws only the new ones. Each image is written atomically, so a killed run leaves only whole files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline

_log = logging.getLogger(__name__)


class ClassImagesError(EngineError):
    """Class images were asked for with settings that cannot work."""


def class_prompt(class_word: str) -> str:
    """The prompt of the class images, and of the prior-preservation loss."""
    return f"a photo of a {class_word}"


def class_images(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    base_id: str,
    class_word: str,
    count: int,
    cache_dir: Path,
    *,
    resolution: int,
    steps: int,
    guidance: float = 5.0,
    seed: int = 0,
) -> list[Image.Image]:
    """``count`` images of ``class_prompt(class_word)`` by the resident ``pipe``, drawn once and cached.

    ``base_id`` names the base weights (e.g. the preset name): a different base gets its own images.
    The pipeline runs under ``lock``, one image at a time, so interactive draws interleave.
    """
    _check(class_word, count, resolution, steps)
    folder = cache_dir / _set_name(base_id, class_word, resolution, steps, guidance, seed)
    missing = [i for i in range(count) if not _image_path(folder, i).is_file()]
    if missing:
        _log.info("drawing %d class images of %r into %s", len(missing), class_word, folder)
        _write_manifest(folder, base_id, class_word, resolution, steps, guidance, seed)
    for i in missing:
        image = _draw(pipe, lock, class_prompt(class_word), resolution, steps, guidance, seed + i)
        _save_atomically(image, _image_path(folder, i))
    return [_load(_image_path(folder, i)) for i in range(count)]


def _check(class_word: str, count: int, resolution: int, steps: int) -> None:
    if not class_word.strip():
        raise ClassImagesError("the class word is empty")
    if count < 0:
        raise ClassImagesError(f"count must not be negative, got {count}")
    if resolution < 8 or resolution % 8:
        raise ClassImagesError(f"resolution must be a positive multiple of 8, got {resolution}")
    if steps < 1:
        raise ClassImagesError(f"steps must be at least 1, got {steps}")


def _set_name(base_id: str, class_word: str, resolution: int, steps: int, guidance: float, seed: int) -> str:
    """A folder name unique to everything that changes the images; readable, then a hash."""
    spec = json.dumps([base_id, class_prompt(class_word), resolution, steps, guidance, seed])
    readable = "".join(c if c.isalnum() else "-" for c in class_word.strip().lower())[:32]
    return f"{readable}-{resolution}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def _image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


@torch.no_grad()
def _draw(
    pipe: TextToImagePipeline,
    lock: threading.Lock,
    prompt: str,
    resolution: int,
    steps: int,
    guidance: float,
    seed: int,
) -> Image.Image:
    generator = torch.Generator("cpu").manual_seed(seed)
    with lock:
        result = pipe(
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=resolution,
            height=resolution,
            generator=generator,
        )
    image: Image.Image = result.images[0]
    return image


def _write_manifest(
    folder: Path, base_id: str, class_word: str, resolution: int, steps: int, guidance: float, seed: int
) -> None:
    """What the folder holds, for a person looking at the cache (the folder name is a hash)."""
    manifest = {
        "base_id": base_id,
        "prompt": class_prompt(class_word),
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
    }
    _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=2).encode())


def _save_atomically(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_atomically(path, buffer.getvalue())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # convert reads the whole file, so it can close
