"""``avatarbooth models pull`` against a fake hub that serves files made here (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from avatarbooth.models import (
    LIGHTNING_REPO,
    LIGHTNING_REVISION,
    MANIFESTS,
    RECORD_FILE,
    STAGING_DIR,
    ArchiveMember,
    Component,
    HubFile,
    RemoteFile,
    check_format,
    files_for,
    pull,
)
from engine.presets import FEW_STEP_LORA


def _safetensors(seed: int) -> bytes:
    return save_safetensors({"weight": np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)})


def _torch_checkpoint() -> bytes:
    import torch

    out = io.BytesIO()
    state = {"image_proj": {"latents": torch.zeros(1, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2, 2)}}
    torch.save(state, out)
    return out.getvalue()


def _onnx_model(name: str) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    return bytes(onnx.helper.make_model(graph).SerializeToString())


def _content_for(path: str, seed: int) -> bytes:
    """Something well-formed for a file of this name."""
    if path.endswith(".safetensors"):
        return _safetensors(seed)
    if path.endswith(".bin"):
        return _torch_checkpoint()
    if path.endswith(".json"):
        return json.dumps({"file": path}).encode()
    return f"contents of {path}\n".encode()


class FakeHub:
    """A stand-in for the Hugging Face Hub and GitHub releases, serving in-memory files.

    ``corrupt`` maps (repo, path) to bytes served instead of the real ones, while the metadata still
    describes the real ones: what a download damaged on the way looks like. ``revisions`` records the
    (repo, revision) of every listing and download.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]], urls: dict[str, bytes]) -> None:
        self.repos = repos
        self.urls = urls
        self.corrupt: dict[tuple[str, str], bytes] = {}
        self.downloads: list[tuple[str, str]] = []
        self.revisions: list[tuple[str, str | None]] = []
        self.fetches: list[str] = []
        self.reachable = True

    def files_info(self, repo_id: str, paths: Sequence[str], revision: str | None) -> dict[str, RemoteFile]:
        if not self.reachable:
            raise ConnectionError("no route to host")
        self.revisions.append((repo_id, revision))
        files = self.repos[repo_id]
        found = {}
        for path in paths:
            if path in files:
                data = files[path]
                if path.endswith((".safetensors", ".bin")):  # LFS files: the hub publishes their sha256
                    found[path] = RemoteFile(size=len(data), sha256=hashlib.sha256(data).hexdigest())
                else:  # small files: the git blob id
                    oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                    found[path] = RemoteFile(size=len(data), git_oid=oid)
        return found

    def download(self, repo_id: str, path: str, revision: str | None, local_dir: Path) -> Path:
        self.downloads.append((repo_id, path))
        self.revisions.append((repo_id, revision))
        out = local_dir / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.corrupt.get((repo_id, path), self.repos[repo_id][path]))
        return out

    def fetch_url(self, url: str, dest: Path) -> None:
        if not self.reachable:
            raise ConnectionError("no route to host")
        self.fetches.append(url)
        dest.write_bytes(self.urls[url])


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _served(components: Sequence[Component]) -> tuple[dict[str, dict[str, bytes]], dict[str, bytes]]:
    repos: dict[str, dict[str, bytes]] = {}
    urls: dict[str, bytes] = {}
    for number, component in enumerate(components):
        for seed, hub_file in enumerate(component.files):
            path = hub_file.candidates[0][0]
            repos.setdefault(hub_file.repo_id, {})[path] = _content_for(path, 100 * number + seed)
        if component.archive is not None:
            # insightface's archive keeps its files in a folder of the pack's name
            members = {f"antelopev2/{m.name}": _onnx_model(m.name) for m in component.archive.members}
            urls[component.archive.url] = _zip({**members, "antelopev2/genderage.onnx": _onnx_model("ga")})
    return repos, urls


def _with_served_hashes(
    components: Sequence[Component], repos: dict[str, dict[str, bytes]], urls: dict[str, bytes]
) -> list[Component]:
    """The manifest with its pinned hashes (the archive's, a hub file's) swapped for those of the fake files."""
    fixed = []
    for component in components:
        files = tuple(
            dataclasses.replace(f, sha256=hashlib.sha256(repos[f.repo_id][f.candidates[0][0]]).hexdigest())
            if f.sha256 and f.candidates[0][0] in repos.get(f.repo_id, {}) else f
            for f in component.files
        )
        component = dataclasses.replace(component, files=files)
        archive = component.archive
        if archive is not None:
            data = urls[archive.url]
            with zipfile.ZipFile(io.BytesIO(data)) as opened:
                members = tuple(
                    dataclasses.replace(m, sha256=hashlib.sha256(opened.read(f"antelopev2/{m.name}")).hexdigest())
                    for m in archive.members
                )
            archive = dataclasses.replace(archive, sha256=hashlib.sha256(data).hexdigest(), members=members)
            component = dataclasses.replace(component, archive=archive)
        fixed.append(component)
    return fixed


