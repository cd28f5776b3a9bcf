"""Best checkpoint by likeness: judged drawings, the best weights kept, and the face judge itself."""

from __future__ import annotations

import io
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load

from engine.faces.analyzer import FaceAnalyzer
from engine.train.likeness import LIKENESS_PROMPTS, judge_by_faces
from engine.presets import load_preset
from engine.train.dreambooth import DreamBoothSettings, train_dreambooth
from engine.train.lora import LoraTrainSettings, train_lora
from tests.support import face_photo, group_photo, noise_crops

pytestmark = pytest.mark.slow

SIZE = 64
SETTINGS = LoraTrainSettings(
    steps=6, rank=2, alpha=2, learning_rate=5e-2, resolution=SIZE, checkpoint_every=2, likeness_steps=1
)


@pytest.fixture(scope="module")
def pipe(tiny_preset_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ScriptedJudge:
    """Scores judged drawings from a script, in call order, and keeps what it was shown."""

    def __init__(self, scores: list[float | None]) -> None:
        self.scores = list(scores)
        self.seen: list[list[np.ndarray]] = []

    def __call__(self, images: list[Image.Image]) -> float | None:
        self.seen.append([np.asarray(image) for image in images])
        return self.scores.pop(0)


def lora(pipe: StableDiffusionXLPipeline, settings: LoraTrainSettings = SETTINGS, judge: ScriptedJudge | None = None) -> dict[str, torch.Tensor]:
    return load(train_lora(pipe, threading.Lock(), noise_crops(), "sks", "person", settings, likeness=judge).weights)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_weights_judged_best_are_kept_not_the_last(pipe: StableDiffusionXLPipeline) -> None:
    unet_before = {k: t.clone() for k, t in pipe.unet.state_dict().items()}
    judge = ScriptedJudge([0.2, 0.9, 0.5])  # steps 2, 4 and 6
    kept = lora(pipe, judge=judge)
    # The same computation repeated: a run that stops at step 4 saves bit-identical weights.
    assert same(kept, lora(pipe, replace(SETTINGS, steps=4)))
    assert not same(kept, lora(pipe))
    assert [len(images) for images in judge.seen] == [len(LIKENESS_PROMPTS)] * 3
    assert not np.array_equal(judge.seen[0][0], judge.seen[1][0])  # drawn with the weights as they trained
    assert all(torch.equal(t, unet_before[k]) for k, t in pipe.unet.state_dict().items())  # resident untouched


def test_without_a_face_to_judge_the_last_weights_stay(pipe: StableDiffusionXLPipeline) -> None:
    assert same(lora(pipe, judge=ScriptedJudge([None, None, None])), lora(pipe))
    assert same(lora(pipe, judge=ScriptedJudge([0.1, None, 0.4])), lora(pipe))  # the last was best


def test_dreambooth_keeps_its_best_weights_too(pipe: StableDiffusionXLPipeline) -> None:
    settings = DreamBoothSettings(steps=4, learning_rate=1e-3, resolution=SIZE, prior_loss_weight=0.0,
                                  gradient_checkpointing=False, checkpoint_every=2, likeness_steps=1)

    def unet(settings: DreamBoothSettings, judge: ScriptedJudge | None = None) -> dict[str, torch.Tensor]:
        outcome = train_dreambooth(pipe, threading.Lock(), noise_crops(), "sks", "person", [], settings, likeness=judge)
        return load(outcome.weights)

    assert same(unet(settings, ScriptedJudge([0.9, 0.3])), unet(replace(settings, steps=2)))


# --- the worker's judge: ArcFace on the real (tiny) face models -----------------------------------


def test_the_face_judge_scores_the_users_face_above_another_and_nothing_without_a_face(
    tiny_preset_dir: Path,
) -> None:
    preset = load_preset("tiny", tiny_preset_dir.parent)
    faces = FaceAnalyzer(preset.face_models_dir, preset.face_checks)
    checks = [faces.check(face_photo(n), []) for n in range(3)]
    crops = [c.crop for c in checks if c.crop is not None]
    assert len(crops) == 3
    judge = judge_by_faces(faces, crops)
    own = judge(crops)
    others = [Image.open(io.BytesIO(group_photo())).convert("RGB")]
    other = judge(others)
    assert own is not None and other is not None and own > other
    assert own > 0.9  # the crops' faces against their own mean
    assert judge(noise_crops(2, size=128)) is None
    assert judge_by_faces(faces, noise_crops(2, size=128))(crops) is None  # nothing to compare against


def test_the_worker_judges_with_the_users_crops_when_switched_on(
    tiny_preset_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from engine.api import CheckPhotoRequest, TrainingMethod, TrainRequest
    from engine.settings import EngineSettings
    from engine.worker import WorkerContext, do_check_photo, do_train

    settings = EngineSettings(preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=tmp_path / "blobs",
                              redis_url="redis://unused", device="cpu", train_steps=2, keep_best_by_likeness=True)
    app = WorkerContext.load(settings)
    crops = []
    for n in range(3):
        photo = app.blobs.put("u1", "photos", face_photo(n), ".jpg")
        crops.append(do_check_photo(app, CheckPhotoRequest(f"c{n}", "u1", photo, [])).crop_key)
    caplog.set_level(logging.INFO, logger="engine.train.likeness")
    do_train(app, TrainRequest("t1", "u1", TrainingMethod.LORA, crops, "sks", "person", steps=2))
    assert any(r.getMessage().startswith("likeness: ") for r in caplog.records)


def test_textual_inversion_keeps_its_best_word_too(pipe: StableDiffusionXLPipeline) -> None:
    from engine.train.ti import TiTrainSettings, train_textual_inversion

    settings = TiTrainSettings(steps=4, resolution=SIZE, checkpoint_every=2, likeness_steps=1)

    def word(settings: TiTrainSettings, judge: ScriptedJudge | None = None) -> dict[str, torch.Tensor]:
        outcome = train_textual_inversion(pipe, threading.Lock(), noise_crops(), "<u9>", "person", settings,
                                          likeness=judge)
        return load(outcome.weights)

    judge = ScriptedJudge([0.8, 0.1])
    assert same(word(settings, judge), word(replace(settings, steps=2)))
    assert not same(word(settings), word(replace(settings, steps=2)))
