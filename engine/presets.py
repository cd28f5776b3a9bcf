"""Presets: which base weights the engine runs on, where they lie, and the defaults that go with them.

Two presets exist. ``sdxl`` is the real one (SDXL base, InstantID's IdentityNet and adapter,
insightface's antelopev2); its weights must already be on disk. ``tiny`` has the same architecture in
miniature with random weights (``engine.tiny``) and builds itself on first use: its images are noise.

Layout of a preset's folder (``models_dir/<name>/``)::

    sdxl/                   a StableDiffusionXLPipeline folder (model_index.json, unet/, vae/, ...)
    identitynet/            ControlNetModel folder (config.json + weights)
    ip-adapter.bin          InstantID's adapter checkpoint
    antelopev2/             scrfd_10g_bnkps.onnx, glintr100.onnx
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UnknownPreset, WeightsMissing
from engine.faces import FaceCheckSettings

FAMILY_SDXL = "sdxl"

_REQUIRED_FILES = (
    "sdxl/model_index.json",
    "identitynet/config.json",
    "ip-adapter.bin",
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
)


@dataclass(frozen=True)
class Preset:
    """A base model's files and the generation and training defaults tuned for it."""

    name: str
    family: str
    root: Path
    resolution: int  # square output and training size, in pixels
    inference_steps: int
    guidance_scale: float
    identity_strength: float  # IdentityNet's controlnet_conditioning_scale
    ip_adapter_scale: float  # weight of the identity tokens in the UNet's cross-attention
    train_steps: int
    train_rank: int  # LoRA rank
    train_lr: float
    face_checks: FaceCheckSettings = field(default_factory=FaceCheckSettings)
    note: str | None = None  # shown to users with every image, e.g. that the images are noise

    @property
    def sdxl_dir(self) -> Path:
        """The StableDiffusionXLPipeline folder."""
        return self.root / "sdxl"

    @property
    def identitynet_dir(self) -> Path:
        """InstantID's IdentityNet (a ControlNetModel folder)."""
        return self.root / "identitynet"

    @property
    def ip_adapter_path(self) -> Path:
        """InstantID's adapter checkpoint (Resampler + per-attention to_k_ip/to_v_ip)."""
        return self.root / "ip-adapter.bin"

    @property
    def face_models_dir(self) -> Path:
        """insightface's antelopev2 detector and recognizer ONNX files."""
        return self.root / "antelopev2"


def _tiny(root: Path) -> Preset:
    return Preset(
        name="tiny",
        family=FAMILY_SDXL,
        root=root,
        resolution=128,
        inference_steps=4,
        guidance_scale=5.0,
        identity_strength=0.8,
        ip_adapter_scale=0.8,
        train_steps=8,
        train_rank=4,
        train_lr=1e-3,
        face_checks=FaceCheckSettings(crop_size=128),
        note="tiny preset: random weights, images are noise",
    )


def _sdxl(root: Path) -> Preset:
    return Preset(
        name="sdxl",
        family=FAMILY_SDXL,
        root=root,
        resolution=1024,
        inference_steps=30,
        guidance_scale=5.0,
        identity_strength=0.8,
        ip_adapter_scale=0.8,
        train_steps=800,
        train_rank=16,
        train_lr=1e-4,
        # ArcFace (antelopev2's glintr100) cosines of one person's photos sit well above 0.4;
        # training crops at the model's native size; a face under 112 px carries too little detail.
        face_checks=FaceCheckSettings(crop_size=1024, min_face_px=112, same_person_threshold=0.4),
    )


PRESET_NAMES = ("sdxl", "tiny")


def load_preset(name: str, models_dir: Path) -> Preset:
    """The preset ``name`` with its files under ``models_dir/<name>``.

    ``tiny`` is built there on first use (a few seconds). Raises ``UnknownPreset`` for other names
    than ``PRESET_NAMES`` and ``WeightsMissing`` when the ``sdxl`` preset's files are not all there.
    """
    root = models_dir / name
    if name == "tiny":
        from engine.tiny import build_tiny_preset

        return _tiny(build_tiny_preset(root))
    if name == "sdxl":
        _require_files(name, root)
        return _sdxl(root)
    raise UnknownPreset(f"Unknown preset {name!r}; the presets are: {', '.join(PRESET_NAMES)}.")


def _require_files(name: str, root: Path) -> None:
    missing = [str(root / rel) for rel in _REQUIRED_FILES if not (root / rel).is_file()]
    if missing:
        raise WeightsMissing(
            f"The {name!r} preset's weights are missing: {', '.join(missing)}. "
            f"Run `avatarbooth models pull --preset {name}` to fetch them."
        )