@pytest.fixture
def sdxl_hub() -> tuple[FakeHub, list[Component]]:
    repos, urls = _served(MANIFESTS["sdxl"])
    return FakeHub(repos, urls), _with_served_hashes(MANIFESTS["sdxl"], repos, urls)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd15"])
def test_tiny_has_nothing_to_pull(tmp_path: Path, preset: str) -> None:
    lines: list[str] = []
    hub = FakeHub({}, {})
    assert pull(preset, tmp_path, hub=hub, report=lines.append) == 0
    assert "nothing to pull, built locally" in lines[0]
    assert list(tmp_path.iterdir()) == []
    assert hub.downloads == [] and hub.fetches == []


def test_unknown_preset_names_the_presets(tmp_path: Path) -> None:
    lines: list[str] = []
    assert pull("sd3", tmp_path, hub=FakeHub({}, {}), report=lines.append) == 2
    assert "sdxl" in lines[0] and "tiny" in lines[0]


def test_sdxl_lands_where_the_presets_expect(tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]) -> None:
    from engine.presets import load_preset

    hub, manifest = sdxl_hub
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0
    root = tmp_path / "sdxl"
    for rel in files_for("sdxl"):
        assert (root / rel).is_file(), rel
    # fp16 variant files are stored under the plain names that from_pretrained(folder) looks for
    assert (root / "sdxl/unet/diffusion_pytorch_model.safetensors").is_file()
    assert not list(root.rglob("*.fp16.*"))
    preset = load_preset("sdxl", tmp_path)  # its required files are all there
    assert preset.few_step_lora_path == root / FEW_STEP_LORA and preset.few_step_lora_path.is_file()
    assert not (tmp_path / STAGING_DIR).exists()
    assert any("NON-COMMERCIAL" in line for line in lines)  # insightface's licence note
    assert (root / RECORD_FILE).is_file()


def test_sd15_lands_where_the_presets_expect(tmp_path: Path) -> None:
    from engine.presets import load_preset

    repos, urls = _served(MANIFESTS["sd15"])
    manifest = _with_served_hashes(MANIFESTS["sd15"], repos, urls)
    assert pull("sd15", tmp_path, hub=FakeHub(repos, urls), report=lambda _: None, components=manifest) == 0
    assert load_preset("sd15", tmp_path).name == "sd15"
    assert (tmp_path / "sd15/sd15/unet/diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "sd15/safety_checker/model.safetensors").is_file()
    assert not (tmp_path / "sd15" / FEW_STEP_LORA).exists()  # no few-step LoRA for SD1.5


def test_a_second_pull_downloads_nothing(tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]) -> None:
    hub, manifest = sdxl_hub
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0
    downloads, fetches = len(hub.downloads), len(hub.fetches)
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0
    assert (len(hub.downloads), len(hub.fetches)) == (downloads, fetches)
    assert lines[-1].startswith(f"Done: 0 file(s) fetched, {len(files_for('sdxl', optional=True))} already in place")


def test_a_corrupted_download_fails_with_a_clear_message(
    tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]
) -> None:
    hub, manifest = sdxl_hub
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    good = hub.repos["stabilityai/stable-diffusion-xl-base-1.0"][unet]
    hub.corrupt[("stabilityai/stable-diffusion-xl-base-1.0", unet)] = good[:-8] + b"\0" * 8  # same size
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 1
    failure = next(line for line in lines if "FAILED" in line)
    assert unet in failure and "failed verification" in failure and "sha256" in failure
    assert "run the command again" in failure
    assert not (tmp_path / "sdxl/sdxl/unet/diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "sdxl/identitynet/config.json").is_file()  # the other components still came

    del hub.corrupt[("stabilityai/stable-diffusion-xl-base-1.0", unet)]
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0
    assert (tmp_path / "sdxl/sdxl/unet/diffusion_pytorch_model.safetensors").read_bytes() == good


def test_the_few_step_lora_comes_from_sdxl_lightning_at_its_pinned_commit(
    tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]
) -> None:
    hub, manifest = sdxl_hub
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0

    published = "sdxl_lightning_8step_lora.safetensors"
    assert hub.downloads.count((LIGHTNING_REPO, published)) == 1
    assert {revision for repo, revision in hub.revisions if repo == LIGHTNING_REPO} == {LIGHTNING_REVISION}
    assert (tmp_path / "sdxl" / FEW_STEP_LORA).read_bytes() == hub.repos[LIGHTNING_REPO][published]
    assert any("openrail++" in line for line in lines)  # its licence note
    assert FEW_STEP_LORA in files_for("sdxl", optional=True) and FEW_STEP_LORA not in files_for("sdxl")


