"""Presets: which base weights the engine runs on, where they lie, and the defaults that go with them.

A preset belongs to a model family, ``sdxl`` or ``sd15``:

* ``sdxl``: SDXL base, InstantID's IdentityNet and adapter, insightface's antelopev2; its weights must
  already be on disk. ``tiny`` has the same architecture in miniature with random weights
  (``engine.tiny.models``) and builds itself on first use: its images are noise.
* ``sd15``: Stable Diffusion 1.5 (a runwayml-style ``StableDiffusionPipeline`` folder) and antelopev2;
  its weights must already be on disk. ``tiny-sd15`` is its miniature, built on first use. InstantID
  exists for SDXL only, so SD1.5 presets have no zero-shot preview: users train a model first.

Layout of a preset's folder (``models_dir/<name>/``)::

    sdxl/                   SDXL family: a StableDiffusionXLPipeline folder (model_index.json, unet/, ...)
    identitynet/            SDXL family: ControlNetModel folder (config.json + weights)
    ip-adapter.bin          SDXL family: InstantID's adapter checkpoint
    sd15/                   SD1.5 family: a StableDiffusionPipeline folder (model_index.json, unet/, ...)
    antelopev2/             both: scrfd_10g_bnkps.onnx, glintr100.onnx (required), genderage.onnx (optional: the class word)
    few-step/               SDXL family, optional: sdxl_lightning_8step_lora.safetensors (few-step mode,
                            ByteDance/SDXL-Lightning, openrail++); without it, requests for it draw the full way
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.errors import UnknownPreset, WeightsMissing
from engine.faces.analyzer import FaceCheckSettings

FEW_STEP_LORA = "few-step/sdxl_lightning_8step_lora.safetensors"
"""The distilled LoRA under a SDXL preset's folder: SDXL-Lightning's 8-step LoRA, in its published
(kohya-style ``lora_unet_*``) key layout; the tiny preset builds one of the same layout."""
FEW_STEP_STEPS = 8
FEW_STEP_GUIDANCE = 0.0  # SDXL-Lightning is distilled without classifier-free guidance
# and sampled with Euler on "trailing" timesteps (the model card's scheduler settings).

FAMILY_SDXL = "sdxl"
FAMILY_SD15 = "sd15"

_COMMON_FILES = (
    "antelopev2/scrfd_10g_bnkps.onnx",
    "antelopev2/glintr100.onnx",
    "safety_checker/config.json",
)
_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    FAMILY_SDXL: ("sdxl/model_index.json", "identitynet/config.json", "ip-adapter.bin", *_COMMON_FILES),
    FAMILY_SD15: ("sd15/model_index.json", *_COMMON_FILES),
}


@dataclass(frozen=True)
class Preset:
    """A base model's files and the generation and training defaults tuned for it."""

    name: str
    family: str  # FAMILY_SDXL or FAMILY_SD15
    root: Path
    resolution: int  # square output and training size, in pixels
    inference_steps: int
    guidance_scale: float
    identity_strength: float  # IdentityNet's controlnet_conditioning_scale (SDXL family only)
    ip_adapter_scale: float  # weight of the identity tokens in the UNet's cross-attention (SDXL only)
    train_steps: int
    train_rank: int  # LoRA rank
    train_lr: float
    face_checks: FaceCheckSettings = field(default_factory=FaceCheckSettings)
    note: str | None = None  # shown to users with every image, e.g. that the images are noise

    def at_resolution(self, resolution: int) -> Preset:
        """This preset drawing, training and cropping at ``resolution``² (``EngineSettings.resolution``)."""
        if resolution < 64 or resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 and at least 64, got {resolution}")
        return replace(self, resolution=resolution, face_checks=replace(self.face_checks, crop_size=resolution))

    @property
    def is_tiny(self) -> bool:
        """Random-weight miniatures: training defaults shrink to a few steps."""
        return self.name.startswith("tiny")

    @property
    def supports_preview(self) -> bool:
        """Whether zero-shot (InstantID) previews exist for this preset: SDXL family only."""
        return self.family == FAMILY_SDXL

    @property
    def pipeline_dir(self) -> Path:
        """The base pipeline's folder: ``sdxl_dir`` or ``sd15_dir`` by family."""
        return self.sdxl_dir if self.family == FAMILY_SDXL else self.sd15_dir

    @property
    def sdxl_dir(self) -> Path:
        """The StableDiffusionXLPipeline folder (SDXL family)."""
        return self.root / "sdxl"

    @property
    def sd15_dir(self) -> Path:
        """The StableDiffusionPipeline folder (SD1.5 family)."""
        return self.root / "sd15"

    @property
    def identitynet_dir(self) -> Path:
        """InstantID's IdentityNet (a ControlNetModel folder)."""
        return self.root / "identitynet"

    @property
    def ip_adapter_path(self) -> Path:
        """InstantID's adapter checkpoint (Resampler + per-attention to_k_ip/to_v_ip)."""
        return self.root / "ip-adapter.bin"

    @property
    def safety_checker_dir(self) -> Path:
        """The NSFW image checker (diffusers' StableDiffusionSafetyChecker folder)."""
        return self.root / "safety_checker"

    @property
    def few_step_lora_path(self) -> Path | None:
        """The distilled few-step LoRA (SDXL family; None for SD1.5, which has none)."""
        return self.root / FEW_STEP_LORA if self.family == FAMILY_SDXL else None

    @property
    def face_models_dir(self) -> Path:
        """insightface's antelopev2 detector and recognizer ONNX files."""
        return self.root / "antelopev2"


