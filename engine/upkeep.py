"""What keeps a worker process in touch with the queue server, beside its jobs: arq's poll loop taken
up again after an outage, the leases of the jobs it runs, and the heartbeat that says it is ready."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

from arq import Worker
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

from engine.api import JOB_LEASE_S, WORKER_KEY_PREFIX

_log = logging.getLogger(__name__)

READY_TTL_S = 30


def worker_name() -> str:
    """``<host>:<pid>``: this worker process among all, in the keys it publishes."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def serve_queue(worker: Worker, *, burst: bool) -> None:
    """arq's poll loop, taken up again when the queue server was unreachable (a restarted Valkey):
    the jobs already running go on in their own tasks meanwhile."""
    delay = 0.5
    while True:
        try:
            await worker.main()
            return
        except (RedisError, OSError) as e:
            if burst:
                raise
            _log.warning("the queue server is unreachable (%s); trying again in %.1f s", type(e).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            delay = 0.5


async def renew_leases(running: Mapping[str, object], redis: ArqRedis) -> None:
    """Keep the in-progress key of every job in ``running`` (by job id) at `JOB_LEASE_S` (see there)."""
    while True:
        job_ids = list(running)
        if job_ids:
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.pexpire(in_progress_key_prefix + job_id, JOB_LEASE_S * 1000)
                    await pipe.execute()
            except (RedisError, OSError):
                pass  # the server is away: the leases are renewed once it is back
        await asyncio.sleep(JOB_LEASE_S / 5)


async def announce(redis: ArqRedis) -> None:
    """The heartbeat: ``WORKER_KEY_PREFIX + worker_name()``, refreshed well within its expiry."""
    key = f"{WORKER_KEY_PREFIX}{worker_name()}"
    while True:
        try:
            await redis.set(key, str(time.time()), ex=READY_TTL_S)
        except (RedisError, OSError):
            pass
        await asyncio.sleep(READY_TTL_S / 3)
