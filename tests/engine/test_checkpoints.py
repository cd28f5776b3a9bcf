"""Training checkpoints in a real LocalBlobStore: round trip, newest wins, clear, and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.train.checkpoints import (
    Checkpoint,
    CheckpointError,
    Checkpointing,
    CheckpointStore,
    capture,
    restore,
)
from engine.train.stages import TrainingState
from storage.blobs import LocalBlobStore

OWNER = "u7"


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def toy_state(seed: int = 0) -> TrainingState:
    """A small model trained like the real loops: AdamW, a seeded CPU generator drawing the batches."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model[0].bias.requires_grad_(False)  # a frozen weight, left out of checkpoints
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    return TrainingState(unet=model, optimizer=optimizer, generator=generator)  # type: ignore[arg-type]


def toy_step(state: TrainingState) -> None:
    x = torch.randn(3, 4, generator=state.generator)
    loss = state.unet(x).pow(2).mean()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.losses.append(float(loss.detach()))


def run(state: TrainingState, total: int, checkpointing: Checkpointing | None = None, stop_at: int = 0) -> None:
    while state.step < total:
        toy_step(state)
        if checkpointing is not None:
            checkpointing.after_step(state, total)
        if state.step == stop_at:
            raise KeyboardInterrupt  # the worker dies here


def params(state: TrainingState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.unet.state_dict().items()}


def test_round_trip_keeps_every_part(blobs: LocalBlobStore) -> None:
    state = toy_state()
    run(state, 3)
    store = CheckpointStore(blobs, OWNER, "train-1")
    saved = capture(state)

    key = store.save(saved.step, saved.trainable_state, saved.optimizer_state, saved.rng_state, saved.losses)
    loaded = store.load_latest()

    assert key.startswith(f"{OWNER}/checkpoints/") and key.endswith(".pt")
    assert isinstance(loaded, Checkpoint)
    assert loaded.step == 3 and loaded.losses == state.losses
    assert sorted(loaded.trainable_state) == ["unet.0.weight", "unet.2.bias", "unet.2.weight"]
    assert all(torch.equal(loaded.trainable_state[k], saved.trainable_state[k]) for k in saved.trainable_state)
    assert torch.equal(loaded.rng_state, state.generator.get_state())
    exp_avg = loaded.optimizer_state["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, state.optimizer.state_dict()["state"][0]["exp_avg"])


def test_newest_checkpoint_wins_and_the_older_blob_is_deleted(blobs: LocalBlobStore) -> None:
    state = toy_state()
    store = CheckpointStore(blobs, OWNER, "train-1")
    run(state, 2)
    first = store.save(**vars(capture(state)))
    run(state, 4)
    second = store.save(**vars(capture(state)))

    latest = store.load_latest()
    assert latest is not None and latest.step == 4
    assert not blobs.exists(first) and blobs.exists(second)


def test_jobs_do_not_see_each_other(blobs: LocalBlobStore) -> None:
    state = toy_state()
    run(state, 1)
    CheckpointStore(blobs, OWNER, "train-1").save(**vars(capture(state)))

    assert CheckpointStore(blobs, OWNER, "train-2").load_latest() is None
    assert CheckpointStore(blobs, "u8", "train-1").load_latest() is None


def test_clear_removes_the_checkpoint_and_its_pointer(blobs: LocalBlobStore) -> None:
    state = toy_state()
    run(state, 1)
    store = CheckpointStore(blobs, OWNER, "train-1")
    key = store.save(**vars(capture(state)))

    store.clear()

    assert store.load_latest() is None
    assert not blobs.exists(key)
    assert list((blobs.root / OWNER / "checkpoints").iterdir()) == []
    store.clear()  # clearing twice is fine (arq may run a job twice)


def test_erasing_the_owner_erases_checkpoints(blobs: LocalBlobStore) -> None:
    state = toy_state()
    run(state, 1)
    store = CheckpointStore(blobs, OWNER, "train-1")
    store.save(**vars(capture(state)))

    assert blobs.delete_owner(OWNER) == 1  # the pointer is not a blob, but goes with the folder
    assert store.load_latest() is None


def test_a_pointer_to_a_missing_blob_means_no_checkpoint(blobs: LocalBlobStore) -> None:
    state = toy_state()
    run(state, 1)
    store = CheckpointStore(blobs, OWNER, "train-1")
    blobs.delete(store.save(**vars(capture(state))))

    assert store.load_latest() is None


def test_a_killed_run_resumes_bit_exactly(blobs: LocalBlobStore) -> None:
    uninterrupted = toy_state()
    run(uninterrupted, 7)

    checkpointing = Checkpointing(CheckpointStore(blobs, OWNER, "train-1"), every=2)
    with pytest.raises(KeyboardInterrupt):
        run(checkpointing.resume(toy_state()), 7, checkpointing, stop_at=5)
    resumed = checkpointing.resume(toy_state())
    assert resumed.step == 4  # the last checkpoint, not the step it died at
    run(resumed, 7, checkpointing)

    assert resumed.losses == uninterrupted.losses
    after, expected = params(resumed), params(uninterrupted)
    assert all(torch.equal(after[k], expected[k]) for k in expected)


def test_no_checkpoint_at_the_last_step(blobs: LocalBlobStore) -> None:
    store = CheckpointStore(blobs, OWNER, "train-1")
    state = toy_state()
    run(state, 4, Checkpointing(store, every=4))
    assert store.load_latest() is None  # the finished model is the result; a checkpoint would be waste


def test_a_checkpoint_of_another_model_is_ignored_and_cleared(blobs: LocalBlobStore) -> None:
    store = CheckpointStore(blobs, OWNER, "train-1")
    other = toy_state()
    other.unet[2] = torch.nn.Linear(8, 3)
    store.save(**vars(capture(other)))

    state = Checkpointing(store, every=1).resume(toy_state())

    assert state.step == 0
    assert store.load_latest() is None


def test_restore_refuses_other_weights() -> None:
    checkpoint = capture(toy_state())
    state = toy_state()
    with pytest.raises(CheckpointError, match="different set"):
        restore(state, checkpoint, {"text_encoder": state.unet})


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", "a.b", "x" * 65])
def test_bad_job_ids_are_refused(blobs: LocalBlobStore, job_id: str) -> None:
    with pytest.raises(CheckpointError, match="job id"):
        CheckpointStore(blobs, OWNER, job_id)


def test_an_unreadable_checkpoint_is_ignored_and_cleared(blobs: LocalBlobStore) -> None:
    store = CheckpointStore(blobs, OWNER, "train-1")
    state = toy_state()
    run(state, 1)
    key = store.save(**vars(capture(state)))
    blobs.path(key).write_bytes(b"not a checkpoint")  # e.g. a disk error

    assert Checkpointing(store, every=1).resume(toy_state()).step == 0
    assert not blobs.exists(key)
