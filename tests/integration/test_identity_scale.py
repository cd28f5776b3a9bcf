"""What reaches InstantID's image projection has the raw recognizer's scale, as InstantID was trained.

InstantID's Resampler takes insightface's unnormalised ``embedding`` (norm ≈ 22 for antelopev2); its
first layer adds a bias before a LayerNorm, so a unit vector would let the bias — the same for every
user — dominate the identity tokens. These tests watch the projection's input during a real
``/preview`` and a ``--boost`` draw in a loaded worker, and check that the tiny models can tell.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.api import CheckPhotoRequest, PreviewRequest
from engine.faces.analyzer import FaceRecord, identity_embedding, mean_embedding
from engine.settings import EngineSettings
from engine.worker import WorkerContext, do_check_photo, do_preview
from tests.support import face_photo

pytestmark = pytest.mark.slow
OWNER = "u1"


@pytest.fixture(scope="module")
def enrolled(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerContext, list[str]]]:
    settings = EngineSettings(preset="tiny", models_dir=tiny_preset_dir.parent,
                              blobs_dir=tmp_path_factory.mktemp("blobs"), redis_url="redis://unused")
    app = WorkerContext.load(settings)
    faces: list[str] = []
    for n in range(3):
        photo = app.blobs.put(OWNER, "photos", face_photo(n), ".jpg")
        checked = do_check_photo(app, CheckPhotoRequest(f"check-{n}", OWNER, photo, faces))
        assert checked.accepted and checked.embedding_key, checked
        faces.append(checked.embedding_key)
    yield app, faces


def _projection_inputs(app: WorkerContext) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    assert app.base.identity is not None
    seen: list[torch.Tensor] = []
    handle = app.base.identity.projection.register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].detach().clone())
    )
    return seen, handle


def test_the_preview_feeds_the_projection_the_mean_raw_embedding(enrolled: tuple[WorkerContext, list[str]]) -> None:
    app, faces = enrolled
    records = [FaceRecord.from_bytes(app.blobs.get(key)) for key in faces]
    assert all(r.norm is not None and r.norm > 5 for r in records), [r.norm for r in records]
    seen, handle = _projection_inputs(app)
    try:
        do_preview(app, PreviewRequest("preview-scale", OWNER, faces, "a portrait of me", seed=1, num_images=1))
    finally:
        handle.remove()
    assert seen, "the preview never reached the identity projection"
    faces_in = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).float()
    norms = faces_in.norm(dim=-1)
    person = faces_in[norms > 0]  # the unconditional half is a zero embedding
    expected = torch.from_numpy(identity_embedding(records))
    assert float(person.norm(dim=-1).min()) > 5.0, "a unit-length embedding reached InstantID's Resampler"
    # The same vector, moved from numpy to torch: only dtype round-off may differ.
    torch.testing.assert_close(person, expected.expand_as(person), rtol=1e-5, atol=1e-5)


def test_the_identity_embedding_is_the_mean_of_raw_vectors_and_rank_cosines_stay_unit(
    enrolled: tuple[WorkerContext, list[str]],
) -> None:
    app, faces = enrolled
    records = [FaceRecord.from_bytes(app.blobs.get(key)) for key in faces]
    raw = np.mean([r.raw_embedding for r in records], axis=0)
    np.testing.assert_allclose(identity_embedding(records), raw, rtol=1e-5, atol=1e-6)
    assert abs(float(np.linalg.norm(mean_embedding(records))) - 1.0) < 1e-5
    # A record written before the norm was kept borrows the others' mean norm.
    legacy = [dataclasses.replace(records[0], norm=None), *records[1:]]
    borrowed = np.mean([float(r.norm) for r in records[1:]])  # type: ignore[arg-type]
    np.testing.assert_allclose(identity_embedding(legacy)[:4],
                               np.mean([records[0].embedding * borrowed] + [r.raw_embedding for r in records[1:]],
                                       axis=0)[:4], rtol=1e-5, atol=1e-6)


def test_the_tiny_resampler_can_tell_a_unit_vector_from_a_raw_one(enrolled: tuple[WorkerContext, list[str]]) -> None:
    """The tiny preset must carry the trait that makes the defect visible: a zero proj_in bias would
    make the Resampler scale-invariant, and the test above could not fail."""
    app, faces = enrolled
    identity = app.base.identity
    assert identity is not None
    assert float(identity.projection.proj_in.bias.detach().abs().mean()) > 0.1
    records = [FaceRecord.from_bytes(app.blobs.get(key)) for key in faces]
    mine = torch.from_numpy(identity_embedding(records))
    other = torch.from_numpy(np.random.default_rng(0).normal(size=mine.shape[0]).astype(np.float32))
    other = other / other.norm() * mine.norm()  # someone else, at the same raw scale

    def separation(scale: float) -> float:
        with torch.no_grad():
            a, b = identity.project(torch.stack([mine, other]) * scale)
        return float((a - b).norm() / a.norm())

    raw, unit = separation(1.0), separation(1.0 / float(mine.norm()))
    assert raw > 3 * unit, f"two people's identity tokens differ by {raw:.3f} raw and {unit:.3f} unit-length"
