"""Routing by residency: a draw goes to a worker that already holds the user's model in memory.

All workers pull from one interactive queue (arq); nothing is routed when the job is put on it, so
the chat side stays as it is and a dead worker can never strand a job. Instead each worker:

- publishes what it holds, ``RESIDENT_KEY_PREFIX + <host>:<pid>`` → JSON ``{"models": [ids],
  "free": LoRA slots left, "room": whether it takes another job now}``, every `PUBLISH_S` with a
  short expiry (a dead worker's entry lapses in `RESIDENT_TTL_S`);
- before claiming a draw, leaves it on the queue for up to ``residency_wait_s`` after it was
  enqueued when another live worker with room holds the model and it does not; or when nobody holds
  it, it has no free slot and another worker with room has one (so users spread over the workers
  instead of evicting each other on one).

After the wait any worker takes the job, so a stale or dead holder costs at most that wait. A model
is named by the first 16 hex digits of its blob's content hash (the same for every host, whatever
its cache folder). Learned words (Textual Inversion) are kilobytes and never wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job as read_job_def
from redis.exceptions import RedisError

from engine.api import RESIDENT_KEY_PREFIX, JobName, TrainingMethod, deserialize_job
from engine.render.renderer import AdapterRef, Personalisation, Renderer, UnetWeightsRef
from engine.upkeep import worker_name

_log = logging.getLogger(__name__)

PUBLISH_S = 0.25
RESIDENT_TTL_S = 10
_PEERS_FRESH_S = 0.25  # how long one read of the other workers' entries is used
_DRAW_PREFIX = f"{JobName.DRAW}-"  # engine.api.arq_job_id
_HELD_METHODS = (TrainingMethod.LORA, TrainingMethod.DREAMBOOTH)  # a learned word is kilobytes: never waits


def model_id(blob_key: str) -> str:
    """The id of the model stored at ``blob_key``: its content hash's first 16 hex digits."""
    return blob_key.rsplit("/", 1)[-1].split(".", 1)[0][:16]


def adapter_id(blob_key: str) -> str:
    """The name a LoRA is loaded under (peft adapter names must be valid module names)."""
    return "u_" + model_id(blob_key)


def held_models(renderer: Renderer) -> set[str]:
    """The models ``renderer`` holds in memory now: LoRAs loaded or packed for the hotswap slot, and
    DreamBooth weights in its host cache."""
    loras, unets = _held(renderer)
    return loras | unets


def _held(renderer: Renderer) -> tuple[set[str], set[str]]:
    """(LoRA ids, DreamBooth ids) held. Read from the event loop while a draw's thread may change
    them: a read that meets a change is taken again."""
    for _ in range(10):
        try:
            loras = [*renderer.loaded_adapters, *renderer.hotswapped_adapters]
            unets = renderer.dreambooth_weights.paths
            break
        except RuntimeError:  # "OrderedDict mutated during iteration"
            continue
    else:
        return set(), set()
    return {name.removeprefix("u_") for name in loras}, {model_id(path.name) for path in unets}


@dataclass(frozen=True)
class _Peer:
    models: frozenset[str]
    free: int
    room: bool


