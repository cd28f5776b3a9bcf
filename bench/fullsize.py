"""Full-size proof: every stage of the journey on the real SDXL / SD1.5 architectures, through the real loaders.

1. Writes random-weight models (the published configs of bench/gpu.py, realistic initialisation: non-zero
   biases, norms near 1) into a models folder in the layout ``avatarbooth models pull`` produces: the same
   folders, file names, formats (fp16 safetensors where pull fetches the fp16 variant, ``ip-adapter.bin``
   as a float32 torch pickle, the float32 safety checker), tokenizers with CLIP's 49408 ids. The antelopev2
   files are engine.tiny.faces' stand-ins: the published input/output signatures, not the real networks.
2. Loads them the way the worker does, ``engine.worker.WorkerContext.load`` on ``EngineSettings`` (which
   calls ``engine.presets.load_preset``, ``ResidentBase.load``, ...): no side door.
3. Runs each stage as a job would (``do_check_photo``, ``do_preview``, ``do_train``, ``do_draw``) on
   scikit-image's astronaut photo, at a low resolution on the CPU (``EngineSettings.resolution``).

Stages: sdxl check_photo, preview, lora_step, lora_draw, ti_step, ti_draw, dreambooth_plan (an SDXL full
fine-tune does not fit a 24 GB host: its memory plan on the meta device instead); sd15 check_photo,
dreambooth_step, dreambooth_draw. A stage that fails prints its traceback to stderr and the others still
run. The last line printed is one JSON object: {"stages": {name: {"ok", "s", "error"}}, "peak_rss_gib",
"layout": {path: {...}}, ...}. The exit status is 1 when a stage failed.

    python bench/fullsize.py                         # CPU, 256², bfloat16 (about 20 minutes on 2 cores)
    python bench/fullsize.py --device cuda --resolution 1024 --steps 30 --train-steps 20
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.gpu import (  # noqa: E402
    CLIP_G_TEXT,
    CLIP_L_TEXT,
    INSTANTID_RESAMPLER_WIDTH,
    SD15_SCHEDULER,
    SD15_UNET,
    SD15_VAE,
    SDXL_SCHEDULER,
    SDXL_UNET,
    SDXL_VAE,
)
from bench.memory_plan import SAFETY_VISION  # noqa: E402

CLIP_VOCAB = 49408
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}

# The published text encoder configs' token ids (bos 0 and the legacy eos 2 of the SD releases; pad 1).
_TEXT_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16"}

# model_index.json as the published repositories have it: SD1.5's names a safety checker and feature
# extractor (pull fetches the extractor's config only; the engine loads with safety_checker=None).
_SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.18.0.dev0",
    "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_CLIP_PREPROCESSOR = {  # SD1.5's feature_extractor and the safety checker's preprocessor_config.json
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


# --- random weights, streamed -------------------------------------------------------------------------


def _random_tensor(module: torch.nn.Module, attr: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Values for ``module.<attr>`` like a trained model's in kind: PyTorch's default bounds for linear and
    convolution weights *and* biases (never zero), norms near 1 with small biases, small embeddings."""
    if attr == "position_ids":
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
    if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
        base = 1.0 if attr == "weight" else 0.0
        scale = 0.1 if attr == "weight" else 0.02
        return base + scale * torch.randn(shape, generator=generator)
    if isinstance(module, torch.nn.Embedding):
        return 0.02 * torch.randn(shape, generator=generator)
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and weight is not None:
        fan_in = int(np.prod(weight.shape[1:]))
        bound = fan_in**-0.5
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    if attr.endswith("_weights"):  # the safety checker's per-concept thresholds (published: about 0.2)
        return 0.19 + 0.02 * torch.rand(shape, generator=generator)
    # Raw parameters: class embeddings, the safety checker's concept vectors, ...
    return torch.randn(shape, generator=generator) / max(1, shape[-1]) ** 0.5


