"""Resumable training checkpoints, kept in the blob store that every worker shares.

A checkpoint is one content-addressed blob (``{owner}/checkpoints/<sha256>.pt``): a ``torch.save`` of
plain containers and tensors only, read back with ``weights_only=True`` so that loading one can never
run code. It holds everything a run needs to continue bit for bit: the trainable tensors, the optimizer
state, the run's RNG state, the losses so far and the step reached.

Content-addressed keys cannot be found by name, so each job has a pointer, a named reference of the
blob store (`set_ref`) replaced atomically, naming its newest checkpoint. It goes with the owner's
blobs when a user is erased, and only the newest checkpoint is kept: a new one is written before the
old one is deleted. Checkpoints are written and read as files, never whole in memory: a DreamBooth
SDXL checkpoint with its optimizer state is tens of GB.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from engine.errors import EngineError
from storage.blobs import BlobStore
from storage.errors import BlobNotFound

_log = logging.getLogger(__name__)

CHECKPOINT_KIND = "checkpoints"
"""The blob kind (folder) of checkpoints and of their per-job pointer files."""

_FORMAT = 1
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # it becomes a file name


class CheckpointError(EngineError):
    """A checkpoint that cannot be used for this run (wrong job, other model, unknown format)."""


class Resumable(Protocol):
    """What a run's state must offer to be checkpointed and resumed: all this module touches of it.

    LoRA's and DreamBooth's ``TrainingState`` (``engine.train.stages``) and Textual Inversion's
    ``TiTrainingState`` (``engine.train.ti``) have it. ``step`` and ``losses`` are written back on
    resume; the optimizer and the generator are restored in place.
    """

    step: int
    losses: list[float]

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def generator(self) -> torch.Generator: ...

    def modules(self) -> Mapping[str, torch.nn.Module]:
        """Every module with weights that train, by a stable name (the checkpoint's key prefixes)."""
        ...


ResumableT = TypeVar("ResumableT", bound=Resumable)


@dataclass(frozen=True)
class Checkpoint:
    """One saved moment of a run: after ``step`` steps, with the state needed to continue exactly."""

    step: int
    trainable_state: dict[str, torch.Tensor]  # "<module>.<parameter name>" → tensor
    optimizer_state: dict[str, Any]  # torch.optim.Optimizer.state_dict()
    rng_state: torch.Tensor  # torch.Generator.get_state()
    losses: list[float]


class CheckpointStore:
    """The checkpoints of one training job (``job_id``) of one blob owner."""

    def __init__(self, blobs: BlobStore, owner: str, job_id: str) -> None:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise CheckpointError(f"job id {job_id!r} must be 1-64 letters, digits, '_' or '-'")
        self._blobs = blobs
        self._owner = owner
        self._job_id = job_id

    def save(
        self,
        step: int,
        trainable_state: Mapping[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        rng_state: torch.Tensor,
        losses: list[float],
    ) -> str:
        """Store a checkpoint, make it the job's newest, delete the older one; returns its key."""
        payload = {
            "format": _FORMAT,
            "job_id": self._job_id,  # part of the content, so two jobs never share a key
            "step": step,
            "trainable": {name: t.detach().to("cpu") for name, t in trainable_state.items()},
            "optimizer": optimizer_state,
            "rng": rng_state.to("cpu"),
            "losses": list(losses),
        }
        key = self._blobs.put_written(
            self._owner, CHECKPOINT_KIND, ".pt", lambda file: torch.save(payload, file)
        )
        stale = [k for k in self._pointed_keys() if k != key]
        # Pointer first, with the old keys still listed: a crash before the deletes leaves them findable.
        self._write_pointer({"key": key, "step": step, "stale": stale})
        for old in stale:
            self._blobs.delete(old)
        if stale:
            self._write_pointer({"key": key, "step": step, "stale": []})
        _log.info("checkpoint of job %s at step %d: %s", self._job_id, step, key)
        return key

    def load_latest(self) -> Checkpoint | None:
        """The job's newest checkpoint, or None when there is none (or its blob has gone)."""
        pointer = self._read_pointer()
        if pointer is None:
            return None
        try:
            path = self._blobs.path(pointer["key"])
        except BlobNotFound:
            _log.warning("checkpoint pointer of job %s names a missing blob; starting over", self._job_id)
            return None
        return self._decode(path)

    def clear(self) -> None:
        """Delete every checkpoint of the job and its pointer (after the trained model is stored)."""
        for key in self._pointed_keys():
            self._blobs.delete(key)
        self._blobs.delete_ref(self._owner, CHECKPOINT_KIND, self._job_id)

    def _decode(self, path: Path) -> Checkpoint:
        # mmap: tensors are paged in from the file as they are copied into the model.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if payload.get("format") != _FORMAT or payload.get("job_id") != self._job_id:
            raise CheckpointError(f"the newest checkpoint of job {self._job_id} is not one this version wrote")
        return Checkpoint(
            step=int(payload["step"]),
            trainable_state=dict(payload["trainable"]),
            optimizer_state=payload["optimizer"],
            rng_state=payload["rng"],
            losses=[float(x) for x in payload["losses"]],
        )

    def _pointed_keys(self) -> list[str]:
        pointer = self._read_pointer()
        return [] if pointer is None else [pointer["key"], *pointer.get("stale", [])]

    def _read_pointer(self) -> dict[str, Any] | None:
        return self._blobs.get_ref(self._owner, CHECKPOINT_KIND, self._job_id)

    def _write_pointer(self, pointer: dict[str, Any]) -> None:
        self._blobs.set_ref(self._owner, CHECKPOINT_KIND, self._job_id, pointer)


# --- the bridge to a training loop ------------------------------------------------------------------


def trainable_tensors(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter that trains (``requires_grad``), named ``"<module>.<parameter>"``."""
    return {
        f"{prefix}.{name}": param.detach()
        for prefix, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def capture(state: Resumable, modules: Mapping[str, torch.nn.Module] | None = None) -> Checkpoint:
    """A checkpoint of ``state``; ``modules`` are what trains (default: ``state.modules()``)."""
    return Checkpoint(
        step=state.step,
        trainable_state=trainable_tensors(modules or state.modules()),
        optimizer_state=state.optimizer.state_dict(),
        rng_state=state.generator.get_state(),
        losses=list(state.losses),
    )


@torch.no_grad()
def restore(
    state: Resumable, checkpoint: Checkpoint, modules: Mapping[str, torch.nn.Module] | None = None
) -> None:
    """Put ``checkpoint`` into a freshly started ``state`` (same model, same optimizer set-up)."""
    params = trainable_tensors(modules or state.modules())
    saved = checkpoint.trainable_state
    if params.keys() != saved.keys() or any(saved[n].shape != t.shape for n, t in params.items()):
        raise CheckpointError("the checkpoint was written for a different set of trainable weights")
    state.optimizer.load_state_dict(checkpoint.optimizer_state)  # checks its groups before changing anything
    for name, target in params.items():
        target.copy_(saved[name])
    state.generator.set_state(checkpoint.rng_state)
    state.step = checkpoint.step
    state.losses = list(checkpoint.losses)


@dataclass(frozen=True)
class Checkpointing:
    """When and where a training loop checkpoints: every ``every`` steps, into ``store``."""

    store: CheckpointStore
    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise CheckpointError(f"checkpoints must be at least 1 step apart, got {self.every}")

    def resume(self, state: ResumableT, modules: Mapping[str, torch.nn.Module] | None = None) -> ResumableT:
        """Restore the job's newest checkpoint into the fresh ``state``, if there is a usable one."""
        try:
            checkpoint = self.store.load_latest()
            if checkpoint is None:
                return state
            restore(state, checkpoint, modules)
        except (CheckpointError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as e:
            _log.warning("ignoring a checkpoint that does not fit this run (%s); starting over", e)
            self.store.clear()
            return state
        _log.info("resuming from step %d", state.step)
        return state

    def after_step(
        self, state: Resumable, total: int, modules: Mapping[str, torch.nn.Module] | None = None
    ) -> None:
        """Save a checkpoint when ``state.step`` is a multiple of ``every`` (not at the last step)."""
        if state.step % self.every == 0 and state.step < total:
            checkpoint = capture(state, modules)
            self.store.save(
                checkpoint.step,
                checkpoint.trainable_state,
                checkpoint.optimizer_state,
                checkpoint.rng_state,
                checkpoint.losses,
            )