class Residency:
    """One worker's side of routing by residency: what it publishes, and which draws it leaves."""

    def __init__(
        self, renderer: Renderer, redis: ArqRedis, wait_s: float, room: Callable[[], bool], name: str | None = None
    ) -> None:
        """``room``: whether this worker would start another job now; ``name``: default `worker_name()`."""
        self._renderer = renderer
        self._redis = redis
        self._wait_ms = wait_s * 1000
        self._room = room
        self.key = f"{RESIDENT_KEY_PREFIX}{name or worker_name()}"
        self._jobs: dict[str, tuple[str | None, int]] = {}  # job id → (model id, enqueued at, ms)
        self._peers: dict[str, _Peer] = {}
        self._peers_read = 0.0

    @property
    def enabled(self) -> bool:
        return self._wait_ms > 0

    def _free(self, loras: set[str]) -> int:
        """LoRA slots left (DreamBooth weights are bounded by bytes, not by these slots)."""
        return max(0, self._renderer.adapter_capacity - len(loras))

    async def publish(self) -> None:
        loras, unets = _held(self._renderer)
        entry = {"models": sorted(loras | unets), "free": self._free(loras), "room": self._room()}
        await self._redis.set(self.key, json.dumps(entry), ex=RESIDENT_TTL_S)

    async def publish_forever(self) -> None:
        while True:
            try:
                await self.publish()
            except (RedisError, OSError):
                pass  # the queue server is away: nothing is claimed meanwhile either
            await asyncio.sleep(PUBLISH_S)

    async def leave_for_another(self, job_id: str) -> bool:
        """Whether to leave the queued job ``job_id`` for another worker, this time round."""
        if not self.enabled or not job_id.startswith(_DRAW_PREFIX):
            return False
        job = self._jobs.get(job_id) or await self._read(job_id)
        if job is None:
            return False
        model, enqueued_ms = job
        if model is None or time.time() * 1000 - enqueued_ms >= self._wait_ms:
            self._jobs.pop(job_id, None)
            return False
        loras, unets = _held(self._renderer)
        if model in loras or model in unets:
            return False
        peers = [peer for peer in (await self._others()).values() if peer.room]
        if any(model in peer.models for peer in peers):
            return True
        return self._free(loras) == 0 and any(peer.free > 0 for peer in peers)

    async def _read(self, job_id: str) -> tuple[str | None, int] | None:
        try:
            raw = await self._redis.get(job_key_prefix + job_id)
        except (RedisError, OSError):
            return None
        if raw is None:
            return None
        try:
            definition = read_job_def(raw, deserializer=deserialize_job)
            payload: Any = definition.args[0] if definition.args else {}
            key = payload.get("adapter_key") if isinstance(payload, dict) else None
        except Exception:  # arq's worker reports an unreadable job itself when it runs it
            return None
        model = model_id(key) if isinstance(key, str) and payload.get("method") in _HELD_METHODS else None
        job = (model, int(definition.enqueue_time.timestamp() * 1000))
        now_ms = time.time() * 1000
        for stale in [j for j, (_, at) in self._jobs.items() if now_ms - at >= self._wait_ms]:
            del self._jobs[stale]
        self._jobs[job_id] = job
        return job

    async def _others(self) -> dict[str, _Peer]:
        if time.monotonic() - self._peers_read < _PEERS_FRESH_S:
            return self._peers
        peers: dict[str, _Peer] = {}
        try:
            keys = [k async for k in self._redis.scan_iter(match=f"{RESIDENT_KEY_PREFIX}*", count=100)]
            names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
            names = [name for name in names if name != self.key]
            for name, raw in zip(names, await self._redis.mget(names) if names else [], strict=True):
                if raw is not None:
                    entry = json.loads(raw)
                    peers[name] = _Peer(frozenset(entry["models"]), int(entry["free"]), bool(entry["room"]))
        except (RedisError, OSError, ValueError, KeyError, TypeError):
            peers = {}
        self._peers, self._peers_read = peers, time.monotonic()
        return peers


class ResidentFirstWorker(Worker):
    """arq's worker for the interactive queue, claiming draws by residency (`Residency`)."""

    residency: Residency | None = None  # set once the worker's context is loaded

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        residency = self.residency
        if residency is not None and residency.enabled:
            job_ids = [j for j in job_ids if not await residency.leave_for_another(j.decode())]
        await super().start_jobs(job_ids)

    def has_room(self) -> bool:
        return self.job_counter < self.max_jobs


class OwnersInMemory:
    """Whose personal models the renderer holds in memory, so that /forget can drop them there too
    (`engine.erasure` asks for `owners` and calls `forget`). Draws note each model they use."""

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer
        self._lock = threading.Lock()
        self._refs: dict[str, tuple[str, Personalisation]] = {}  # model id → (owner, how it is held)

    def note(self, owner: str, blob_key: str, ref: Personalisation) -> None:
        if isinstance(ref, (AdapterRef, UnetWeightsRef)):
            with self._lock:
                self._refs[model_id(blob_key)] = (owner, ref)

    def owners(self) -> list[str]:
        """The owners of models held now (those the renderer has dropped meanwhile are forgotten)."""
        held = held_models(self._renderer)
        with self._lock:
            for gone in [mid for mid in self._refs if mid not in held]:
                del self._refs[gone]
            return sorted({owner for owner, _ in self._refs.values()})

    def forget(self, owner: str) -> int:
        """Drop every model of ``owner`` from memory (waiting for a draw that uses the pipeline); returns how many."""
        with self._lock:
            refs = [ref for mid, (who, ref) in self._refs.items() if who == owner]
            self._refs = {mid: entry for mid, entry in self._refs.items() if entry[0] != owner}
        for ref in refs:
            if isinstance(ref, AdapterRef):
                self._renderer.forget(ref.adapter_id)
            elif isinstance(ref, UnetWeightsRef):
                self._renderer.forget_weights(ref.path)
        return len(refs)


class DrawCounts:
    """This process's draws with a LoRA or DreamBooth model, by whether the model was held already:
    the hit rate of routing by residency (`avatarbooth_personal_model_draws_total` on /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {True: 0, False: 0}

    def add(self, held: bool) -> None:
        with self._lock:
            self._counts[held] += 1

    def counts(self) -> tuple[int, int]:
        """(draws whose model was held, draws that had to load it)."""
        with self._lock:
            return self._counts[True], self._counts[False]


DRAWS = DrawCounts()


def log_residency(renderer: Renderer, job_id: str, blob_key: str | None, method: str | None) -> None:
    """Count and log each draw with a LoRA or DreamBooth model: was it held already?"""
    if blob_key is not None and method in _HELD_METHODS:
        held = model_id(blob_key) in held_models(renderer)
        DRAWS.add(held)
        _log.info("job %s: the personal model was %s", job_id, "resident" if held else "not resident")
