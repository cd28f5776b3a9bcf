"""``avatarbooth eval DIR``: how much a personal model's drawings look like its person, on a photo it never saw.

Each sub-folder of DIR is one person with at least ``MIN_PHOTOS`` photos. The last photo by sorted name is
held out; the others are enrolled through the engine's own photo checks. For every method asked for (the
InstantID preview, LoRA, Textual Inversion, DreamBooth) the engine trains on the enrolled crops and draws
``PROMPTS`` with fixed seeds; each drawing's largest face is embedded with the preset's recognizer (ArcFace
on real presets) and compared with the held-out photo, the enrolled set's mean and the nearest enrolled
photo. A model that draws the person scores high against the held-out photo; one that pastes its training
photos scores higher against the nearest of those than against the held-out one (the copy-paste ratio).
Prompt adherence is the CLIP score of each drawing against its prompt, where a CLIP model is present.

Everything runs in this process on a temporary blob folder that is removed at the end, whatever happens:
nothing of the photos, embeddings or drawings stays, and none of it is logged. ``docs/eval.md`` defines the
numbers and gives other papers' figures for orientation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from avatarbooth.config import AppConfig
from avatarbooth.models import CLIP_DIR, EVAL_DIR

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from engine.api import CheckPhotoResult, ImagesResult
    from engine.faces.analyzer import FaceAnalyzer, FaceRecord
    from engine.worker import WorkerContext

PROMPTS: tuple[str, ...] = (
    "a close-up portrait photo of me, looking at the camera, soft window light",
    "me as an astronaut in a white space suit, standing on the moon",
    "a watercolour painting of me in a summer garden",
    "a photo of me laughing in a busy coffee shop",
)
"""The fixed prompt set: a portrait, a costume, a painted style and a candid scene. "me" becomes the
person's token and class word (the preview, which has no token, draws "a <class word>")."""
SEEDS: tuple[int, ...] = (1001, 1002, 1003, 1004)
"""One fixed seed per prompt, so runs of one preset compare like with like."""
IMAGES_PER_PROMPT = 2
METHODS = ("preview", "lora", "ti", "dreambooth")
DEFAULT_METHODS = "preview,lora,ti"
MIN_PHOTOS = 4  # 3 to enrol (the chat's own minimum) + 1 held out
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
NO_CLIP_REASON = "no CLIP model: run avatarbooth models pull --eval"
TINY_REASON = (
    "tiny preset: random-weight models draw noise, so these numbers measure nothing; they show the "
    "pipeline runs. Run eval on sdxl or sd15 with real weights for numbers that mean something."
)
_TRAIN_SEED = 0


class EvalInputError(Exception):
    """DIR, a photo or an option cannot be evaluated; the message says what to change."""


# --- the input folder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """One person's folder: the photos to enrol and the one held out (the last by sorted name)."""

    name: str
    enrolled: tuple[Path, ...]
    held_out: Path


