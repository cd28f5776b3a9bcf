"""Faults an operator meets, with real processes killed (SIGKILL): the worker and the embedded Valkey
mid-training, the chat process itself; and /forget while a job runs or while the blob folder cannot
be written. The chat side runs here (`serve_chat`, as `avatarbooth chat` runs it), its worker and
Valkey as the real child processes it starts and supervises.

What must hold: the user's model arrives once, no job row says "running" long after its worker
died, no child outlives its parent by more than 10 s, and an erasure leaves no byte of the user.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from avatarbooth.config import load_config
from avatarbooth.runtime import Running, serve_chat
from bot import texts
from bot.errors import ErasedMeanwhile
from bot.service import Upload, UserRef
from storage.db import Database
from tests.support import face_photo, gps_jpeg

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ALICE = UserRef("console", "alice")
PROMPT = "me as a lighthouse keeper on quokka island"  # words found nowhere else


def write_config(tmp_path: Path, models_dir: Path, *, steps: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\n'
        f"[training]\nsteps = {steps}\n"
    )
    return config


_DATABASES: dict[int, Database] = {}


@asynccontextmanager
async def chat_side(tmp_path: Path, tiny_preset_dir: Path, *, steps: int = 60) -> AsyncIterator[Running]:
    """`serve_chat` as `avatarbooth chat` runs it, and a connection of the test's own to its database."""
    config = load_config(write_config(tmp_path, tiny_preset_dir.parent, steps=steps), preset="tiny")
    async with serve_chat(config, status=io.StringIO()) as running, Database.open(config.database_path) as db:
        _DATABASES[id(running)] = db
        try:
            yield running
        finally:
            del _DATABASES[id(running)]


async def enrolled(running: Running, user: UserRef = ALICE) -> list[bytes]:
    """Consent and three accepted selfies (one with GPS in its EXIF); returns the bytes sent."""
    await running.service.agree(user)
    photos = [gps_jpeg(0), face_photo(1), face_photo(2)]
    reply = await running.service.add_photos(user, [Upload(f"selfie-{n}.jpg", p) for n, p in enumerate(photos)])
    assert reply.text.count(": accepted") == 3, reply.text
    return photos


async def user_db(running: Running) -> Database:
    return _DATABASES[id(running)]


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll the async ``condition`` until true; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


async def training_row(running: Running, user: UserRef = ALICE) -> tuple[str, float]:
    db = await user_db(running)
    account = await db.get_or_create_user(user.platform, user.platform_user_id)
    jobs = [j for j in await db.list_jobs(account.id) if j.kind == "train"]
    return (jobs[-1].state, jobs[-1].progress) if jobs else ("none", 0.0)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def killed_mid_training(running: Running, victim: str) -> dict[str, float]:
    """Start a training, SIGKILL ``victim`` ("worker" or "valkey") a fifth of the way in, and
    follow the row until the model is there. Returns what the test asserts on."""
    service = running.service
    training = asyncio.create_task(service.train(ALICE, "lora"))

    async def under_way() -> bool:
        state, progress = await training_row(running)
        return state == "running" and progress >= 0.2

    await until(under_way, 120, "the training under way")
    child = running.worker if victim == "worker" else running.valkey
    assert child is not None and child.pid is not None
    old_pid = child.pid
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # No row may say "running" while no live worker holds the job: a dead one's lease lapses.
    running_without_worker = 0.0
    worker = running.worker
    assert worker is not None
    while not training.done():
        state, _ = await training_row(running)
        if victim == "worker" and state == "running" and (worker.pid == old_pid or not worker.alive()):
            running_without_worker = time.monotonic() - killed_at
        await asyncio.sleep(0.2)
    reply = await training
    assert child.pid != old_pid and child.alive(), "the supervisor started it again"
    assert "lora model v1 is ready" in reply.text, reply.text
    return {"recovered_s": time.monotonic() - killed_at, "running_without_worker_s": running_without_worker}


async def assert_one_model_then_a_drawing(running: Running) -> None:
    """The user has exactly one model (the training ran to its end once), and it draws."""
    db = await user_db(running)
    account = await db.get_or_create_user(ALICE.platform, ALICE.platform_user_id)
    assert [(m.method, m.version) for m in await db.list_models(account.id)] == [("lora", 1)]
    (train,) = [j for j in await db.list_jobs(account.id) if j.kind == "train"]
    assert train.state == "done"
    drawn = await running.service.draw(ALICE, PROMPT)
    assert "Drawn by your lora model v1" in drawn.text and drawn.images


