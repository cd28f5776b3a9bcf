"""``avatarbooth models pull``: fetch a preset's weights, verify them, and lay them out for ``engine.presets``.

The one place in the project that downloads. Each preset has a manifest of components (SDXL base,
InstantID, antelopev2, the safety checker, ...); each component names its files on the Hugging Face
Hub (or a release archive) and where they go inside ``models_dir/<preset>/``. An optional component
(SDXL-Lightning's LoRA, for few-step mode) that cannot be fetched is reported and fails no pull.
For every file:

* already there and verified (recorded in ``<preset>/.pulled.json`` with its size, mtime and hashes,
  and still matching what the hub says) → skipped, so running the command again is cheap;
* otherwise downloaded into ``models_dir/.pull-staging/<preset>/`` (the same file system), verified,
  and only then renamed into place: a half-downloaded or corrupt file never sits where the engine
  looks. An interrupted pull resumes from the staging folder.

Verification: the size and the hash the hub publishes (sha256 for LFS files, the git blob id for small
ones) or the manifest's own sha256; then the format: a safetensors header that parses and covers the
file, an ONNX model that loads, JSON that parses, a torch checkpoint that is a well-formed archive.

``tiny`` and ``tiny-sd15`` have nothing to pull: the project builds them offline (``engine.tiny.models``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from engine.presets import FEW_STEP_LORA

Report = Callable[[str], None]

STAGING_DIR = ".pull-staging"
"""Folder under ``models_dir`` where downloads wait until they are verified."""

RECORD_FILE = ".pulled.json"
"""Per-preset record of verified files: size, mtime and hashes, so a second pull need not re-hash."""

_CHUNK = 8 * 1024 * 1024


class PullError(Exception):
    """A component could not be fetched or verified; the message says which and what to do."""


# --- manifests ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """One file from a Hub repository. ``candidates`` are (path in the repo, path in the preset folder)
    in order of preference: the first one the repository has is fetched."""

    repo_id: str
    candidates: tuple[tuple[str, str], ...]
    revision: str | None = None  # None: the default branch
    sha256: str | None = None  # when known in advance; otherwise the hub's own hash is checked


@dataclass(frozen=True)
class ArchiveMember:
    """A file inside a zip archive, found by its base name wherever the archive keeps it."""

    name: str
    dest: str
    sha256: str | None = None


@dataclass(frozen=True)
class UrlArchive:
    """A zip archive from a plain URL (insightface's model packs live on GitHub releases)."""

    url: str
    members: tuple[ArchiveMember, ...]
    sha256: str | None = None


@dataclass(frozen=True)
class Component:
    """A named part of a preset, with the licence note printed before it is fetched."""

    name: str
    licence: str
    files: tuple[HubFile, ...] = ()
    archive: UrlArchive | None = None
    optional: bool = False  # the preset works without it: failing to fetch it fails no pull


def _hub(
    repo_id: str,
    *paths: str,
    into: str = "",
    rename: Callable[[str], str] = lambda p: p,
    revision: str | None = None,
) -> tuple[HubFile, ...]:
    """Files of ``repo_id`` at ``revision`` placed under ``into`` (``rename`` maps a repo path to its
    local path)."""
    prefix = f"{into}/" if into else ""
    return tuple(HubFile(repo_id, ((p, prefix + rename(p)),), revision=revision) for p in paths)


def _without_variant(path: str) -> str:
    """``unet/diffusion_pytorch_model.fp16.safetensors`` → ``unet/diffusion_pytorch_model.safetensors``.

    The fp16 files are stored under the plain names, so ``from_pretrained(folder)`` loads them with no
    ``variant`` argument (and casts them to the dtype it is asked for).
    """
    return path.replace(".fp16.", ".")


_CLIP_TOKENIZER = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the maintained mirror of runwayml's repo
INSTANTID_REPO = "InstantX/InstantID"
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"

# The commit of each repository that is pulled, so that what is verified is what was reviewed (a
# branch can move). Each SHA was seen as that repository's commit in public sources: download URLs
# huggingface.co/<repo>/resolve/<sha>/<file> or /tree/<sha>, and Hugging Face cache folders
# models--<org>--<name>/snapshots/<sha>/ holding the files pulled here.
SDXL_REVISION = "462165984030d82259a11f4367a4eed129e94a7b"  # resolve/<sha>/unet/config.json, blob/<sha>/LICENSE.md
SD15_REVISION = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"  # resolve/<sha>/scheduler/scheduler_config.json;
# a cache snapshot of this repository at it holds unet/diffusion_pytorch_model.fp16.safetensors
INSTANTID_REVISION = "57b32dfee076092ad2930c71fd6d439c2c3b1820"  # resolve/<sha>/ip-adapter.bin
SAFETY_CHECKER_REVISION = "cb41f3a270d63d454d385fc2e4f571c487c253c5"  # resolve/<sha>/pytorch_model.bin
LIGHTNING_REVISION = "c9a24f48e1c025556787b0c58dd67a091ece2e44"  # tree/<sha> (43 commits) lists the LoRA;
# it is unchanged since its upload ("Add safetensors", 1b39ebb): LFS sha256 and size as below, at any commit.
LIGHTNING_LORA_SHA256 = "5aa30d94cdf7950a8b53a693682650ee061eddb128c5435a8f88defea73b2ac6"  # 393,854,592 bytes

ANTELOPEV2_URL = "https://github.com/deepinsight/insightface/releases/download/model-zoo/antelopev2.zip"
"""Where insightface's own downloader (``FaceAnalysis(name="antelopev2")``, insightface 2.x) fetches the
pack; the older ``.../download/v0.7/antelopev2.zip`` is gone. Hashes as published for that archive."""

_SDXL = Component(
    "SDXL base 1.0 (fp16 weights)",
    "CreativeML Open RAIL++-M licence: use-based restrictions apply; read it at "
    f"https://huggingface.co/{SDXL_REPO}",
    files=_hub(
        SDXL_REPO,
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        *(f"tokenizer/{name}" for name in _CLIP_TOKENIZER),
        *(f"tokenizer_2/{name}" for name in _CLIP_TOKENIZER),
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        into="sdxl",
        rename=_without_variant,
        revision=SDXL_REVISION,
    ),
)

_SD15 = Component(
    "Stable Diffusion 1.5 (fp16 weights; the pipeline's own safety checker is left out, see below)",
    f"CreativeML Open RAIL-M licence: use-based restrictions apply; read it at https://huggingface.co/{SD15_REPO}",
    files=_hub(
        SD15_REPO,
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        *(f"tokenizer/{name}" for name in _CLIP_TOKENIZER),
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        into="sd15",
        rename=_without_variant,
        revision=SD15_REVISION,
    ),
)

_INSTANTID = Component(
    "InstantID (IdentityNet + adapter)",
    f"Apache-2.0 per the model card at https://huggingface.co/{INSTANTID_REPO}; it works on insightface "
    "face embeddings, whose models carry their own non-commercial licence (below).",
    files=(
        HubFile(
            INSTANTID_REPO, (("ControlNetModel/config.json", "identitynet/config.json"),), revision=INSTANTID_REVISION
        ),
        HubFile(
            INSTANTID_REPO,
            (
                (
                    "ControlNetModel/diffusion_pytorch_model.safetensors",
                    "identitynet/diffusion_pytorch_model.safetensors",
                ),
            ),
            revision=INSTANTID_REVISION,
        ),
        HubFile(INSTANTID_REPO, (("ip-adapter.bin", "ip-adapter.bin"),), revision=INSTANTID_REVISION),
    ),
)

_ANTELOPEV2 = Component(
    "insightface antelopev2 (face detector + recognizer + gender/age model)",
    "insightface's pretrained models are for NON-COMMERCIAL RESEARCH USE ONLY; commercial use needs a "
    "licence from insightface (https://github.com/deepinsight/insightface/tree/master/python-package).",
    archive=UrlArchive(
        ANTELOPEV2_URL,
        sha256="8e182f14fc6e80b3bfa375b33eb6cff7ee05d8ef7633e738d1c89021dcf0c5c5",
        members=(
            ArchiveMember(
                "scrfd_10g_bnkps.onnx",
                "antelopev2/scrfd_10g_bnkps.onnx",
                sha256="5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
            ),
            ArchiveMember(
                "glintr100.onnx",
                "antelopev2/glintr100.onnx",
                sha256="4ab1d6435d639628a6f3e5008dd4f929edf4c4124b1a7169e1048f9fef534cdf",
            ),
            ArchiveMember(  # the class word's apparent gender; the same file as buffalo_l's
                "genderage.onnx",
                "antelopev2/genderage.onnx",
                sha256="4fde69b1c810857b88c64a335084f1c3fe8f01246c9a191b48c7bb756d6652fb",
            ),
        ),
    ),
)

_SAFETY_CHECKER = Component(
    "Stable Diffusion safety checker (CLIP-based NSFW image filter)",
    f"See the model card at https://huggingface.co/{SAFETY_CHECKER_REPO} for its terms and limitations.",
    files=(
        HubFile(
            SAFETY_CHECKER_REPO, (("config.json", "safety_checker/config.json"),), revision=SAFETY_CHECKER_REVISION
        ),
        HubFile(
            SAFETY_CHECKER_REPO,
            (("preprocessor_config.json", "safety_checker/preprocessor_config.json"),),
            revision=SAFETY_CHECKER_REVISION,
        ),
        HubFile(
            SAFETY_CHECKER_REPO,
            (
                ("model.safetensors", "safety_checker/model.safetensors"),
                ("pytorch_model.bin", "safety_checker/pytorch_model.bin"),
            ),
            revision=SAFETY_CHECKER_REVISION,
        ),
    ),
)

_FEW_STEP = Component(
    "SDXL-Lightning 8-step LoRA (few-step mode; optional: without it every image draws the full way)",
    "CreativeML Open RAIL++-M licence (openrail++): use-based restrictions apply; read it at "
    f"https://huggingface.co/{LIGHTNING_REPO}",
    files=(HubFile(LIGHTNING_REPO, (("sdxl_lightning_8step_lora.safetensors", FEW_STEP_LORA),),
                   revision=LIGHTNING_REVISION, sha256=LIGHTNING_LORA_SHA256),),
    optional=True,
)

MANIFESTS: dict[str, tuple[Component, ...]] = {
    "sdxl": (_SDXL, _INSTANTID, _ANTELOPEV2, _SAFETY_CHECKER, _FEW_STEP),
    "sd15": (_SD15, _ANTELOPEV2, _SAFETY_CHECKER),
}
"""What ``pull`` fetches for each real preset."""

EVAL_DIR = "eval"
"""Folder under ``models_dir`` for what ``avatarbooth eval`` alone uses (``models pull --eval``)."""
CLIP_DIR = "clip"
"""The CLIP model's folder inside ``EVAL_DIR``: a transformers ``CLIPModel`` folder."""
CLIP_REPO = "openai/clip-vit-large-patch14"
# Seen as Hugging Face cache folders models--openai--clip-vit-large-patch14/snapshots/<sha>/ in public code.
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"

_CLIP_EVAL = Component(
    "CLIP ViT-L/14 (prompt adherence in `avatarbooth eval`, about 1.7 GB; the chat never loads it)",
    "MIT licence (https://github.com/openai/CLIP); its model card keeps deployed use out of scope: "
    "here it only scores eval images.",
    files=(
        *_hub(CLIP_REPO, "config.json", "preprocessor_config.json", *_CLIP_TOKENIZER, into=CLIP_DIR,
              revision=CLIP_REVISION),
        HubFile(
            CLIP_REPO,
            tuple((name, f"{CLIP_DIR}/{name}") for name in ("model.safetensors", "pytorch_model.bin")),
            revision=CLIP_REVISION,
        ),
    ),
)


def pull_eval(models_dir: Path, *, hub: HubClient | None = None, report: Report = print) -> int:
    """Fetch and verify the CLIP model ``avatarbooth eval`` scores prompts with, into ``models_dir/eval/clip``."""
    return pull(EVAL_DIR, models_dir, hub=hub, report=report, components=(_CLIP_EVAL,))


def with_base_model(preset: str, repo_id: str) -> tuple[Component, ...]:
    """``preset``'s manifest with its base model taken from ``repo_id`` (a fine-tuned SDXL or SD1.5
    checkpoint in diffusers' folder layout). Such repositories often have no ``.fp16.`` files, so the
    full-precision file is the fallback for each."""
    base = {"sdxl": _SDXL, "sd15": _SD15}[preset]

    def retarget(file: HubFile) -> HubFile:
        fallbacks = tuple((path.replace(".fp16.", "."), dest) for path, dest in file.candidates if ".fp16." in path)
        return HubFile(repo_id, file.candidates + fallbacks)

    custom = Component(
        f"base model {repo_id} (in place of {base.name})",
        f"The licence of {repo_id}: read it at https://huggingface.co/{repo_id} before use.",
        files=tuple(retarget(f) for f in base.files),
    )
    return tuple(custom if component is base else component for component in MANIFESTS[preset])


@dataclass(frozen=True)
class Published:
    """What a weights file of the manifest holds as published: its tensors' dtype and its size in bytes
    (None where no source gave it). Sizes are from the repositories' Git LFS pointers; a file written
    with the same tensors differs from it only by its header's length."""

    dtype: str  # safetensors' name ("F16", "F32"), or torch's ("float32") for a pickle
    size: int | None = None


PUBLISHED_WEIGHTS: dict[str, dict[str, Published]] = {
    "sdxl": {
        "sdxl/unet/diffusion_pytorch_model.safetensors": Published("F16", 5_135_149_760),
        "sdxl/vae/diffusion_pytorch_model.safetensors": Published("F16", 167_335_342),
        "sdxl/text_encoder/model.safetensors": Published("F16", 246_144_152),
        "sdxl/text_encoder_2/model.safetensors": Published("F16", 1_389_382_176),
        "identitynet/diffusion_pytorch_model.safetensors": Published("F16", 2_502_139_136),
        "ip-adapter.bin": Published("float32", 1_691_134_141),
        "safety_checker/model.safetensors": Published("F32", 1_215_981_833),
    },
    "sd15": {
        "sd15/unet/diffusion_pytorch_model.safetensors": Published("F16", 1_719_125_304),
        "sd15/vae/diffusion_pytorch_model.safetensors": Published("F16", 167_335_342),
        "sd15/text_encoder/model.safetensors": Published("F16"),
        "safety_checker/model.safetensors": Published("F32", 1_215_981_833),
    },
}
"""The weights files ``pull`` lays out, as published: what bench/fullsize.py's random models must match
(tests/test_fullsize_layout.py checks them against the published configs)."""


BUILT_LOCALLY = ("tiny", "tiny-sd15")
"""Presets the project builds itself, offline."""


# --- the hub client -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about a file: its size and hash (sha256 for LFS files, else the git blob id)."""

    size: int
    sha256: str | None = None
    git_oid: str | None = None


class HubClient(Protocol):
    """The downloads ``pull`` needs; ``HuggingFaceHub`` is the real one, tests pass their own."""

    def files_info(self, repo_id: str, paths: Sequence[str], revision: str | None) -> dict[str, RemoteFile]:
        """Metadata of those ``paths`` that exist in the repository (absent ones are left out)."""
        ...

    def download(self, repo_id: str, path: str, revision: str | None, local_dir: Path) -> Path:
        """Download one file into ``local_dir`` (resuming a partial download there); return its path."""
        ...

    def fetch_url(self, url: str, dest: Path) -> None:
        """Download ``url`` to ``dest``."""
        ...


class HuggingFaceHub:
    """``HubClient`` over huggingface_hub (``hf_hub_download``, progress bars included) and urllib."""

    def files_info(self, repo_id: str, paths: Sequence[str], revision: str | None) -> dict[str, RemoteFile]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        found: dict[str, RemoteFile] = {}
        for entry in HfApi().get_paths_info(repo_id, list(paths), revision=revision):
            if not isinstance(entry, RepoFile):  # a folder
                continue
            lfs = entry.lfs
            found[entry.path] = RemoteFile(
                size=int(entry.size),
                sha256=lfs.sha256 if lfs is not None else None,
                git_oid=None if lfs is not None else entry.blob_id,
            )
        return found

    def download(self, repo_id: str, path: str, revision: str | None, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, path, revision=revision, local_dir=local_dir))

    def fetch_url(self, url: str, dest: Path) -> None:
        import urllib.request

        from tqdm.auto import tqdm

        request = urllib.request.Request(url, headers={"User-Agent": "avatarbooth-models-pull"})
        with urllib.request.urlopen(request, timeout=60) as response, dest.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=PurePosixPath(url).name) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a file must be: its size and hashes, where known."""

    size: int | None = None
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str
    git_oid: str  # git's blob id: sha1 of "blob <size>\0" + content


def digest(path: Path) -> Digest:
    """Size, sha256 and git blob id of ``path``, in one pass."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return Digest(size, sha256.hexdigest(), sha1.hexdigest())


