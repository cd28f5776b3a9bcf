"""Which draws a worker leaves on the queue for another (engine.residency), and /forget of the models a
worker holds in memory: real tiny renderers with real LoRAs loaded, their entries published to a real
Valkey, real arq jobs on the queue."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from arq.connections import ArqRedis
from PIL import Image

from engine.api import CACHED_KEY_PREFIX, QUEUE_INTERACTIVE, RESIDENT_KEY_PREFIX, DrawRequest, JobName, erased_key
from engine.erasure import sweep_once
from engine.render.renderer import AdapterRef, Renderer
from engine.residency import OwnersInMemory, Residency, adapter_id, held_models, model_id
from engine.train.lora import LoraTrainSettings, train_lora
from engine.worker import connect_redis
from storage.blobs import LocalBlobStore
from tests.support import load_tiny_sdxl

SIZE = 64
Room = dict[str, bool]


@pytest.fixture(scope="module")
def loras(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two users' tiny LoRAs, as blob keys (content-addressed) → files in a blob folder."""
    pipe, folder = load_tiny_sdxl(tiny_preset_dir), tmp_path_factory.mktemp("blobs")
    keys = {}
    for user, seed in (("u1", 1), ("u2", 2)):
        crops = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))]
        settings = LoraTrainSettings(steps=2, rank=4, alpha=4, resolution=SIZE, seed=seed)
        weights = train_lora(pipe, threading.Lock(), crops, "sks", "person", settings).weights
        key = f"{user}/models/{hashlib.sha256(weights).hexdigest()}.safetensors"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(weights)
        keys[user] = str(folder / key)
    return keys


def holding(renderer: Renderer, path: str) -> Renderer:
    """``renderer`` after a draw with the LoRA at ``path`` (so it holds it, as after a user's draw)."""
    renderer.draw("sks person", adapter=AdapterRef(adapter_id(path), Path(path)), size=(SIZE, SIZE), steps=1)
    return renderer


@pytest.fixture
async def redis(valkey_url: str) -> AsyncIterator[ArqRedis]:
    pool = await connect_redis(valkey_url)
    yield pool
    await pool.aclose()


async def queued_draw(redis: ArqRedis, number: int, adapter_key: str | None, method: str | None = "lora") -> str:
    job_id = f"{JobName.DRAW}-{number}"
    request = DrawRequest(job_id=job_id, owner="u1", prompt="me", embedding_keys=[], adapter_key=adapter_key,
                          method=method if adapter_key else None, token="sks", class_word="person")
    await redis.enqueue_job(str(JobName.DRAW), request.to_dict(), _job_id=job_id, _queue_name=QUEUE_INTERACTIVE)
    return job_id


async def test_a_draw_waits_for_the_live_worker_with_room_that_holds_its_lora(
    tiny_preset_dir: Path, loras: dict[str, str], redis: ArqRedis
) -> None:
    pipe = load_tiny_sdxl(tiny_preset_dir)
    peer_room: Room = {"now": True}
    peer = Residency(holding(Renderer(pipe, threading.Lock(), max_adapters=1), loras["u1"]), redis, 5.0,
                     lambda: peer_room["now"], name="host-b:1")
    mine = Residency(Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), max_adapters=1), redis, 5.0,
                     lambda: True, name="host-a:1")
    await peer.publish()
    entry = json.loads(await redis.get(f"{RESIDENT_KEY_PREFIX}host-b:1"))
    assert entry == {"models": [model_id(loras["u1"])], "free": 0, "room": True}

    job = await queued_draw(redis, 1, "u1/models/" + Path(loras["u1"]).name)
    assert await mine.leave_for_another(job)
    # Not for a learned word (kilobytes), a draw without a model, or a job that is not a draw.
    assert not await mine.leave_for_another(await queued_draw(redis, 2, "u1/models/" + Path(loras["u1"]).name, "ti"))
    assert not await mine.leave_for_another(await queued_draw(redis, 3, None))
    assert not await mine.leave_for_another("check_photo-4")

    peer_room["now"] = False  # its job slots are full: the draw should not wait behind them
    await peer.publish()
    await asyncio.sleep(0.3)  # past the reuse of the last read of the peers
    assert not await mine.leave_for_another(job)

    peer_room["now"] = True
    await peer.publish()
    await asyncio.sleep(0.3)
    assert await mine.leave_for_another(job)
    await redis.delete(peer.key)  # the holder died: its entry lapsed
    await asyncio.sleep(0.3)
    assert not await mine.leave_for_another(job)


async def test_the_holder_takes_its_draw_and_a_free_slot_is_preferred_for_a_new_lora(
    tiny_preset_dir: Path, loras: dict[str, str], redis: ArqRedis
) -> None:
    renderer = holding(Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), max_adapters=1), loras["u1"])
    full = Residency(renderer, redis, 5.0, lambda: True, name="host-a:1")
    empty = Residency(Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), max_adapters=1), redis, 5.0,
                      lambda: True, name="host-b:1")
    assert held_models(renderer) == {model_id(loras["u1"])}
    await full.publish()
    await empty.publish()
    own = await queued_draw(redis, 1, "u1/models/" + Path(loras["u1"]).name)
    assert not await full.leave_for_another(own)  # it holds the LoRA
    assert await empty.leave_for_another(own)

    # Nobody holds u2's LoRA: the worker with no free slot leaves it to the one with a free slot,
    # which takes it; and once the wait is over, anyone takes it.
    new = await queued_draw(redis, 2, "u2/models/" + Path(loras["u2"]).name)
    assert await full.leave_for_another(new)
    assert not await empty.leave_for_another(new)
    impatient = Residency(renderer, redis, 0.2, lambda: True, name="host-c:1")
    await asyncio.sleep(0.3)
    assert not await impatient.leave_for_another(new)


async def test_forget_drops_an_erased_owners_loras_from_a_workers_memory_before_it_says_done(
    tiny_preset_dir: Path, loras: dict[str, str], redis: ArqRedis, tmp_path: Path
) -> None:
    """/forget's worker side (engine.erasure.sweep_once): the owners a worker lists include those whose
    models it holds loaded; an erased owner's LoRA is unloaded, and only then is the owner unlisted."""
    renderer = Renderer(load_tiny_sdxl(tiny_preset_dir), threading.Lock(), max_adapters=2)
    memory = OwnersInMemory(renderer)
    for owner in ("u1", "u2"):
        holding(renderer, loras[owner])
        memory.note(owner, f"{owner}/models/{Path(loras[owner]).name}",
                    AdapterRef(adapter_id(loras[owner]), Path(loras[owner])))
    blobs, key = LocalBlobStore(tmp_path / "blobs"), f"{CACHED_KEY_PREFIX}host-a:1"
    assert await sweep_once(blobs, redis, key, memory) == ["u1", "u2"]
    assert json.loads(await redis.get(key)) == ["u1", "u2"]  # what the chat side's /forget waits on

    await redis.set(erased_key("u1"), "1")
    assert await sweep_once(blobs, redis, key, memory) == ["u2"]
    assert renderer.loaded_adapters == [adapter_id(loras["u2"])]
    assert held_models(renderer) == {model_id(loras["u2"])}
    renderer.forget(adapter_id(loras["u2"]))  # evicted by the renderer: no longer anyone's in memory
    assert await sweep_once(blobs, redis, key, memory) == []
