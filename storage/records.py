"""The rows of the chat side's database as frozen dataclasses, and the values their columns allow.

`storage.db.Database` returns these; their fields are the tables' columns, in order, so that a
query's SELECT list is built from the dataclass (see `storage.db`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class PhotoStatus(enum.StrEnum):
    PENDING = "pending"  # stored, its face check not finished
    ACCEPTED = "accepted"
    REFUSED = "refused"  # the row keeps its reason; the bytes are gone


PHOTO_STATUSES = tuple(PhotoStatus)
APPARENT_GENDERS = ("female", "male")  # engine.api.ApparentGender's values
ERASED_PREFIX = "erased:"
"""The ``platform_user_id`` of an erased user's tombstone row, before its id."""

class JobState(enum.StrEnum):
    QUEUED = "queued"  # submitted; no worker holds it now
    RUNNING = "running"  # a worker holds its lease
    DONE = "done"
    FAILED = "failed"


JOB_STATES = tuple(JobState)
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class User:
    """A person on one chat platform."""

    id: int
    platform: str
    platform_user_id: str
    created_at: float


@dataclass(frozen=True)
class Photo:
    """An uploaded selfie and the result of its face check."""

    id: int
    user_id: int
    blob_key: str
    sha256: str
    status: str
    refusal: str | None
    embedding_key: str | None
    crop_key: str | None
    created_at: float
    updated_at: float
    # What the face check read of the face (for the class word); erased with the row by /forget.
    apparent_gender: str | None = None


@dataclass(frozen=True)
class Job:
    """A unit of engine work; its arq job id is ``f"{kind}-{id}"``."""

    id: int
    user_id: int
    kind: str
    queue: str
    state: str
    attempts: int
    progress: float
    message: str | None
    error: str | None
    payload: dict[str, Any] | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class PersonalModel:
    """A trained personal model (LoRA, textual inversion, ...); versions count up per user."""

    id: int
    user_id: int
    method: str
    version: int
    base_preset: str
    blob_key: str
    token: str
    class_word: str
    job_id: int | None
    created_at: float


@dataclass(frozen=True)
class Erasure:
    """A /forget whose rows are erased and whose files and queue entries are being removed."""

    user_id: int
    platform: str
    platform_user_id: str
    job_ids: list[str]
    requested_at: float


@dataclass(frozen=True)
class GeneratedImage:
    """An image rendered for a user."""

    id: int
    user_id: int
    job_id: int | None
    model_id: int | None
    blob_key: str
    prompt: str
    seed: int
    score: float | None
    created_at: float
