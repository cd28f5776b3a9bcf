"""Helpers shared by tests: the real engine worker in-process, and real face photos."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageEnhance, ImageOps

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline


def free_port() -> int:
    """A TCP port nothing listens on now on 127.0.0.1 (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_tiny_sdxl(preset_dir: Path) -> StableDiffusionXLPipeline:
    """A fresh tiny SDXL pipeline from the tiny preset's folder, progress bars off."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@asynccontextmanager
async def running_worker(
    redis_url: str, blobs_dir: Path, models_dir: Path, *, training_timeout_s: int = 300
) -> AsyncIterator[None]:
    """The real engine worker (engine.worker.run_worker) on the tiny preset, in this event loop.

    ``models_dir`` must hold ``tiny/`` (pass ``tiny_preset_dir.parent`` to reuse the session build).
    """
    from redis.asyncio import Redis

    from engine.api import WORKER_KEY_PREFIX
    from engine.settings import EngineSettings
    from engine.worker import run_worker

    settings = EngineSettings(
        preset="tiny",
        models_dir=models_dir,
        blobs_dir=blobs_dir,
        redis_url=redis_url,
        interactive_timeout_s=120,
        training_timeout_s=training_timeout_s,
    )
    task = asyncio.create_task(run_worker(settings))
    redis = Redis.from_url(redis_url)
    try:
        while not await redis.keys(f"{WORKER_KEY_PREFIX}*"):
            if task.done():
                task.result()  # raises what stopped the worker
                raise RuntimeError("the worker stopped before it was ready")
            await asyncio.sleep(0.05)
        yield
    finally:
        await redis.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def face_photo(variant: int = 0) -> bytes:
    """A real photo of one face (scikit-image's astronaut), as a distinct JPEG per ``variant``.

    Variants differ in mirroring, brightness and framing, so each has its own sha256, while the
    face stays big, sharp and the same person's.
    """
    from skimage import data

    image = Image.fromarray(data.astronaut())  # type: ignore[no-untyped-call]
    if variant % 2:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(1.0 + 0.04 * variant)
    margin = 4 * (variant % 5)
    image = image.crop((margin, 0, 512 - margin, 512 - margin))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def group_photo() -> bytes:
    """insightface's own group photo: several prominent faces."""
    import insightface

    return (Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()


def faceless_photo(size: int = 400) -> bytes:
    """A valid photo with no face in it: a blue-to-green gradient."""
    image = Image.linear_gradient("L").resize((size, size))
    rgb = Image.merge("RGB", (Image.new("L", (size, size), 20), image, ImageOps.invert(image)))
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def noise_crops(n: int = 3, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """``n`` seeded random RGB squares: training inputs for the tiny models, whose losses are noise."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def png(image: Image.Image) -> bytes:
    """``image`` as PNG bytes (what the worker stores for crops and drawings)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def gps_jpeg(variant: int) -> bytes:
    """A face photo as a JPEG carrying a camera make and GPS coordinates in its EXIF."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 36.0)
    out = io.BytesIO()
    with Image.open(io.BytesIO(face_photo(variant))) as image:
        image.save(out, format="JPEG", quality=92, exif=exif)
    data = out.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the test photo really has GPS
    return data


def pixels(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()