def verify_file(path: Path, expected: Expected) -> tuple[Digest | None, str | None]:
    """(digest, None) when ``path`` is what ``expected`` says and its format checks out, else (digest, reason)."""
    if not path.is_file():
        return None, "the file is missing"
    if path.stat().st_size == 0:
        return None, "the file is empty"
    if expected.size is not None and path.stat().st_size != expected.size:
        return None, f"its size is {path.stat().st_size} bytes, expected {expected.size}"
    found = digest(path)
    if expected.sha256 is not None and found.sha256 != expected.sha256.lower():
        return found, f"its sha256 is {found.sha256}, expected {expected.sha256}"
    if expected.git_oid is not None and found.git_oid != expected.git_oid:
        return found, f"its content hash (git blob id) is {found.git_oid}, expected {expected.git_oid}"
    return found, check_format(path)


def check_format(path: Path) -> str | None:
    """None when the file is well-formed for its type, else why not."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _check_safetensors(path)
        if suffix == ".onnx":
            return _check_onnx(path)
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".bin", ".pt", ".pth"):
            return _check_torch_checkpoint(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        return f"it is not a valid {suffix} file ({e})"
    return None


def _check_safetensors(path: Path) -> str | None:
    """The 8-byte header length, a JSON header, and tensor offsets that exactly fill the rest of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "it is too short to be a safetensors file"
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or 8 + header_len > size:
            return "its safetensors header length is out of range"
        header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + header_len + max(ends, default=0) != size:
        return "its safetensors tensors do not fill the file (truncated or padded)"
    return None


