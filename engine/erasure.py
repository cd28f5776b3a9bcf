"""/forget on worker hosts: a worker's cached copies of an erased owner's blobs, and the owner's
models it holds in memory (LoRAs, DreamBooth weights), go within a second.

With an S3 blob store every worker keeps local copies of the blobs it opens as files (adapters,
checkpoints: `storage.cache`). /forget deletes the objects from the chat side, but the copies sit on
the workers' disks. So each worker sweeps its cache every second: the copies of an owner marked
erased (`engine.api.erased_key`) are removed, and the worker then publishes the owners it still
holds copies or models of under ``CACHED_KEY_PREFIX + <host>:<pid>``. The chat side finishes an erasure only
once no worker lists the owner (`bot.jobs.Jobs.wait_uncached`).

A worker that is down cannot sweep and does not publish; its copies go when it starts again, as
opening the store drops the copies of every owner with no object left (`S3BlobStore.prune_cache`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Protocol

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from engine.api import CACHED_KEY_PREFIX, erased_key
from engine.upkeep import worker_name
from storage.blobs import BlobStore

_log = logging.getLogger(__name__)

SWEEP_EVERY_S = 1.0
_CACHED_TTL_S = 10  # a dead worker's list lapses this soon after its last sweep


class HeldInMemory(Protocol):
    """Owners whose personal models a worker holds in memory (`engine.residency.OwnersInMemory`)."""

    def owners(self) -> list[str]: ...

    def forget(self, owner: str) -> int: ...


def cached_key() -> str:
    return f"{CACHED_KEY_PREFIX}{worker_name()}"


async def sweep_erased_copies(blobs: BlobStore, redis: ArqRedis, memory: HeldInMemory | None = None) -> None:
    """Run `sweep_once` every `SWEEP_EVERY_S` until cancelled; an unreachable Valkey is waited out."""
    key = cached_key()
    while True:
        try:
            await sweep_once(blobs, redis, key, memory)
        except (RedisError, OSError) as exc:
            _log.debug("cache sweep skipped: %s", type(exc).__name__)
        await asyncio.sleep(SWEEP_EVERY_S)


async def sweep_once(blobs: BlobStore, redis: ArqRedis, key: str, memory: HeldInMemory | None = None) -> list[str]:
    """Drop the cached copies (and the models in ``memory``) of every erased owner, publish the
    owners still held; returns them."""
    in_memory = set(memory.owners()) if memory is not None else set()
    owners = sorted(set(await asyncio.to_thread(blobs.cached_owners)) | in_memory)
    if owners:
        async with redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(erased_key(owner))
            marks = await pipe.execute()
        for owner, erased in zip(owners, marks):
            if erased:
                count = await asyncio.to_thread(blobs.uncache_owner, owner)
                if memory is not None and owner in in_memory:
                    count += await asyncio.to_thread(memory.forget, owner)
                _log.info("dropped %d cached copies or loaded models of the erased %s", count, owner)
        owners = [owner for owner, erased in zip(owners, marks) if not erased]
    await redis.set(key, json.dumps(owners), ex=_CACHED_TTL_S)
    return owners
