"""``avatarbooth eval`` on the tiny preset's real models: two identity folders, every method, the JSON it ends
with, the copy-paste guard on real photos, the CLIP path (tiny and pulled), and the input it refuses."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from avatarbooth.cli import main
from avatarbooth.eval import (
    IMAGES_PER_PROMPT,
    NO_CLIP_REASON,
    PROMPTS,
    TINY_REASON,
    ClipScorer,
    build_tiny_clip,
    load_clip,
    score_faces,
)
from avatarbooth.models import CLIP_DIR, CLIP_REPO, EVAL_DIR, RemoteFile, pull_eval
from engine.faces.analyzer import FaceAnalyzer, FaceRecord, cosine, mean_embedding
from engine.presets import load_preset
from tests.support import face_photo, faceless_photo

pytestmark = pytest.mark.slow
METHODS = ("preview", "lora", "ti")


def astronaut(variant: int) -> bytes:
    """The first identity: the tests' real face photo, as distinct JPEGs."""
    return face_photo(variant)


def upside_down(variant: int) -> bytes:
    """The second identity: the same photo turned upside down. The tiny recognizer is no face model: it
    embeds the aligned crop's pattern, and turned over that pattern is another "person" to it."""
    out = io.BytesIO()
    Image.open(io.BytesIO(face_photo(variant))).rotate(180).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_folder(root: Path, name: str, photos: Sequence[bytes]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for number, data in enumerate(photos):
        (folder / f"photo-{number}.jpg").write_bytes(data)
    return folder


def write_config(tmp: Path, models_dir: Path) -> Path:
    """Few steps, so the run is quick; a data folder of its own, which eval must leave untouched."""
    config = tmp / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\npreview_steps = 2\ndraw_steps = 2\n'
        "[training]\nsteps = 2\n"
    )
    return config


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    report: dict[str, Any]
    tmp: Path
    temp_dir: Path
    log_lines: list[str]