def _check_onnx(path: Path) -> str | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises its own DecodeError types
        return f"it does not load as an ONNX model ({type(e).__name__}: {e})"
    if not model.graph.input or not model.graph.output:
        return "the ONNX model has no inputs or outputs"
    return None


def _check_torch_checkpoint(path: Path) -> str | None:
    """A torch.save archive (a zip with a pickle inside, CRCs intact), or a legacy pickle."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "it is a zip archive but not a torch checkpoint"
            bad = archive.testzip()
            return None if bad is None else f"its member {bad} is corrupt"
    with path.open("rb") as f:
        if f.read(1) != b"\x80":  # pickle protocol marker of a legacy torch.save file
            return "it is neither a torch checkpoint archive nor a pickle"
    return None


# --- the record of verified files -----------------------------------------------------------------


@dataclass
class VerifiedRecord:
    """``<preset>/.pulled.json``: what was verified, so unchanged files are not hashed again."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path) -> VerifiedRecord:
        path = root / RECORD_FILE
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    def matches(self, root: Path, dest: str, expected: Expected) -> bool:
        """Whether ``dest`` was verified before, is unchanged on disk, and is what ``expected`` says."""
        entry = self.entries.get(dest)
        target = root / dest
        if entry is None or not target.is_file():
            return False
        stat = target.stat()
        if (stat.st_size, stat.st_mtime_ns) != (entry.get("size"), entry.get("mtime_ns")):
            return False
        return all(
            want is None or want.lower() == entry.get(key)
            for key, want in (("sha256", expected.sha256), ("git_oid", expected.git_oid))
        ) and (expected.size is None or expected.size == entry.get("size"))

    def add(self, root: Path, dest: str, found: Digest) -> None:
        stat = (root / dest).stat()
        self.entries[dest] = {
            "size": found.size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": found.sha256,
            "git_oid": found.git_oid,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


# --- pulling --------------------------------------------------------------------------------------


@dataclass
class _Pull:
    """One run of ``pull`` for one preset."""

    preset: str
    root: Path
    staging: Path
    hub: HubClient
    report: Report
    antelopev2_zip: Path | None
    record: VerifiedRecord = field(init=False)
    fetched: int = 0
    kept: int = 0

    def __post_init__(self) -> None:
        self.record = VerifiedRecord.open(self.root)

    def component(self, component: Component) -> None:
        self.report(f"- {component.name}")
        self.report(f"  licence: {component.licence}")
        by_repo: dict[tuple[str, str | None], list[HubFile]] = {}
        for hub_file in component.files:
            by_repo.setdefault((hub_file.repo_id, hub_file.revision), []).append(hub_file)
        for (repo_id, revision), files in by_repo.items():
            self.hub_files(repo_id, revision, files)
        if component.archive is not None:
            self.archive(component.archive)

    def hub_files(self, repo_id: str, revision: str | None, files: list[HubFile]) -> None:
        wanted = [path for f in files for path, _ in f.candidates]
        try:
            remote = self.hub.files_info(repo_id, wanted, revision)
        except Exception as e:
            if all(any(self.record.matches(self.root, d, Expected()) for _, d in f.candidates) for f in files):
                self.report(f"  could not reach the hub ({_brief(e)}); the files already here were verified before")
                self.kept += len(files)
                return
            raise PullError(f"cannot list {repo_id} on the Hugging Face Hub: {_brief(e)}. {_NETWORK_HINT}") from e
        for hub_file in files:
            choice = next(((p, d) for p, d in hub_file.candidates if p in remote), None)
            if choice is None:
                names = " or ".join(p for p, _ in hub_file.candidates)
                raise PullError(
                    f"{repo_id} has no file {names} (revision {revision or 'main'}). The repository may have "
                    "changed; pin a revision in avatarbooth/models.py or report it."
                )
            path, dest = choice
            info = remote[path]
            expected = Expected(
                size=info.size, sha256=hub_file.sha256 or info.sha256, git_oid=None if info.sha256 else info.git_oid
            )
            self.hub_file(repo_id, revision, path, dest, expected)

    def hub_file(self, repo_id: str, revision: str | None, path: str, dest: str, expected: Expected) -> None:
        if self.already_there(dest, expected):
            return
        try:
            downloaded = self.hub.download(repo_id, path, revision, self.staging / _safe_name(repo_id))
        except Exception as e:
            raise PullError(f"downloading {path} from {repo_id} failed: {_brief(e)}. {_NETWORK_HINT}") from e
        self.install(downloaded, dest, expected, f"{path} from {repo_id}")

    def archive(self, archive: UrlArchive) -> None:
        pending = [m for m in archive.members if not self.already_there(m.dest, Expected(sha256=m.sha256))]
        if not pending:
            return
        zip_path = self.archive_file(archive)
        try:
            with zipfile.ZipFile(zip_path) as opened:
                for member in pending:
                    extracted = self.extract(opened, member, zip_path)
                    expected = Expected(sha256=member.sha256)
                    self.install(extracted, member.dest, expected, f"{member.name} from {zip_path}")
        except zipfile.BadZipFile as e:
            raise PullError(f"{zip_path} is not a readable zip archive ({e}); delete it and pull again.") from e

    def archive_file(self, archive: UrlArchive) -> Path:
        """A verified copy of the archive: the one given with ``antelopev2_zip``, in staging, or downloaded."""
        file_name = PurePosixPath(archive.url).name
        manual_hint = (
            f"Download {archive.url} yourself (or a copy of the same file), check that its sha256 is "
            f"{archive.sha256}, and pass it with --antelopev2-zip PATH."
        )
        if self.antelopev2_zip is not None:
            _, problem = verify_file(self.antelopev2_zip, Expected(sha256=archive.sha256))
            if problem is not None:
                raise PullError(f"{self.antelopev2_zip} is not the expected {file_name}: {problem}. {manual_hint}")
            return self.antelopev2_zip
        zip_path = self.staging / file_name
        if zip_path.is_file() and verify_file(zip_path, Expected(sha256=archive.sha256))[1] is None:
            return zip_path
        self.staging.mkdir(parents=True, exist_ok=True)
        part = zip_path.with_name(zip_path.name + ".part")
        try:
            self.hub.fetch_url(archive.url, part)
        except Exception as e:
            part.unlink(missing_ok=True)
            raise PullError(f"downloading {archive.url} failed: {_brief(e)}. {manual_hint}") from e
        _, problem = verify_file(part, Expected(sha256=archive.sha256))
        if problem is not None:
            part.unlink(missing_ok=True)
            raise PullError(f"the downloaded {file_name} failed verification: {problem}. {manual_hint}")
        os.replace(part, zip_path)
        return zip_path

    def extract(self, opened: zipfile.ZipFile, member: ArchiveMember, zip_path: Path) -> Path:
        names = [n for n in opened.namelist() if PurePosixPath(n).name == member.name and not n.endswith("/")]
        if not names:
            raise PullError(f"{zip_path} holds no {member.name}; it is not the archive the manifest expects.")
        out = self.staging / "extracted" / member.name
        out.parent.mkdir(parents=True, exist_ok=True)
        with opened.open(names[0]) as source, out.open("wb") as sink:  # zipfile checks the CRC as it reads
            shutil.copyfileobj(source, sink, _CHUNK)
        return out

    def already_there(self, dest: str, expected: Expected) -> bool:
        """True (and reported) when ``dest`` is in place and verified; a bad file there is replaced later."""
        if self.record.matches(self.root, dest, expected):
            self.report(f"  ok       {dest}")
            self.kept += 1
            return True
        target = self.root / dest
        if not target.exists():
            return False
        found, problem = verify_file(target, expected)
        if problem is None and found is not None:
            self.record.add(self.root, dest, found)
            self.report(f"  ok       {dest} (verified)")
            self.kept += 1
            return True
        self.report(f"  replace  {dest}: {problem}")
        return False

    def install(self, downloaded: Path, dest: str, expected: Expected, what: str) -> None:
        """Verify a download in staging and rename it into place; a bad one is deleted and reported."""
        found, problem = verify_file(downloaded, expected)
        if problem is not None or found is None:
            downloaded.unlink(missing_ok=True)
            raise PullError(
                f"{what} failed verification: {problem}. It was deleted; run the command again to fetch it "
                "anew. If it fails again, the source changed or the download is being corrupted on the way."
            )
        target = self.root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloaded, target)
        self.record.add(self.root, dest, found)
        self.report(f"  fetched  {dest}")
        self.fetched += 1