def _state_entries(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, torch.Size]]:
    """(key, owning module, attribute, shape) of every entry of ``model.state_dict()``, in its order."""
    entries = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        prefix, _, attr = key.rpartition(".")
        entries.append((key, model.get_submodule(prefix) if prefix else model, attr, tensor.shape))
    return entries


def write_random_safetensors(
    path: Path, model: torch.nn.Module, dtype: torch.dtype, seed: int, *, weights: bool = True
) -> dict[str, Any]:
    """Write ``model``'s state dict (a meta-device model: keys and shapes only) as a safetensors file of
    random values in ``dtype``, one tensor in memory at a time. Returns what was written.

    ``weights=False`` writes the header only and extends the file to its full size without data (a
    sparse file of zeros): the layout without the minutes and gigabytes, for tests."""
    generator = torch.Generator().manual_seed(seed)
    entries = _state_entries(model)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, _module, attr, shape in entries:
        kind = torch.int64 if attr == "position_ids" else dtype
        size = int(np.prod(shape)) * torch.empty((), dtype=kind).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        if not weights:
            out.truncate(8 + len(encoded) + offset)
            entries = []
        for _key, module, attr, shape in entries:
            values = _random_tensor(module, attr, shape, generator)
            if values.dtype != torch.int64:
                values = values.to(dtype)
            out.write(values.contiguous().view(torch.uint8).numpy().tobytes())
    return describe_safetensors(path)


def describe_safetensors(path: Path) -> dict[str, Any]:
    """Name → {dtype, shape} of every tensor of a safetensors file, from its header; plus totals."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    params = {name: int(np.prod(entry["shape"])) for name, entry in header.items()}
    return {
        "format": "safetensors",
        "dtypes": sorted({entry["dtype"] for entry in header.values()}),
        "tensors": len(header),
        "params": sum(params.values()),
        "bytes": path.stat().st_size,
        "shapes": {name: entry["shape"] for name, entry in sorted(header.items())},
    }


# --- the models folder --------------------------------------------------------------------------------


def _meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


def _text_config(published: dict[str, Any], architecture: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**published, **_TEXT_IDS, architectures=[architecture])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tokenizer(folder: Path, *, pad_token: str) -> None:
    """CLIP's tokenizer folder as published: vocab.json (49408 ids), merges.txt, and the two configs."""
    from engine.tiny.models import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges(CLIP_VOCAB)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        **special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    })


def _write_text_encoder(
    folder: Path, published: dict[str, Any], with_projection: bool, seed: int, weights: bool
) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = _text_config(published, kind.__name__)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    write_random_safetensors(folder / "model.safetensors", _meta(lambda: kind(config)), torch.float16, seed,
                             weights=weights)


def _write_scheduler(pipe: Path, class_name: str, published: dict[str, Any]) -> None:
    """The published scheduler_config.json: its class, and keys its class ignores (SD1.5's PNDM file
    carries DDIM's ``clip_sample``), as diffusers' ``from_config`` meets them."""
    _write_json(pipe / "scheduler" / "scheduler_config.json", {"_class_name": class_name, **published})