def test_a_few_step_lora_that_fails_is_reported_and_fails_no_pull(
    tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]
) -> None:
    from engine.presets import load_preset

    hub, manifest = sdxl_hub
    published = "sdxl_lightning_8step_lora.safetensors"
    good = hub.repos[LIGHTNING_REPO][published]
    hub.corrupt[(LIGHTNING_REPO, published)] = good[:-8] + b"\0" * 8
    lines: list[str] = []

    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0
    failure = next(line for line in lines if "FAILED" in line)
    assert published in failure and "failed verification" in failure
    summary = lines[-1]
    assert "NOT pulled (optional" in summary and "SDXL-Lightning" in summary and "run the command again" in summary
    assert not (tmp_path / "sdxl" / FEW_STEP_LORA).exists()
    assert load_preset("sdxl", tmp_path).name == "sdxl"  # the preset works, without few-step mode

    del hub.corrupt[(LIGHTNING_REPO, published)]
    lines.clear()
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0
    assert lines[-1].startswith("Done: 1 file(s) fetched")
    assert (tmp_path / "sdxl" / FEW_STEP_LORA).read_bytes() == good
    assert not (tmp_path / STAGING_DIR).exists()


def test_the_few_step_lora_is_checked_against_its_published_sha256(tmp_path: Path) -> None:
    lora = next(c for c in MANIFESTS["sdxl"] if c.optional)
    repos, urls = _served([lora])  # a file that is not the published one, under its name
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=FakeHub(repos, urls), report=lines.append, components=[lora]) == 0
    assert any("FAILED" in line and "sha256" in line and "5aa30d94" in line for line in lines)
    assert not (tmp_path / "sdxl" / FEW_STEP_LORA).exists()


def test_a_damaged_file_on_disk_is_fetched_again(tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]) -> None:
    hub, manifest = sdxl_hub
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0
    target = tmp_path / "sdxl/ip-adapter.bin"
    target.write_bytes(target.read_bytes()[:100])
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 0
    assert any(line.strip().startswith("replace  ip-adapter.bin") for line in lines)
    assert hub.downloads.count(("InstantX/InstantID", "ip-adapter.bin")) == 2
    assert check_format(target) is None


def test_a_wrong_archive_is_refused_and_a_local_copy_can_be_given(tmp_path: Path) -> None:
    repos, urls = _served(MANIFESTS["sdxl"])
    manifest = _with_served_hashes(MANIFESTS["sdxl"], repos, urls)
    archive = next(c.archive for c in manifest if c.archive is not None)
    good = urls[archive.url]
    urls[archive.url] = _zip({"antelopev2/other.onnx": _onnx_model("other")})
    hub = FakeHub(repos, urls)
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 1
    failure = next(line for line in lines if "FAILED" in line)
    assert "antelopev2.zip failed verification" in failure and "--antelopev2-zip" in failure

    local = tmp_path / "antelopev2.zip"
    local.write_bytes(good)
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest, antelopev2_zip=local) == 0
    assert check_format(tmp_path / "sdxl/antelopev2/glintr100.onnx") is None


def test_the_safety_checker_falls_back_to_the_pickled_weights(tmp_path: Path) -> None:
    component = next(c for c in MANIFESTS["sdxl"] if c.name.startswith("Stable Diffusion safety checker"))
    repos, urls = _served([component])
    files = repos["CompVis/stable-diffusion-safety-checker"]
    files["pytorch_model.bin"] = _torch_checkpoint()
    del files["model.safetensors"]
    assert pull("sdxl", tmp_path, hub=FakeHub(repos, urls), report=lambda _: None, components=[component]) == 0
    assert (tmp_path / "sdxl/safety_checker/pytorch_model.bin").is_file()
    assert not (tmp_path / "sdxl/safety_checker/model.safetensors").exists()