async def test_a_worker_killed_mid_training_is_replaced_and_the_model_arrives_once(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    async with chat_side(tmp_path, tiny_preset_dir) as running:
        await enrolled(running)
        measured = await killed_mid_training(running, "worker")
        assert measured["running_without_worker_s"] < 30, measured
        await assert_one_model_then_a_drawing(running)  # the replacement worker draws from it


async def test_valkey_killed_mid_training_comes_back_with_its_queue_and_the_model_arrives_once(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    async with chat_side(tmp_path, tiny_preset_dir) as running:
        await enrolled(running)
        measured = await killed_mid_training(running, "valkey")
        assert measured["recovered_s"] < 120
        await assert_one_model_then_a_drawing(running)


def test_a_killed_chat_process_takes_its_worker_and_valkey_with_it(tmp_path: Path, tiny_preset_dir: Path) -> None:
    config = write_config(tmp_path, tiny_preset_dir.parent, steps=20)
    chat = subprocess.Popen(
        [sys.executable, "-m", "avatarbooth", "chat", "--config", str(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        assert chat.stdin is not None and chat.stdout is not None
        chat.stdin.write(b"/help\n")
        chat.stdin.flush()
        chat.stdout.readline()  # the console answers: the worker and Valkey are up
        children = [pid for pid in _all_pids() if _parent_of(pid) == chat.pid]
        assert len(children) == 2, children  # the embedded Valkey and the worker
        chat.kill()
        chat.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in children), "a child outlived the chat process by 10 s"
    finally:
        if chat.poll() is None:
            chat.kill()


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


# --- erasure ---------------------------------------------------------------------------------------


def needles(photos: list[bytes], stored_keys: list[str]) -> dict[str, bytes]:
    """What of the user no file may hold after /forget: the prompt, the photos' hashes (sent and
    stored), their blob names, and the EXIF of the one sent with GPS."""
    found: dict[str, bytes] = {"prompt": b"quokka island"}
    for n, photo in enumerate(photos):
        found[f"photo {n} sha256"] = hashlib.sha256(photo).hexdigest().encode()
        found[f"photo {n} bytes"] = photo[len(photo) // 2 : len(photo) // 2 + 64]
    for key in stored_keys:
        found[f"blob {key}"] = key.rsplit("/", 1)[-1].split(".")[0].encode()
    found["exif"] = b"PhoneCo"
    return found


def traces(data_dir: Path, looked_for: dict[str, bytes]) -> list[str]:
    """Every (file, needle) pair where a file under ``data_dir`` holds a needle, whatever the file."""
    hits = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and "models" not in path.relative_to(data_dir).parts:
            content = path.read_bytes()
            hits += [f"{path.relative_to(data_dir)}: {name}" for name, needle in looked_for.items() if needle in content]
    return hits


async def stored_keys(running: Running) -> list[str]:
    db = await user_db(running)
    account = await db.get_or_create_user(ALICE.platform, ALICE.platform_user_id)
    keys = []
    for photo in await db.list_photos(account.id):
        keys += [k for k in (photo.blob_key, photo.crop_key, photo.embedding_key) if k]
    return keys


async def erasure_settled(running: Running) -> bool:
    return not await (await user_db(running)).pending_erasures()


async def test_forget_during_a_training_stops_it_and_leaves_no_byte_of_the_user(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    async with chat_side(tmp_path, tiny_preset_dir, steps=80) as running:
        photos = await enrolled(running)
        drawn = await running.service.draw(ALICE, PROMPT)  # InstantID: the prompt reaches the queue
        assert drawn.images
        looked_for = needles(photos, await stored_keys(running))
        before = traces(data_dir, looked_for)
        # The scan sees the user before /forget: in the database, the blobs, Valkey's append-only file.
        assert any(hit.startswith("avatarbooth.sqlite3") and hit.endswith("prompt") for hit in before), before
        assert any(hit.startswith("valkey/appendonlydir/") and hit.endswith("prompt") for hit in before), before
        assert any(hit.startswith("blobs/") and "bytes" in hit for hit in before), before
        training = asyncio.create_task(running.service.train(ALICE, "lora"))

        async def under_way() -> bool:
            state, progress = await training_row(running)
            return state == "running" and progress >= 0.1

        await until(under_way, 120, "the training under way")
        await running.service.forget(ALICE)
        with pytest.raises(ErasedMeanwhile):
            await asyncio.wait_for(training, 60)  # aborted: it stops at its next step
        await until(lambda: erasure_settled(running), 60, "the erasure finished")
        status = await running.service.status(ALICE)
        assert status.text == texts.STATUS_NOT_CONSENTED
        # The worker wrote nothing for the user after the erasure.
        await asyncio.sleep(1.0)
        assert not list((data_dir / "blobs").glob("u*/**/*.*")), list((data_dir / "blobs").rglob("*"))
        await (await user_db(running)).checkpoint_wal()
        assert traces(data_dir, looked_for) == []
    assert traces(data_dir, looked_for) == []  # Valkey's files too, after it stopped


@contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """``folder`` whose entries cannot be removed: immutable (chattr, which binds root too) or,
    for an ordinary user, read-only."""
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not made:
        if os.geteuid() == 0:
            pytest.skip("needs chattr (ext4/xfs) when run as root: root may delete from read-only folders")
        folder.chmod(0o500)
    try:
        yield
    finally:
        if made:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o700)


async def test_forget_with_an_unwritable_blob_folder_says_so_and_finishes_once_it_is_writable(
    tmp_path: Path, tiny_preset_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    async with chat_side(tmp_path, tiny_preset_dir) as running:
        photos = await enrolled(running)
        looked_for = needles(photos, await stored_keys(running))
        photos_dir = next((data_dir / "blobs").glob("u*/photos"))
        with unwritable(photos_dir):
            reply = await running.service.forget(ALICE)
            assert reply.text == texts.FORGET_PENDING
            assert (await running.service.status(ALICE)).text == texts.FORGET_PENDING
            await asyncio.sleep(3)  # the background retries cannot finish it either
            assert not await erasure_settled(running)
            assert list(photos_dir.iterdir())
        await until(lambda: erasure_settled(running), 30, "the erasure finished once writable")
        assert (await running.service.status(ALICE)).text == texts.STATUS_NOT_CONSENTED
        await (await user_db(running)).checkpoint_wal()
        assert traces(data_dir, looked_for) == []