def parse_methods(text: str) -> tuple[str, ...]:
    """``"preview,lora"`` → ``("preview", "lora")``, in the given order, each once."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise EvalInputError(
            f"unknown method(s) {', '.join(repr(n) for n in unknown) or '(none given)'}; "
            f"--methods takes a comma-separated list of {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(names))


def find_identities(folder: Path) -> list[Identity]:
    """The identities in ``folder`` (one per sub-folder, sorted by name), each checked for enough photos."""
    if not folder.is_dir():
        raise EvalInputError(
            f"{folder} is not a folder; give a folder with one sub-folder of photos per person"
        )
    people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise EvalInputError(
            f"{folder} has no sub-folders; put each person's photos (at least {MIN_PHOTOS}) in a folder of their own"
        )
    identities = []
    for person in people:
        photos = sorted(
            (p for p in person.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
             and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        if len(photos) < MIN_PHOTOS:
            raise EvalInputError(
                f"{person} has {len(photos)} photo(s); eval needs at least {MIN_PHOTOS} per person "
                f"({MIN_PHOTOS - 1} to enrol, 1 held out): add photos ({', '.join(PHOTO_SUFFIXES)}) "
                "or move the folder out of DIR"
            )
        identities.append(Identity(person.name, tuple(photos[:-1]), photos[-1]))
    return identities


# --- enrolment ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Enrolment:
    """An identity as the engine sees it: the enrolled faces and crops, and the held-out face."""

    identity: Identity
    owner: str
    embedding_keys: list[str]
    crop_keys: list[str]
    records: list[FaceRecord]
    held_out: FaceRecord
    class_word: str


_REFUSALS = {
    "no_face": "no face was found: use a photo where the person's face is clearly visible, or remove it",
    "several_faces": "it shows several faces: crop it to the one person, or remove it",
    "too_blurry": "the face is too blurry: use a sharper photo",
    "duplicate": "it is the same photo as another one in the folder: remove one of them",
    "different_person": "it does not look like the folder's other photos: every photo in a folder must show "
    "the same person",
}


def enrol(app: WorkerContext, identity: Identity, owner: str) -> Enrolment:
    """Check and embed every photo with the worker's own job (the chat's checks); raise ``EvalInputError``
    naming the first photo the checks refuse and what to do about it."""
    from engine.api import CheckPhotoRequest, CheckPhotoResult
    from engine.errors import UnreadableImage
    from engine.faces.analyzer import FaceRecord
    from engine.worker import do_check_photo

    def check(number: int, path: Path, references: list[str]) -> CheckPhotoResult:
        key = app.blobs.put(owner, "photos", path.read_bytes(), _blob_suffix(path))
        try:
            checked = do_check_photo(app, CheckPhotoRequest(f"eval-{owner}-check-{number}", owner, key, references))
        except UnreadableImage as e:
            raise EvalInputError(f"{path}: {e}") from e
        if not checked.accepted or checked.embedding_key is None or checked.crop_key is None:
            raise EvalInputError(f"{path}: {_refusal_text(checked.refusal, checked.face_px, checked.needed_face_px)}")
        return checked

    accepted: list[CheckPhotoResult] = []
    for number, path in enumerate(identity.enrolled):  # each checked against those before, as the chat does
        accepted.append(check(number, path, [a.embedding_key for a in accepted if a.embedding_key]))
    embeddings = [a.embedding_key for a in accepted if a.embedding_key]
    held_out = check(len(accepted), identity.held_out, embeddings)  # the same person as the enrolled set
    assert held_out.embedding_key is not None
    return Enrolment(
        identity, owner, embeddings,
        crop_keys=[a.crop_key for a in accepted if a.crop_key],
        records=[FaceRecord.from_bytes(app.blobs.get(k)) for k in embeddings],
        held_out=FaceRecord.from_bytes(app.blobs.get(held_out.embedding_key)),
        class_word=_class_word([a.apparent_gender for a in accepted]),
    )


def _refusal_text(refusal: str | None, face_px: int | None, needed_px: int | None) -> str:
    if refusal == "face_too_small":
        return (f"the face is too small ({face_px} px, the checks need {needed_px} px): use a closer or "
                "larger photo")
    return _REFUSALS.get(refusal or "", f"the photo checks refused it ({refusal}): replace it")


def _blob_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return ".jpg" if suffix == ".jpeg" else suffix


def _class_word(genders: Sequence[str | None]) -> str:
    """What "me" is drawn as: "woman" or "man" when most photos read so, else "person" (the chat's rule)."""
    for gender, word in (("female", "woman"), ("male", "man")):
        if sum(g == gender for g in genders) * 2 > len(genders):
            return word
    return "person"


# --- the numbers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceScores:
    """Mean cosines of the drawn faces, over the images where a face was found (None when none was)."""

    faces_found: int
    held_out: float | None
    enrolled_mean: float | None
    nearest_enrolled: float | None

    @property
    def copy_paste(self) -> float | None:
        """Nearest enrolled photo minus held-out photo: above 0, the drawings copy the training photos
        more than they draw the person."""
        if self.nearest_enrolled is None or self.held_out is None:
            return None
        return round(self.nearest_enrolled - self.held_out, 4)


def score_faces(
    faces: FaceAnalyzer, images: Sequence[Image.Image], held_out: FaceRecord, enrolled: Sequence[FaceRecord]
) -> FaceScores:
    """Embed the largest face of each image (as the worker ranks drawings) and average its cosines to the
    held-out face, to the enrolled mean and to the nearest enrolled face."""
    import numpy as np

    from engine.faces.analyzer import cosine, mean_embedding

    target = mean_embedding(enrolled)
    held, mean, nearest = [], [], []
    for image in images:
        found = faces.detect(np.asarray(image.convert("RGB")))
        if not found:
            continue
        face = max(found, key=lambda f: f.area).embedding
        held.append(cosine(face, held_out.embedding))
        mean.append(cosine(face, target))
        nearest.append(max(cosine(face, r.embedding) for r in enrolled))
    return FaceScores(len(held), _mean(held), _mean(mean), _mean(nearest))


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


class ClipScorer:
    """CLIP score of images against a prompt: 100 × max(cos(image, text), 0) per image."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any, device: torch.device, label: str) -> None:
        self.model = model  # transformers' CLIPModel
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = device
        self.label = label  # what the report names as the CLIP model

    @classmethod
    def load(cls, folder: Path, device: torch.device, label: str) -> ClipScorer:
        """A transformers ``CLIPModel`` folder (config, weights, preprocessor, tokenizer), in float32."""
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        model: Any = CLIPModel.from_pretrained(folder, local_files_only=True)
        model = model.to(device).eval()
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, tokenizer, device, label)

    def scores(self, images: Sequence[Image.Image], text: str) -> list[float]:
        """One score per image, in [0, 100]."""
        import torch

        if not images:
            return []
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        tokens = self.tokenizer(
            [text], padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
                pixel_values=pixels.pixel_values.to(self.device, torch.float32),
            )
            cosines = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return [100.0 * max(float(c), 0.0) for c in cosines.float().cpu()]


def load_clip(models_dir: Path, *, tiny: bool, work_dir: Path, device: torch.device) -> tuple[ClipScorer | None, str]:
    """The CLIP scorer and what it is, or None and why there is none.

    Real presets use ``models_dir/eval/clip`` (``models pull --eval``); tiny presets build a random-weight
    CLIP of the same architecture and file layout into ``work_dir``, so the scoring path runs for real.
    """
    if tiny:
        folder = build_tiny_clip(work_dir / "tiny-clip")
        return ClipScorer.load(folder, device, "tiny random-weight CLIP (built for this run)"), ""
    folder = models_dir / EVAL_DIR / CLIP_DIR
    has_weights = any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    if not (folder / "config.json").is_file() or not has_weights:
        return None, NO_CLIP_REASON
    return ClipScorer.load(folder, device, str(folder)), ""


_TINY_CLIP_SIZE = 32  # image side; the real ViT-L/14's is 224
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the published CLIP preprocessor's
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(dest: Path, *, seed: int = 0) -> Path:
    """Write a miniature random-weight ``CLIPModel`` folder in the published repository's layout
    (config.json, model.safetensors, preprocessor_config.json, vocab.json, merges.txt, tokenizer files).

    The tokenizer is the tiny presets' byte-level CLIP BPE; biases and layer norms get non-zero values,
    like trained weights; eos_token_id is the published configs' legacy 2. Returns ``dest``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    from engine.tiny.models import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    width = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        # The published CLIP configs' legacy special ids (bos 0, pad 1, eos 2): with eos 2 the text is
        # pooled at its highest id, the end-of-text token, as in the real model.
        text_config={**width, "vocab_size": len(vocab), "max_position_embeddings": 77, "bos_token_id": 0,
                     "pad_token_id": 1, "eos_token_id": 2},
        vision_config={**width, "image_size": _TINY_CLIP_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0.0, 0.02)
                elif "norm" in name and name.endswith("weight"):
                    parameter.normal_(1.0, 0.05)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    files = {
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps({**special, "model_max_length": 77, "do_lower_case": True,
                                             "tokenizer_class": "CLIPTokenizer"}),
        "preprocessor_config.json": json.dumps({
            "crop_size": _TINY_CLIP_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(_CLIP_MEAN),
            "image_std": list(_CLIP_STD), "resample": 3, "size": _TINY_CLIP_SIZE,
        }),
    }
    for name, text in files.items():
        (dest / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    return dest


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One identity × method: what was drawn and how it scores."""

    identity: str
    method: str
    available: bool = True
    reason: str | None = None  # why the method could not run (e.g. no preview on SD1.5)
    images: int = 0
    flagged: int = 0  # withheld by the NSFW check (stored black): not scored
    train_steps: int | None = None
    faces: FaceScores = field(default_factory=lambda: FaceScores(0, None, None, None))
    face_reason: str | None = None
    clip_score: float | None = None
    clip_reason: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity, "method": self.method, "available": self.available, "reason": self.reason,
            "images": self.images, "flagged": self.flagged, "faces_found": self.faces.faces_found,
            "train_steps": self.train_steps,
            "similarity_held_out": self.faces.held_out,
            "similarity_enrolled_mean": self.faces.enrolled_mean,
            "similarity_nearest_enrolled": self.faces.nearest_enrolled,
            "copy_paste": self.faces.copy_paste,
            "face_reason": self.face_reason,
            "clip_score": self.clip_score, "clip_reason": self.clip_reason,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Evaluation:
    """Everything one ``eval`` run measured, as the report prints it."""

    preset: str
    tiny: bool
    methods: tuple[str, ...]
    clip_label: str | None
    clip_reason: str | None
    identities: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "preset": self.preset,
            "meaningful": not self.tiny,
            "reason": TINY_REASON if self.tiny else None,
            "methods": list(self.methods),
            "prompts": list(PROMPTS),
            "seeds": list(SEEDS),
            "images_per_prompt": IMAGES_PER_PROMPT,
            "clip_model": self.clip_label,
            "clip_reason": self.clip_reason,
            "identities": self.identities,
            "rows": [row.to_dict() for row in self.rows],
            "summary": self.summary(),
            "wall_s": round(self.wall_s, 2),
        }

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per method, each number's mean over the identities that have it."""
        keys = ("similarity_held_out", "similarity_enrolled_mean", "similarity_nearest_enrolled", "copy_paste",
                "clip_score")
        out: dict[str, dict[str, float | None]] = {}
        for method in self.methods:
            rows = [row.to_dict() for row in self.rows if row.method == method]
            out[method] = {key: _mean([r[key] for r in rows if r[key] is not None]) for key in keys}
        return out


Progress = Callable[[str], None]


def evaluate(
    app: WorkerContext,
    identities: Sequence[Identity],
    methods: Sequence[str],
    *,
    token: str,
    clip: ClipScorer | None,
    clip_reason: str | None,
    progress: Progress,
) -> Evaluation:
    """Enrol every identity first (so a refused photo stops the run before any training), then train and
    draw each method per identity. Raises ``EvalInputError`` for a photo the checks refuse."""
    started = time.perf_counter()
    result = Evaluation(app.preset.name, app.preset.is_tiny, tuple(methods), clip.label if clip else None,
                        clip_reason)
    enrolments = []
    for number, identity in enumerate(identities, start=1):
        progress(f"checking the photos of identity {number} of {len(identities)}")
        enrolments.append(enrol(app, identity, owner=f"eval{number}"))
    for number, enrolment in enumerate(enrolments, start=1):
        result.identities.append(_identity_summary(enrolment, [e for e in enrolments if e is not enrolment]))
        for method in methods:
            progress(f"identity {number} of {len(enrolments)}: {method}")
            result.rows.append(_evaluate_method(app, enrolment, method, token=token, clip=clip,
                                                clip_reason=clip_reason))
        app.blobs.delete_owner(enrolment.owner)  # the next identity's models need the disk more
    result.wall_s = time.perf_counter() - started
    return result


def _identity_summary(enrolment: Enrolment, others: Sequence[Enrolment]) -> dict[str, Any]:
    """The identity's own references: how a real new photo of the person (the held-out one) scores
    against the enrolled set, and how it scores against the other identities' sets (someone else)."""
    from engine.faces.analyzer import cosine, mean_embedding

    held = enrolment.held_out.embedding
    other = max((cosine(held, mean_embedding(o.records)) for o in others), default=None)
    return {
        "identity": enrolment.identity.name,
        "photos": len(enrolment.identity.enrolled) + 1,
        "enrolled": len(enrolment.identity.enrolled),
        "held_out": enrolment.identity.held_out.name,
        "class_word": enrolment.class_word,
        "held_out_similarity_enrolled_mean": round(cosine(held, mean_embedding(enrolment.records)), 4),
        "held_out_similarity_nearest_enrolled": round(max(cosine(held, r.embedding) for r in enrolment.records), 4),
        "held_out_similarity_other_identities": None if other is None else round(other, 4),
    }


def _evaluate_method(
    app: WorkerContext, enrolment: Enrolment, method: str, *, token: str, clip: ClipScorer | None,
    clip_reason: str | None,
) -> Row:
    from engine.errors import EngineError

    row = Row(enrolment.identity.name, method)
    started = time.perf_counter()
    if method == "preview" and not app.preset.supports_preview:
        return _unavailable(row, f"the {app.preset.name} preset has no zero-shot preview: InstantID exists for "
                                 "SDXL only")
    try:
        return _draw_and_score(app, enrolment, row, token=token, clip=clip, clip_reason=clip_reason)
    except EngineError as e:  # explained by the engine, e.g. a method that does not fit this GPU
        return _unavailable(row, str(e))
    finally:
        row.seconds = time.perf_counter() - started


def _unavailable(row: Row, reason: str) -> Row:
    row.available, row.reason = False, reason
    return row


def _draw_and_score(
    app: WorkerContext, enrolment: Enrolment, row: Row, *, token: str, clip: ClipScorer | None,
    clip_reason: str | None,
) -> Row:
    """Train ``row.method`` (not the preview), draw the prompt set, score the drawings."""
    from engine.api import TrainRequest
    from engine.worker import do_train

    owner, method = enrolment.owner, row.method
    model_key = None
    if method == "preview":
        draw = _preview_drawer(app, enrolment)
    else:
        trained = do_train(app, TrainRequest(f"eval-{owner}-train-{method}", owner, method, enrolment.crop_keys,
                                             token=token, class_word=enrolment.class_word, seed=_TRAIN_SEED))
        row.train_steps, model_key = trained.steps, trained.adapter_key
        draw = _model_drawer(app, enrolment, method, trained.adapter_key, trained.token)
    images: list[Image.Image] = []
    clip_scores: list[float] = []
    for number, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
        drawn = draw(prompt, seed, f"eval-{owner}-{method}-{number}")
        kept = _read_images(app, drawn)
        row.images += len(drawn.image_keys)
        row.flagged += len(drawn.image_keys) - len(kept)
        images += kept
        if clip is not None:
            clip_scores += clip.scores(kept, _clip_text(prompt, enrolment.class_word))
    if model_key is not None:
        app.blobs.delete(model_key)
    row.faces = score_faces(app.faces, images, enrolment.held_out, enrolment.records)
    if row.faces.faces_found == 0:
        row.face_reason = f"no face was found in any of the {len(images)} scored drawings"
    row.clip_score = _mean(clip_scores)
    row.clip_reason = clip_reason if clip is None else (None if clip_scores else "no drawing to score")
    return row


Drawer = Callable[[str, int, str], "ImagesResult"]
"""Draws (prompt, seed, job id) for one identity and method."""


def _preview_drawer(app: WorkerContext, enrolment: Enrolment) -> Drawer:
    from engine.api import PreviewRequest
    from engine.worker import do_preview

    def draw(prompt: str, seed: int, job_id: str) -> ImagesResult:
        request = PreviewRequest(job_id, enrolment.owner, enrolment.embedding_keys, prompt, seed=seed,
                                 num_images=IMAGES_PER_PROMPT, class_word=enrolment.class_word)
        return do_preview(app, request)

    return draw


def _model_drawer(app: WorkerContext, enrolment: Enrolment, method: str, adapter_key: str, token: str) -> Drawer:
    from engine.api import DrawRequest
    from engine.worker import do_draw

    def draw(prompt: str, seed: int, job_id: str) -> ImagesResult:
        request = DrawRequest(
            job_id, enrolment.owner, prompt, enrolment.embedding_keys, adapter_key=adapter_key, method=method,
            token=token, class_word=enrolment.class_word, seed=seed, num_images=IMAGES_PER_PROMPT,
        )
        return do_draw(app, request)

    return draw


def _read_images(app: WorkerContext, drawn: ImagesResult) -> list[Image.Image]:
    """The drawn images the NSFW check let through (a flagged one is stored black: nothing to score)."""
    from PIL import Image

    flagged = drawn.flagged or [False] * len(drawn.image_keys)
    return [
        Image.open(io.BytesIO(app.blobs.get(key))).convert("RGB")
        for key, bad in zip(drawn.image_keys, flagged, strict=True)
        if not bad
    ]


def _clip_text(prompt: str, class_word: str) -> str:
    """The prompt as CLIP should read it: "me" as "a <class word>" (CLIP knows no personal token)."""
    from engine.render.renderer import expand_me

    return expand_me(prompt, "a", class_word)


# --- the command ----------------------------------------------------------------------------------


def run_eval(
    config: AppConfig,
    folder: Path,
    *,
    methods: str = DEFAULT_METHODS,
    as_json: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """``avatarbooth eval``: 0 when it ran, 2 for input to fix (nothing printed to ``out``), 1 when the
    preset's weights are missing. With ``as_json`` the last line of ``out`` is the whole result as JSON.
    ``out`` and ``err`` default to stdout and stderr."""
    from engine.errors import EngineError

    out = out or sys.stdout
    err = err or sys.stderr

    try:
        chosen = parse_methods(methods)
        identities = find_identities(folder)
    except EvalInputError as e:
        print(f"avatarbooth eval: {e}", file=err)
        return 2

    def progress(line: str) -> None:
        print(f"eval: {line}", file=err, flush=True)

    with tempfile.TemporaryDirectory(prefix="avatarbooth-eval-") as work:
        try:
            result = _run(config, Path(work), identities, chosen, progress)
        except EvalInputError as e:
            print(f"avatarbooth eval: {e}", file=err)
            return 2
        except EngineError as e:
            print(f"avatarbooth eval: {e}", file=err)
            return 1
    print(format_table(result), file=out)
    if as_json:
        print(json.dumps(result.to_dict()), file=out, flush=True)
    return 0


def _run(
    config: AppConfig, work: Path, identities: Sequence[Identity], methods: Sequence[str], progress: Progress
) -> Evaluation:
    from engine.worker import WorkerContext

    progress(f"loading the {config.engine.preset} preset")
    settings = dataclasses.replace(config.engine, blobs_dir=work / "blobs", blob_store=None)
    app = WorkerContext.load(settings)
    clip, reason = load_clip(settings.models_dir, tiny=app.preset.is_tiny, work_dir=work, device=app.base.device)
    return evaluate(app, identities, methods, token=config.bot.token, clip=clip, clip_reason=reason or None,
                    progress=progress)


def format_table(result: Evaluation) -> str:
    """The human report: one line per identity × method, the reasons for what is missing, and a warning
    when the numbers are meaningless."""
    lines = [
        f"AvatarBooth eval, preset {result.preset!r}: {len(result.identities)} identities, methods "
        f"{', '.join(result.methods)}; {len(PROMPTS)} prompts × {IMAGES_PER_PROMPT} images, fixed seeds",
    ]
    if result.tiny:
        lines.append(f"NOTE: {TINY_REASON}")
    lines += ["", "The held-out photo against its own set (mean / nearest photo) and against the others' sets:",
              f"{'identity':<20}  {'photos':>6}  {'mean':>6}  {'nearest':>7}  {'others':>6}"]
    for person in result.identities:
        lines.append(
            f"{person['identity'][:20]:<20}  {person['photos']:>6}  "
            f"{_number(person['held_out_similarity_enrolled_mean']):>6}  "
            f"{_number(person['held_out_similarity_nearest_enrolled']):>7}  "
            f"{_number(person['held_out_similarity_other_identities']):>6}"
        )
    header = (f"{'identity':<20}  {'method':<10}  {'images':>6}  {'faces':>5}  {'held-out':>8}  {'enrolled':>8}  "
              f"{'nearest':>7}  {'copy-paste':>10}  {'CLIP':>6}")
    lines += ["", header, "-" * len(header)]
    for row in result.rows:
        values = row.to_dict()
        lines.append(
            f"{row.identity[:20]:<20}  {row.method:<10}  {row.images:>6}  {row.faces.faces_found:>5}  "
            f"{_number(values['similarity_held_out']):>8}  {_number(values['similarity_enrolled_mean']):>8}  "
            f"{_number(values['similarity_nearest_enrolled']):>7}  {_number(values['copy_paste']):>10}  "
            f"{_number(values['clip_score'], 1):>6}"
        )
    for method, means in result.summary().items():
        lines.append(
            f"{'mean':<20}  {method:<10}  {'':>6}  {'':>5}  {_number(means['similarity_held_out']):>8}  "
            f"{_number(means['similarity_enrolled_mean']):>8}  {_number(means['similarity_nearest_enrolled']):>7}  "
            f"{_number(means['copy_paste']):>10}  {_number(means['clip_score'], 1):>6}"
        )
    notes = sorted({f"{row.method}: {text}" for row in result.rows
                    for text in (row.reason, row.face_reason) if text})
    if result.clip_reason:
        notes.append(f"CLIP: {result.clip_reason}")
    elif result.clip_label:
        notes.append(f"CLIP: {result.clip_label}")
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    lines.append("Numbers are cosines in [-1, 1] (CLIP: 0-100); docs/eval.md defines them and gives anchors.")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