def run_cli(args: Sequence[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One whole ``avatarbooth eval --json`` over two identities, with every log line kept."""
    tmp = tmp_path_factory.mktemp("eval")
    people = tmp / "people"
    write_folder(people, "astronaut", [astronaut(n) for n in range(4)])
    write_folder(people, "upside-down", [upside_down(n) for n in range(4)])
    config = write_config(tmp, tiny_preset_dir.parent)
    temp_dir = tmp / "tmp"
    temp_dir.mkdir()
    records, root = _Records(), logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(temp_dir))
            code, stdout, stderr = run_cli(
                ["eval", str(people), "--config", str(config), "--preset", "tiny", "--methods", ",".join(METHODS),
                 "--json"]
            )
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    assert code == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    yield Run(code, stdout, stderr, report, tmp, temp_dir, records.lines)


def test_the_json_has_one_row_per_identity_and_method_and_says_tiny_numbers_mean_nothing(tiny_run: Run) -> None:
    report = tiny_run.report
    assert report["preset"] == "tiny"
    assert report["meaningful"] is False and report["reason"] == TINY_REASON
    assert report["methods"] == list(METHODS)
    assert report["prompts"] == list(PROMPTS)
    assert [(r["identity"], r["method"]) for r in report["rows"]] == [
        (person, method) for person in ("astronaut", "upside-down") for method in METHODS
    ]
    for row in report["rows"]:
        assert row["available"] is True and row["reason"] is None
        assert row["images"] == len(PROMPTS) * IMAGES_PER_PROMPT
        assert 0 <= row["faces_found"] <= row["images"] - row["flagged"]
        assert (row["train_steps"] is None) == (row["method"] == "preview")
        assert row["train_steps"] in (None, 2)  # [training] steps reached the trainer
    assert set(report["summary"]) == set(METHODS)
    assert "NOTE: tiny preset" in tiny_run.stdout  # the human table says so too
    assert "copy-paste" in tiny_run.stdout


def test_every_number_is_in_range_and_copy_paste_is_nearest_minus_held_out(tiny_run: Run) -> None:
    for row in tiny_run.report["rows"]:
        cosines = [row[k] for k in ("similarity_held_out", "similarity_enrolled_mean", "similarity_nearest_enrolled")]
        if row["faces_found"]:
            assert all(-1.0 <= c <= 1.0 for c in cosines)
            assert row["copy_paste"] == pytest.approx(row["similarity_nearest_enrolled"] - row["similarity_held_out"],
                                                      abs=1e-4)
            assert row["face_reason"] is None
        else:  # the tiny models draw noise: no face, so no face number, and a reason
            assert cosines == [None, None, None] and row["copy_paste"] is None
            assert row["face_reason"] == f"no face was found in any of the {row['images']} scored drawings"
        # The tiny presets score with a random-weight CLIP, so its path runs: a number in [0, 100].
        assert row["clip_score"] is not None and 0.0 <= row["clip_score"] <= 100.0 and row["clip_reason"] is None
    assert tiny_run.report["clip_model"].startswith("tiny random-weight CLIP")


def test_the_held_out_photo_matches_its_own_set_and_not_the_other_identity(tiny_run: Run) -> None:
    identities = {i["identity"]: i for i in tiny_run.report["identities"]}
    assert set(identities) == {"astronaut", "upside-down"}
    for person in identities.values():
        assert person["photos"] == 4 and person["enrolled"] == 3
        assert person["held_out"] == "photo-3.jpg"  # the last by sorted name
        assert person["held_out_similarity_enrolled_mean"] > 0.8
        assert person["held_out_similarity_nearest_enrolled"] >= person["held_out_similarity_enrolled_mean"] - 0.05
        # The two folders are different people to the tiny recognizer (below the same-person threshold).
        assert person["held_out_similarity_other_identities"] < 0.4


def test_eval_leaves_no_file_behind_and_logs_no_name_or_path(tiny_run: Run) -> None:
    assert list(tiny_run.temp_dir.iterdir()) == []  # the temporary blob folder (and tiny CLIP) are gone
    assert not (tiny_run.tmp / "data").exists()
    assert tiny_run.log_lines  # the engine did log, at DEBUG
    for line in tiny_run.log_lines:
        assert "astronaut" not in line and "upside-down" not in line and "photo-" not in line, line
        assert str(tiny_run.tmp) not in line, line


# --- the numbers on real photos -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer(tiny_preset_dir: Path) -> FaceAnalyzer:
    preset = load_preset("tiny", tiny_preset_dir.parent)
    return FaceAnalyzer(preset.face_models_dir, preset.face_checks)


def record(analyzer: FaceAnalyzer, photo: bytes) -> FaceRecord:
    checked = analyzer.check(photo, [])
    assert checked.record is not None, checked.refusal
    return checked.record


def test_a_drawing_that_copies_a_training_photo_scores_a_positive_copy_paste_ratio(analyzer: FaceAnalyzer) -> None:
    enrolled = [record(analyzer, astronaut(n)) for n in range(3)]
    held_out = record(analyzer, astronaut(3))
    copied = Image.open(io.BytesIO(astronaut(0)))  # the "drawing" is an enrolled photo itself
    new_photo = Image.open(io.BytesIO(astronaut(3)))  # ... or a photo the model never saw

    copy = score_faces(analyzer, [copied], held_out, enrolled)
    assert copy.nearest_enrolled == pytest.approx(1.0, abs=1e-3)
    assert copy.held_out == pytest.approx(round(cosine(enrolled[0].embedding, held_out.embedding), 4), abs=1e-3)
    assert copy.copy_paste is not None and copy.copy_paste > 0

    fresh = score_faces(analyzer, [new_photo], held_out, enrolled)
    assert fresh.held_out == pytest.approx(1.0, abs=1e-3)
    assert fresh.copy_paste is not None and fresh.copy_paste < 0


def test_faces_are_scored_where_found_and_someone_else_scores_low(analyzer: FaceAnalyzer) -> None:
    enrolled = [record(analyzer, astronaut(n)) for n in range(3)]
    held_out = record(analyzer, astronaut(3))
    images = [Image.open(io.BytesIO(data)) for data in (upside_down(0), faceless_photo(), upside_down(1))]
    scores = score_faces(analyzer, images, held_out, enrolled)
    assert scores.faces_found == 2  # the faceless image counts for nothing
    assert scores.held_out is not None and scores.held_out < 0.4
    others = [record(analyzer, upside_down(n)).embedding for n in (0, 1)]
    expected = sum(cosine(e, mean_embedding(enrolled)) for e in others) / 2
    assert scores.enrolled_mean == pytest.approx(expected, abs=1e-3)
    assert score_faces(analyzer, [images[1]], held_out, enrolled).copy_paste is None


# --- CLIP ---------------------------------------------------------------------------------------------------


class ServeFolder:
    """A stand-in for the Hub serving one folder's files as ``CLIP_REPO`` (LFS sha256 for weights)."""

    def __init__(self, folder: Path) -> None:
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def files_info(self, repo_id: str, paths: Sequence[str], revision: str | None) -> dict[str, RemoteFile]:
        assert repo_id == CLIP_REPO and revision is not None  # pulled at a pinned commit
        found = {}
        for path in paths:
            if path in self.files:
                data = self.files[path]
                if path.endswith(".safetensors"):
                    found[path] = RemoteFile(size=len(data), sha256=hashlib.sha256(data).hexdigest())
                else:
                    oid = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                    found[path] = RemoteFile(size=len(data), git_oid=oid)
        return found

    def download(self, repo_id: str, path: str, revision: str | None, local_dir: Path) -> Path:
        out = local_dir / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.files[path])
        return out

    def fetch_url(self, url: str, dest: Path) -> None:
        raise AssertionError("the CLIP model comes from the Hub only")


def test_models_pull_eval_lays_out_a_clip_that_eval_scores_with(tmp_path: Path) -> None:
    import torch

    built = build_tiny_clip(tmp_path / "built")  # the published repository's file layout, in miniature
    models = tmp_path / "models"
    assert load_clip(models, tiny=False, work_dir=tmp_path, device=torch.device("cpu")) == (None, NO_CLIP_REASON)

    lines: list[str] = []
    assert pull_eval(models, hub=ServeFolder(built), report=lines.append) == 0
    assert (models / EVAL_DIR / CLIP_DIR / "model.safetensors").is_file()
    pulled, reason = load_clip(models, tiny=False, work_dir=tmp_path, device=torch.device("cpu"))
    assert pulled is not None and reason == ""
    assert pulled.label == str(models / EVAL_DIR / CLIP_DIR)

    direct = ClipScorer.load(built, torch.device("cpu"), "built")
    images = [Image.open(io.BytesIO(astronaut(0))), Image.open(io.BytesIO(faceless_photo()))]
    text = "a close-up portrait photo of a woman"
    scores = pulled.scores(images, text)
    assert len(scores) == 2 and all(0.0 <= s <= 100.0 for s in scores)
    assert scores == pytest.approx(direct.scores(images, text))  # the pulled folder is the same model
    assert scores[0] != pytest.approx(scores[1])  # and it looks at the image
    assert pulled.tokenizer.tokenize("astronaut") == ["astronaut</w>"]  # vocab.json + merges.txt were read


# --- refused input ------------------------------------------------------------------------------------------


@pytest.fixture
def private_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    return temp_dir


def test_a_folder_with_three_photos_is_refused_with_what_to_do(
    tmp_path: Path, tiny_preset_dir: Path, private_temp: Path
) -> None:
    people = tmp_path / "people"
    write_folder(people, "a", [astronaut(n) for n in range(4)])
    short = write_folder(people, "b", [upside_down(n) for n in range(3)])
    config = write_config(tmp_path, tiny_preset_dir.parent)
    code, stdout, stderr = run_cli(["eval", str(people), "--config", str(config), "--json"])
    assert code == 2
    assert f"{short} has 3 photo(s); eval needs at least 4 per person" in stderr
    assert "add photos" in stderr
    assert stdout == "" and list(private_temp.iterdir()) == []


@pytest.mark.parametrize(
    ("methods", "message"),
    [("lora,gan", "unknown method(s) 'gan'; --methods takes a comma-separated list of preview, lora, ti, dreambooth"),
     (",", "unknown method(s) (none given)")],
)
def test_an_unknown_method_is_refused_before_anything_loads(
    tmp_path: Path, tiny_preset_dir: Path, private_temp: Path, methods: str, message: str
) -> None:
    people = tmp_path / "people"
    write_folder(people, "a", [astronaut(n) for n in range(4)])
    config = write_config(tmp_path, tiny_preset_dir.parent)
    code, stdout, stderr = run_cli(["eval", str(people), "--config", str(config), "--methods", methods])
    assert (code, stdout) == (2, "")
    assert message in stderr


def test_a_missing_or_empty_folder_is_refused(tmp_path: Path, tiny_preset_dir: Path, private_temp: Path) -> None:
    config = write_config(tmp_path, tiny_preset_dir.parent)
    code, stdout, stderr = run_cli(["eval", str(tmp_path / "nowhere"), "--config", str(config)])
    assert (code, stdout) == (2, "")
    assert "is not a folder; give a folder with one sub-folder of photos per person" in stderr
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = run_cli(["eval", str(tmp_path / "empty"), "--config", str(config)])
    assert (code, stdout) == (2, "")
    assert "has no sub-folders" in stderr


def test_a_photo_without_a_face_is_named_and_nothing_is_left(
    tmp_path: Path, tiny_preset_dir: Path, private_temp: Path
) -> None:
    people = tmp_path / "people"
    write_folder(people, "a", [astronaut(n) for n in range(4)])
    folder = write_folder(people, "b", [upside_down(0), faceless_photo(), upside_down(2), upside_down(3)])
    config = write_config(tmp_path, tiny_preset_dir.parent)
    code, stdout, stderr = run_cli(["eval", str(people), "--config", str(config), "--preset", "tiny", "--json"])
    assert (code, stdout) == (2, "")
    assert f"{folder / 'photo-1.jpg'}: no face was found: use a photo where the person's face" in stderr
    assert list(private_temp.iterdir()) == []  # the blobs of folder "a", already enrolled, went with it
    assert not (tmp_path / "data").exists()


def test_on_an_sd15_preset_the_preview_row_is_null_with_its_reason(
    tmp_path: Path, tiny_sd15_preset_dir: Path, private_temp: Path
) -> None:
    people = tmp_path / "people"
    write_folder(people, "a", [astronaut(n) for n in range(4)])
    config = write_config(tmp_path, tiny_sd15_preset_dir.parent)
    code, stdout, stderr = run_cli(
        ["eval", str(people), "--config", str(config), "--preset", "tiny-sd15", "--methods", "preview", "--json"]
    )
    assert code == 0, stderr[-2000:]
    (row,) = json.loads(stdout.strip().splitlines()[-1])["rows"]
    assert row["available"] is False and row["images"] == 0
    assert row["reason"] == "the tiny-sd15 preset has no zero-shot preview: InstantID exists for SDXL only"
    assert row["similarity_held_out"] is None and row["clip_score"] is None
    assert "preview: the tiny-sd15 preset has no zero-shot preview" in stdout  # the table's note