_NETWORK_HINT = (
    "Check the network connection (and that HF_HUB_OFFLINE is not set); for a gated or private "
    "repository, log in first with `hf auth login`."
)


def _brief(error: BaseException) -> str:
    """The error's type and first line, without a trailing full stop (the caller's sentence goes on)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": .")


def _safe_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def pull(
    preset: str,
    models_dir: Path,
    *,
    hub: HubClient | None = None,
    report: Report = print,
    antelopev2_zip: Path | None = None,
    components: Sequence[Component] | None = None,
) -> int:
    """Fetch and verify ``preset``'s weights into ``models_dir/<preset>/``; return an exit status.

    0: everything is in place, or all but optional components; 1: some other component failed (each
    failure is reported with what to do, the others are still fetched); 2: an unknown preset. ``hub``
    defaults to the real Hugging Face Hub.
    ``antelopev2_zip`` is a local copy of insightface's antelopev2.zip to use instead of downloading it.
    ``components`` replaces the preset's manifest (``MANIFESTS[preset]``).
    """
    if preset in BUILT_LOCALLY:
        report(f"{preset}: nothing to pull, built locally (random weights, offline) the first time it is used.")
        return 0
    components = components if components is not None else MANIFESTS.get(preset)
    if components is None:
        choices = ", ".join([*MANIFESTS, *BUILT_LOCALLY])
        report(f"avatarbooth models pull: unknown preset {preset!r}; the presets are: {choices}.")
        return 2
    root = models_dir / preset
    run = _Pull(preset, root, models_dir / STAGING_DIR / preset, hub or HuggingFaceHub(), report, antelopev2_zip)
    report(f"Pulling the {preset!r} preset into {root}")
    failures: list[Component] = []
    for component in components:
        try:
            run.component(component)
        except PullError as e:
            report(f"  FAILED: {e}")
            failures.append(component)
    if required := [c.name for c in failures if not c.optional]:
        report(
            f"{len(required)} component(s) of {preset!r} could not be pulled: {', '.join(required)}. "
            "Fix what is reported above and run the command again; verified files are kept."
        )
        return 1
    done = f"Done: {run.fetched} file(s) fetched, {run.kept} already in place and verified."
    if failures:  # optional ones only; their staged downloads stay, for the next run to resume
        names = ", ".join(c.name for c in failures)
        report(f"{done} NOT pulled (optional, the preset works without it): {names}. Fix what is reported "
               "above and run the command again to fetch it.")
        return 0
    shutil.rmtree(run.staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        run.staging.parent.rmdir()  # only when no other preset's pull is pending
    report(done)
    return 0


def files_for(preset: str, *, optional: bool = False) -> list[str]:
    """The paths (relative to the preset folder) that ``pull`` lays out for ``preset``, first choices only;
    those of optional components (the few-step LoRA) too with ``optional``."""
    paths: list[str] = []
    for component in (c for c in MANIFESTS.get(preset, ()) if optional or not c.optional):
        paths += [f.candidates[0][1] for f in component.files]
        if component.archive is not None:
            paths += [m.dest for m in component.archive.members]
    return paths


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m avatarbooth.models pull --preset P --models-dir DIR`` (the CLI proper is ``avatarbooth``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="avatarbooth-models", description="Fetch a preset's model weights.")
    commands = parser.add_subparsers(dest="command", required=True)
    pull_parser = commands.add_parser("pull", help="download and verify a preset's weights")
    choices = ", ".join([*MANIFESTS, *BUILT_LOCALLY])
    pull_parser.add_argument("--preset", default="sdxl", help=f"preset to fetch: {choices} (default: sdxl)")
    pull_parser.add_argument("--models-dir", type=Path, required=True, help="the models folder (DATA/models)")
    add_pull_arguments(pull_parser)
    args = parser.parse_args(None if argv is None else list(argv))
    code = pull(args.preset, args.models_dir, antelopev2_zip=args.antelopev2_zip)
    return max(code, pull_eval(args.models_dir)) if args.eval else code


def add_pull_arguments(parser: Any) -> None:
    """The options of ``models pull`` beyond the preset and where models live (the CLI has those)."""
    parser.add_argument(
        "--antelopev2-zip",
        type=Path,
        default=None,
        metavar="PATH",
        help="use this local copy of insightface's antelopev2.zip instead of downloading it",
    )
    parser.add_argument(
        "--eval", action="store_true", help="also fetch the CLIP model `avatarbooth eval` scores prompt adherence with"
    )

if __name__ == "__main__":
    sys.exit(main())
