"""What a worker process needs to know; filled in from config.toml by the composition root.

Kept free of heavy imports so the chat side's process can build it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.blobs import BlobStoreSettings


@dataclass(frozen=True)
class EngineSettings:
    preset: str
    models_dir: Path
    blobs_dir: Path
    redis_url: str
    blob_store: BlobStoreSettings | None = None  # None: a local store at blobs_dir ([storage] blob_store)
    device: str = "auto"  # "auto" picks CUDA when present, else CPU
    dtype: str = "auto"  # the resident modules' dtype; "auto": float16 on CUDA, float32 on CPU (engine.pipelines.base)
    # Host memory for users' DreamBooth weights kept between draws (pinned on a GPU host); 0 keeps none.
    dreambooth_cache_bytes: int = 12 * 2**30  # two SDXL UNets in float16 (~5.1 GB each)
    max_jobs: int = 4  # concurrent jobs per queue; the GPU itself is shared through a lock
    resident_loras: int = 8  # users' LoRAs kept loaded at once (an SDXL rank-16 one is ~90 MB of float32)
    # How long a draw waits on the queue for a worker that holds the user's model (engine.residency); 0: off.
    residency_wait_s: float = 1.0
    interactive_timeout_s: int = 300
    training_timeout_s: int = 3600
    train_steps: int | None = None  # None: the preset's default
    preview_steps: int | None = None
    draw_steps: int | None = None
    # Users' UNet LoRAs copied into one slot in place (diffusers' LoRA hotswap) instead of one adapter each;
    # a LoRA with text-encoder weights, a rank above hotswap_rank or other target modules loads the old way.
    lora_hotswap: bool = False
    hotswap_rank: int = 16  # the slot's rank: at least every user's LoRA rank ([training] trains 16)
    compile_unet: bool = False  # torch.compile the resident UNet at start-up (warm-up draw); with lora_hotswap, switching users does not recompile
    few_step: bool = False  # previews and draws in few-step mode unless a request says (PreviewRequest.fast)
    face_detail: bool = True  # every draw's face redrawn at the model's resolution, kept when it looks more like the user
    # [training] switches, for every method that has them (engine.train.methods applies them):
    random_flip: bool = False  # mirrored crops as augmentation; off: they erase facial asymmetries
    train_text_encoder: bool = False  # LoRA/DreamBooth also train the text encoders (EasyPhoto does)
    gradient_checkpointing: bool | None = None  # None: on for full-size SDXL training, off otherwise
    keep_best_by_likeness: bool = False  # training keeps the checkpoint whose drawings look most like the user
    dreambooth_optimizer: str = "adamw"  # or "adafactor": factored second moments, no first (engine.train.dreambooth)
    # Prior-preservation class images per class word (LoRA, DreamBooth); None: the method's default, 0: no prior.
    class_images: int | None = None
    # Square size of crops, training and images; None: the preset's. Smaller is for smoke checks only
    # (bench/fullsize.py runs full-size SDXL at 256² on a CPU): the bases draw well only near their own size.
    resolution: int | None = None
