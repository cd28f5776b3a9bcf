"""A preview takes its pose from the most frontal, largest enrolled face, whichever photo came first.

The worker reads real face records (from ``do_check_photo`` on a real photo, then given other keypoints
and boxes, as a turned or a distant face would have); IdentityNet's keypoint image shows which pose won.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.api import CheckPhotoRequest, PreviewRequest
from engine.faces.analyzer import FaceRecord
from engine.pipelines.instantid import frontalness
from engine.settings import EngineSettings
from engine.worker import WorkerContext, do_check_photo, do_preview
from tests.support import face_photo

pytestmark = pytest.mark.slow
OWNER = "u1"


@pytest.fixture(scope="module")
def app_and_face(
    tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerContext, FaceRecord]]:
    settings = EngineSettings(preset="tiny", models_dir=tiny_preset_dir.parent, preview_steps=1,
                              blobs_dir=tmp_path_factory.mktemp("blobs"), redis_url="redis://unused")
    app = WorkerContext.load(settings)
    photo = app.blobs.put(OWNER, "photos", face_photo(0), ".jpg")
    checked = do_check_photo(app, CheckPhotoRequest("check-0", OWNER, photo, []))
    assert checked.accepted and checked.embedding_key, checked
    yield app, FaceRecord.from_bytes(app.blobs.get(checked.embedding_key))


def _turned(face: FaceRecord) -> FaceRecord:
    """The same face turned aside: the nose past the left eye, as in a profile."""
    kps = face.kps.copy()
    eye_distance = float(kps[1, 0] - kps[0, 0])
    kps[2, 0] = kps[1, 0] + 0.3 * eye_distance
    return dataclasses.replace(face, kps=kps)


def _distant(face: FaceRecord) -> FaceRecord:
    """The same face a third the size in its photo, in the top-left corner."""
    return dataclasses.replace(face, kps=face.kps / 3, bbox=face.bbox / 3)


def _keypoint_image(app: WorkerContext, faces: list[FaceRecord]) -> torch.Tensor:
    """What IdentityNet is shown during a preview of ``faces``, enrolled in this order."""
    keys = [app.blobs.put(OWNER, "faces", face.to_bytes(), ".json") for face in faces]
    assert app.base.instantid is not None
    seen: list[torch.Tensor] = []

    def record(_module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["controlnet_cond"].detach().clone())

    handle = app.base.instantid.controlnet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        do_preview(app, PreviewRequest("preview-pose", OWNER, keys, "a portrait of me", seed=1, num_images=1))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("worse", [_turned, _distant], ids=["turned", "distant"])
def test_the_pose_comes_from_the_frontal_large_face_not_the_first_photo(
    app_and_face: tuple[WorkerContext, FaceRecord], worse: Any
) -> None:
    app, face = app_and_face
    other = worse(face)
    assert frontalness(face.kps) > 0.5  # the photo's own face is a frontal one

    worse_first = _keypoint_image(app, [other, face])

    assert torch.equal(worse_first, _keypoint_image(app, [face, face]))
    assert not torch.equal(worse_first, _keypoint_image(app, [other, other]))