def _write_diffusers_model(folder: Path, model: Any, dtype: torch.dtype, seed: int, weights: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    write_random_safetensors(folder / "diffusion_pytorch_model.safetensors", model, dtype, seed, weights=weights)


def write_sdxl_preset(root: Path, seed: int = 0, *, weights: bool = True) -> Path:
    """The ``sdxl`` preset's folder as ``models pull --preset sdxl`` lays it out, with random weights."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from engine.tiny.models import _ip_attn_state, _resampler_state

    pipe = root / "sdxl"
    _write_json(pipe / "model_index.json", _SDXL_INDEX)
    _write_scheduler(pipe, "EulerDiscreteScheduler", SDXL_SCHEDULER)
    _write_tokenizer(pipe / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(pipe / "tokenizer_2", pad_token="!")  # OpenCLIP's tokenizer pads with "!"
    _write_text_encoder(pipe / "text_encoder", CLIP_L_TEXT, False, seed + 1, weights)
    _write_text_encoder(pipe / "text_encoder_2", CLIP_G_TEXT, True, seed + 2, weights)
    unet = _meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    _write_diffusers_model(pipe / "unet", unet, torch.float16, seed + 3, weights)
    _write_diffusers_model(pipe / "vae", _meta(lambda: AutoencoderKL(**SDXL_VAE)), torch.float16, seed + 4, weights)
    # InstantID: IdentityNet is a ControlNet of the SDXL UNet's shape (fp16 safetensors); the adapter a
    # float32 torch pickle of the Resampler and every cross-attention's to_k_ip / to_v_ip.
    identitynet = _meta(lambda: ControlNetModel.from_unet(unet))
    _write_diffusers_model(root / "identitynet", identitynet, torch.float16, seed + 5, weights)
    torch.manual_seed(seed + 6)
    with torch.device("cpu" if weights else "meta"):
        adapter = {
            "image_proj": _resampler_state(SDXL_UNET["cross_attention_dim"], INSTANTID_RESAMPLER_WIDTH),
            "ip_adapter": _ip_attn_state(unet),
        }
    if not weights:  # one shared zero per tensor: the shapes and dtypes without the 1.7 GB
        adapter = {group: {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in part.items()}
                   for group, part in adapter.items()}
    torch.save(adapter, root / "ip-adapter.bin")
    del adapter
    _write_common(root, seed + 7, weights)
    return root


def write_sd15_preset(root: Path, seed: int = 0, *, weights: bool = True) -> Path:
    """The ``sd15`` preset's folder as ``models pull --preset sd15`` lays it out, with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe = root / "sd15"
    _write_json(pipe / "model_index.json", _SD15_INDEX)
    _write_json(pipe / "feature_extractor" / "preprocessor_config.json", _CLIP_PREPROCESSOR)
    _write_scheduler(pipe, "PNDMScheduler", SD15_SCHEDULER)
    _write_tokenizer(pipe / "tokenizer", pad_token="<|endoftext|>")
    _write_text_encoder(pipe / "text_encoder", CLIP_L_TEXT, False, seed + 1, weights)
    unet = _meta(lambda: UNet2DConditionModel(**SD15_UNET))
    _write_diffusers_model(pipe / "unet", unet, torch.float16, seed + 3, weights)
    _write_diffusers_model(pipe / "vae", _meta(lambda: AutoencoderKL(**SD15_VAE)), torch.float16, seed + 4, weights)
    _write_common(root, seed + 7, weights)
    return root


def _write_common(root: Path, seed: int, weights: bool) -> None:
    """antelopev2 (engine.tiny.faces' stand-ins with its signatures) and the float32 safety checker."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from engine.tiny.faces import build_tiny_face_models

    build_tiny_face_models(root / "antelopev2", seed=seed)
    vision = {k: v for k, v in SAFETY_VISION.items() if k != "projection_dim"}
    config = CLIPConfig(text_config=dict(CLIP_L_TEXT), vision_config=vision, projection_dim=768)
    folder = root / "safety_checker"
    folder.mkdir(parents=True, exist_ok=True)
    config.architectures = ["StableDiffusionSafetyChecker"]
    config.save_pretrained(folder)
    _write_json(folder / "preprocessor_config.json", _CLIP_PREPROCESSOR)
    write_random_safetensors(folder / "model.safetensors", _meta(lambda: StableDiffusionSafetyChecker(config)),
                             torch.float32, seed, weights=weights)


def describe_layout(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` (relative path → format, dtypes, tensor and parameter counts, bytes)."""
    layout: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".safetensors":
            entry = describe_safetensors(path)
            entry.pop("shapes")
        elif path.suffix == ".bin":
            state = torch.load(path, map_location="meta", weights_only=True)
            tensors = [t for group in state.values() for t in group.values()]
            entry = {
                "format": "torch", "groups": sorted(state), "tensors": len(tensors),
                "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
                "params": sum(t.numel() for t in tensors), "bytes": path.stat().st_size,
            }
        else:
            entry = {"format": path.suffix.lstrip(".") or "text", "bytes": path.stat().st_size}
        layout[rel] = entry
    return layout


# --- the stages ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One bench run: where things go, how big, and the stages' results."""

    models_dir: Path
    blobs_dir: Path
    device: str
    dtype: str
    resolution: int
    steps: int
    train_steps: int
    class_images: int
    stages: dict[str, dict[str, Any]]

    def stage(self, name: str, work: Callable[[], Any]) -> Any:
        """Run one stage; record ok/seconds/error. A failure is printed and the run goes on."""
        print(f"[fullsize] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = work()
            error = None
        except Exception as e:  # a bench reports every failure and carries on
            traceback.print_exc()
            result, error = None, f"{type(e).__name__}: {e}"
        seconds = round(time.perf_counter() - start, 2)
        self.stages[name] = {"ok": error is None, "s": seconds, "error": error, "rss_gib": _peak_rss_gib()}
        print(f"[fullsize] {name}: {'ok' if error is None else 'FAILED'} in {seconds} s", file=sys.stderr, flush=True)
        return result

    def settings(self, preset: str) -> Any:
        from engine.settings import EngineSettings

        return EngineSettings(
            preset=preset, models_dir=self.models_dir, blobs_dir=self.blobs_dir, redis_url="",
            device=self.device, dtype=self.dtype, resolution=self.resolution, train_steps=self.train_steps,
            preview_steps=self.steps, draw_steps=self.steps, class_images=self.class_images,
            dreambooth_cache_bytes=0,
        )


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB


def astronaut_png() -> bytes:
    """A real photo that ships offline: scikit-image's astronaut, enlarged from 512 to 1024 px so that
    her face (about 72 px in the photo) passes the full-size presets' 112-px minimum. As PNG bytes.
    (A tighter crop does not do: engine.tiny.faces' skin-blob detector then also fires on her neck.)"""
    from PIL import Image
    from skimage import data

    head = Image.fromarray(data.astronaut()).resize((1024, 1024), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    head.save(buffer, format="PNG")
    return buffer.getvalue()


def check_photo(app: Any, owner: str) -> Any:
    from engine.api import CheckPhotoRequest
    from engine.worker import do_check_photo

    photo_key = app.blobs.put(owner, "photos", astronaut_png(), ".png")
    result = do_check_photo(app, CheckPhotoRequest(job_id=f"{owner}-check", owner=owner, photo_key=photo_key))
    if not result.accepted:
        raise RuntimeError(f"the photo was refused: {result.refusal} (face {result.face_px} px of {result.needed_face_px})")
    return result


def require_images(app: Any, result: Any, resolution: int) -> Any:
    """The draw stored images of the run's size that are not flat (NaNs decode to black)."""
    from PIL import Image

    for key in result.image_keys:
        image = np.asarray(Image.open(io.BytesIO(app.blobs.get(key))).convert("RGB"), dtype=np.float32)
        if image.shape[:2] != (resolution, resolution):
            raise RuntimeError(f"image is {image.shape[1]}x{image.shape[0]}, not {resolution}²")
        if float(image.std()) < 1.0:
            raise RuntimeError(f"image is flat (std {image.std():.3f}): the denoising produced no signal or NaN")
    if not result.image_keys:
        raise RuntimeError("no image was stored")
    return result


def train(app: Any, owner: str, method: str, crop_key: str) -> Any:
    from engine.api import TrainRequest
    from engine.worker import do_train

    request = TrainRequest(job_id=f"{owner}-{method}", owner=owner, method=method, crop_keys=[crop_key],
                           token="sks", class_word="person")
    result = do_train(app, request)
    if app.blobs.path(result.adapter_key).stat().st_size == 0:
        raise RuntimeError("the trained model's file is empty")
    return result


def draw(app: Any, owner: str, trained: Any, embedding_key: str, resolution: int) -> Any:
    from engine.api import DrawRequest
    from engine.worker import do_draw

    request = DrawRequest(
        job_id=f"{owner}-draw-{trained.method}", owner=owner, prompt="me as an astronaut",
        embedding_keys=[embedding_key], adapter_key=trained.adapter_key, method=trained.method,
        token=trained.token, class_word=trained.class_word,
    )
    return require_images(app, do_draw(app, request), resolution)


def run_family(run: Run, preset: str, owner: str, methods: tuple[str, ...], *, check_stage: str,
               preview: bool = False) -> None:
    """Load ``preset`` as the worker does, check the photo, (SDXL) preview, then train and draw with each method."""
    from engine.api import PreviewRequest
    from engine.worker import WorkerContext, do_preview

    app = run.stage(f"{preset}_load", lambda: WorkerContext.load(run.settings(preset)))
    if app is None:
        return
    checked = run.stage(check_stage, lambda: check_photo(app, owner))
    if checked is None:
        return
    embedding, crop = checked.embedding_key, checked.crop_key
    if preview:
        run.stage("preview", lambda: require_images(app, do_preview(app, PreviewRequest(
            job_id=f"{owner}-preview", owner=owner, embedding_keys=[embedding], prompt="me as an astronaut",
        )), run.resolution))
    for method in methods:
        trained = run.stage(f"{method}_step", lambda m=method: train(app, owner, m, crop))
        if trained is not None:
            run.stage(f"{method}_draw", lambda t=trained: draw(app, owner, t, embedding, run.resolution))
    del app
    gc.collect()


def sdxl_dreambooth_plan() -> dict[str, Any]:
    """SDXL DreamBooth's estimated peak GPU memory at 1024² (engine.train.memory on the meta device)."""
    from bench.memory_plan import plans

    return plans()["sdxl"]


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, help="resident dtype (default: bfloat16 on the CPU, auto on CUDA)")
    parser.add_argument("--resolution", type=int, default=256, help="square size of crops, training and images")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of previews and draws")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps of each method")
    parser.add_argument("--class-images", type=int, default=1, help="prior-preservation images (0: no prior)")
    parser.add_argument("--only", choices=("sdxl", "sd15"), default=None, help="one family only")
    parser.add_argument("--work-dir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="avatarbooth-fullsize-"))
    run = Run(
        models_dir=work / "models", blobs_dir=work / "blobs", device=args.device,
        dtype=args.dtype or ("bfloat16" if args.device == "cpu" else "auto"), resolution=args.resolution,
        steps=args.steps, train_steps=args.train_steps, class_images=args.class_images, stages={},
    )
    started = time.perf_counter()
    report: dict[str, Any] = {"device": args.device, "dtype": run.dtype, "resolution": args.resolution}
    layout: dict[str, Any] = {}
    families = [args.only] if args.only else ["sdxl", "sd15"]
    try:
        for family in families:
            root = run.models_dir / family
            writer = write_sdxl_preset if family == "sdxl" else write_sd15_preset
            if not (root / ".written").is_file():
                shutil.rmtree(root, ignore_errors=True)
                if run.stage(f"{family}_write", lambda w=writer, r=root: w(r)) is None:
                    continue
                (root / ".written").write_text("bench/fullsize.py\n")
            layout[family] = {k: v for k, v in describe_layout(root).items() if k != ".written"}
            if family == "sdxl":
                run_family(run, "sdxl", "u1", ("lora", "ti"), check_stage="check_photo", preview=True)
                report["sdxl_dreambooth_plan_gib"] = run.stage("dreambooth_plan", sdxl_dreambooth_plan)
            else:
                run_family(run, "sd15", "u2", ("dreambooth",), check_stage="sd15_check_photo")
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report.update(stages=run.stages, peak_rss_gib=_peak_rss_gib(), wall_s=round(time.perf_counter() - started, 1),
                  layout=layout)
    line = json.dumps(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)
    return 0 if all(stage["ok"] for stage in run.stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