def test_a_file_missing_from_the_repository_is_named(tmp_path: Path) -> None:
    component = Component("thing", "none", files=(HubFile("org/repo", (("weights.safetensors", "w.safetensors"),)),))
    hub = FakeHub({"org/repo": {}}, {})
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=[component]) == 1
    assert any("org/repo has no file weights.safetensors" in line for line in lines)


def test_an_unreachable_hub_is_fine_once_everything_was_verified(
    tmp_path: Path, sdxl_hub: tuple[FakeHub, list[Component]]
) -> None:
    hub, manifest = sdxl_hub
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0
    hub.reachable = False
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0
    (tmp_path / "sdxl/sdxl/model_index.json").unlink()
    lines: list[str] = []
    assert pull("sdxl", tmp_path, hub=hub, report=lines.append, components=manifest) == 1
    assert any("cannot list stabilityai/stable-diffusion-xl-base-1.0" in line and "network" in line for line in lines)


@pytest.mark.parametrize("cut", [1, 100])
def test_a_truncated_safetensors_file_is_caught_by_its_header(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors(0)[:-cut])
    problem = check_format(path)
    assert problem is not None and "safetensors" in problem


def test_every_member_of_the_real_manifest_is_pinned() -> None:
    archive_members: list[ArchiveMember] = [
        m for c in MANIFESTS["sdxl"] if c.archive is not None for m in c.archive.members
    ]
    assert {m.dest for m in archive_members} == {
        "antelopev2/scrfd_10g_bnkps.onnx", "antelopev2/glintr100.onnx", "antelopev2/genderage.onnx"
    }
    assert all(m.sha256 and len(m.sha256) == 64 for m in archive_members)
    assert "sd15/model_index.json" in files_for("sd15")


def test_every_hub_file_is_pinned_to_a_commit() -> None:
    hub_files = [f for components in MANIFESTS.values() for c in components for f in c.files]

    commit = re.compile(r"[0-9a-f]{40}")
    unpinned = [(f.repo_id, f.candidates[0][0]) for f in hub_files if not commit.fullmatch(f.revision or "")]
    assert hub_files and unpinned == []


@pytest.mark.parametrize("preset", ["sdxl", "sd15"])
def test_every_listing_and_download_asks_for_the_pinned_commit(tmp_path: Path, preset: str) -> None:
    repos, urls = _served(MANIFESTS[preset])
    hub = FakeHub(repos, urls)
    manifest = _with_served_hashes(MANIFESTS[preset], repos, urls)
    assert pull(preset, tmp_path, hub=hub, report=lambda _: None, components=manifest) == 0

    pinned = {(f.repo_id, f.revision) for c in MANIFESTS[preset] for f in c.files}
    assert hub.downloads and set(hub.revisions) == pinned
    assert all(re.fullmatch(r"[0-9a-f]{40}", revision or "") for _, revision in hub.revisions)
    assert len({revision for _, revision in pinned}) == len({repo for repo, _ in pinned})  # one commit a repo


def test_a_custom_base_model_without_fp16_files_is_pulled_in_place_of_sdxl_base(tmp_path: Path) -> None:
    from avatarbooth.models import with_base_model
    from engine.presets import load_preset

    manifest = with_base_model("sdxl", "someone/sdxl-finetune")
    repos, urls = _served(MANIFESTS["sdxl"])
    # The fine-tune's repository has only full-precision files, under the plain names.
    base = repos.pop("stabilityai/stable-diffusion-xl-base-1.0")
    custom = {path.replace(".fp16.", "."): data for path, data in base.items()}
    repos["someone/sdxl-finetune"] = custom
    hub = FakeHub(repos, urls)
    served = _with_served_hashes(manifest, repos, urls)
    assert pull("sdxl", tmp_path, hub=hub, report=lambda _: None, components=served) == 0
    assert load_preset("sdxl", tmp_path).name == "sdxl"
    fetched = {path for repo, path in hub.downloads if repo == "someone/sdxl-finetune"}
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert not any(repo == "stabilityai/stable-diffusion-xl-base-1.0" for repo, _ in hub.downloads)
    # SDXL base's pinned commit means nothing in another repository: the fine-tune's default branch.
    assert {revision for repo, revision in hub.revisions if repo == "someone/sdxl-finetune"} == {None}
    unet = tmp_path / "sdxl/sdxl/unet/diffusion_pytorch_model.safetensors"
    assert unet.read_bytes() == custom["unet/diffusion_pytorch_model.safetensors"]