_DUPLICATE_CHECK_OFF = 1.01  # above any cosine


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
        # The tiny recognizer's random weights are mirror-symmetric and coarse: a mirrored selfie scores
        # as high as a re-encoded one (~0.999), so it cannot tell a duplicate photo: check off.
        face_checks=FaceCheckSettings(crop_size=128, duplicate_threshold=_DUPLICATE_CHECK_OFF),
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
        # training crops at the model's native size; a face under 112 px carries too little detail for
        # the recognizer, and a 1024 crop needs 205 (crop upscaled at most 2×: FaceCheckSettings.min_face_side).
        face_checks=FaceCheckSettings(crop_size=1024, min_face_px=112, same_person_threshold=0.4),
    )


def _sd15(root: Path) -> Preset:
    return Preset(
        name="sd15",
        family=FAMILY_SD15,
        root=root,
        resolution=512,  # SD1.5's native size
        inference_steps=30,
        guidance_scale=7.5,  # diffusers' StableDiffusionPipeline default
        identity_strength=0.0,  # no InstantID for SD1.5
        ip_adapter_scale=0.0,
        train_steps=800,
        train_rank=16,
        train_lr=1e-4,
        face_checks=FaceCheckSettings(crop_size=512, min_face_px=112, same_person_threshold=0.4),
    )


def _tiny_sd15(root: Path) -> Preset:
    return Preset(
        name="tiny-sd15",
        family=FAMILY_SD15,
        root=root,
        resolution=128,
        inference_steps=4,
        guidance_scale=7.5,
        identity_strength=0.0,
        ip_adapter_scale=0.0,
        train_steps=8,
        train_rank=4,
        train_lr=1e-3,
        face_checks=FaceCheckSettings(crop_size=128, duplicate_threshold=_DUPLICATE_CHECK_OFF),
        note="tiny SD1.5 preset: random weights, images are noise",
    )


_PRESETS: dict[str, Callable[[Path], Preset]] = {
    "sdxl": _sdxl,
    "sd15": _sd15,
    "tiny": _tiny,
    "tiny-sd15": _tiny_sd15,
}
PRESET_NAMES = tuple(_PRESETS)
_BUILT_ON_FIRST_USE = ("tiny", "tiny-sd15")


def load_preset(name: str, models_dir: Path) -> Preset:
    """The preset ``name`` with its files under ``models_dir/<name>``.

    ``tiny`` and ``tiny-sd15`` are built there on first use (a few seconds). Raises ``UnknownPreset``
    for other names than ``PRESET_NAMES`` and ``WeightsMissing`` when a real preset's files (those its
    family needs) are not all there.
    """
    make = _PRESETS.get(name)
    if make is None:
        raise UnknownPreset(f"Unknown preset {name!r}; the presets are: {', '.join(PRESET_NAMES)}.")
    preset = make(models_dir / name)
    if name in _BUILT_ON_FIRST_USE:
        _build_tiny(preset)
    else:
        _require_files(preset)
    return preset


def _build_tiny(preset: Preset) -> None:
    from engine.tiny.models import build_tiny_preset, build_tiny_sd15_preset

    from engine.pipelines.nsfw import build_tiny_safety_checker

    build = build_tiny_preset if preset.family == FAMILY_SDXL else build_tiny_sd15_preset
    build(preset.root)
    build_tiny_safety_checker(preset.safety_checker_dir)  # idempotent; also fills older tiny builds


def _require_files(preset: Preset) -> None:
    root = preset.root
    missing = [str(root / rel) for rel in _REQUIRED_FILES[preset.family] if not (root / rel).is_file()]
    if missing:
        raise WeightsMissing(
            f"The {preset.name!r} preset's weights are missing: {', '.join(missing)}. "
            f"Run `avatarbooth models pull --preset {preset.name}` to fetch them."
        )
