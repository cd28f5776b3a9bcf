"""/metrics and /healthz over real HTTP: the chat side as `avatarbooth run` composes it (`serve_chat`)
over a real Valkey and the real tiny worker, and `avatarbooth worker` as a real process."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from avatarbooth.config import ConfigError, MetricsSettings, load_config
from avatarbooth.runtime import serve_chat
from avatarbooth.valkey import EmbeddedValkey
from bot.runner import OUTCOMES
from bot.service import Upload, UserRef
from engine.api import JobName, TrainingMethod
from tests.support import face_photo, free_port, running_worker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PRIVATE_ID = "carol-private-id-5550123"
PRIVATE_PROMPT = "me as a zebra quokka astronaut"
CAROL = UserRef("console", PRIVATE_ID)
LABEL_VALUES = {
    "queue": {"interactive", "training"},
    "kind": {str(name) for name in JobName},
    "method": {str(method) for method in TrainingMethod} | {"none"},
    "outcome": set(OUTCOMES),
    "device": {f"cuda:{n}" for n in range(16)},
    "resident": {"yes", "no"},
}


def write_config(tmp_path: Path, models_dir: Path, redis_url: str, metrics: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\n'
        f'[queue]\nredis_url = "{redis_url}"\n'
        f"[metrics]\n{metrics}\n"
    )
    return config


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[EmbeddedValkey]:
    """A real Valkey whose process a test may kill."""
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly these labels in a scrape, None if absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


def assert_no_personal_labels(text: str) -> None:
    assert PRIVATE_ID not in text and "zebra" not in text and "quokka" not in text
    for family in text_string_to_metric_families(text):
        if family.name.startswith("avatarbooth_"):
            for found in family.samples:
                for label, value in found.labels.items():
                    if label != "le":  # the histogram's bucket bounds
                        assert value in LABEL_VALUES[label], (found.name, label, value)


async def wait_for(port: int, name: str, check: object, **labels: str) -> str:
    """Scrape until ``check(value)`` holds for the sample; returns that scrape."""
    async with asyncio.timeout(30):
        while True:
            status, text = await get(port, "/metrics")
            assert status == 200
            value = sample(text, name, **labels)
            if value is not None and check(value):  # type: ignore[operator]
                return text
            await asyncio.sleep(0.05)


async def test_the_chat_side_shows_queue_jobs_workers_and_users_and_says_when_it_is_unhealthy(
    tmp_path: Path, valkey: EmbeddedValkey, tiny_preset_dir: Path
) -> None:
    port = free_port()
    config = load_config(write_config(tmp_path, tiny_preset_dir.parent, valkey.url, f"port = {port}"))
    async with serve_chat(config, start_worker=False, serve_metrics=True, status=io.StringIO()) as running:
        assert await get(port, "/healthz") == (503, "no worker heartbeat: no avatarbooth:worker:* key in Valkey\n")
        service = running.service
        await service.agree(CAROL)
        checking = asyncio.create_task(
            service.add_photos(CAROL, [Upload(f"selfie-{n}.jpg", face_photo(n)) for n in range(3)])
        )
        # No worker yet: the photo checks wait in the interactive queue.
        await wait_for(port, "avatarbooth_queue_depth", lambda v: v >= 1, queue="interactive")
        async with running_worker(running.redis_url, config.engine.blobs_dir, tiny_preset_dir.parent):
            reply = await checking
            assert reply.text.splitlines()[0] == "photo 1 (selfie-0.jpg): accepted."
            await service.draw(CAROL, PRIVATE_PROMPT)
            assert await get(port, "/healthz") == (200, "ok\n")
            text = await wait_for(port, "avatarbooth_queue_depth", lambda v: v == 0, queue="interactive")

        done = {"kind": "check_photo", "method": "none", "outcome": "done"}
        assert sample(text, "avatarbooth_jobs_total", **done) == 3
        assert sample(text, "avatarbooth_jobs_total", kind="draw", method="none", outcome="done") == 1
        assert sample(text, "avatarbooth_job_duration_seconds_count", **done) == 3
        assert (sample(text, "avatarbooth_job_duration_seconds_sum", **done) or 0) > 0
        assert sample(text, "avatarbooth_queue_running", queue="interactive") == 0
        assert sample(text, "avatarbooth_queue_depth", queue="training") == 0
        assert sample(text, "avatarbooth_workers_alive") == 1  # its heartbeat outlives it by up to 30 s
        assert sample(text, "avatarbooth_users_enrolled") == 1
        assert sample(text, "avatarbooth_valkey_up") == 1
        assert sample(text, "process_resident_memory_bytes")
        assert "avatarbooth_gpu_memory" not in text  # the chat side holds no GPU
        assert_no_personal_labels(text)

        os.kill(valkey.pid or 0, signal.SIGKILL)  # the queue server dies
        await asyncio.to_thread(valkey.stop)
        status, reason = await get(port, "/healthz")
        assert (status, reason) == (503, "Valkey does not answer PING (ConnectionError)\n")
        status, text = await get(port, "/metrics")
        assert status == 200
        assert sample(text, "avatarbooth_valkey_up") == 0
        assert sample(text, "avatarbooth_workers_alive") is None
        assert sample(text, "avatarbooth_users_enrolled") == 1  # SQLite still answers
        assert sample(text, "avatarbooth_jobs_total", **done) == 3


async def test_a_worker_process_serves_its_metrics_and_health_while_valkey_answers(
    tmp_path: Path, valkey: EmbeddedValkey, tiny_preset_dir: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_preset_dir.parent, valkey.url, "worker_port = 1")  # the flag wins
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatarbooth", "worker", "--config", str(config), "--metrics-port", str(port),
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    text = await wait_for(port, "avatarbooth_workers_alive", lambda v: v == 1)
                    break
                except aiohttp.ClientConnectionError:  # not listening yet
                    assert worker.returncode is None
                    await asyncio.sleep(0.1)
        assert await get(port, "/healthz") == (200, "ok\n")
        assert sample(text, "avatarbooth_queue_depth", queue="interactive") == 0
        assert "# TYPE avatarbooth_gpu_memory_allocated_bytes gauge" in text
        # On a CPU host the GPU gauges have no samples; on CUDA one per visible device.
        import torch

        if torch.cuda.is_available():
            assert sample(text, "avatarbooth_gpu_memory_allocated_bytes", device="cuda:0") is not None
        else:
            assert "avatarbooth_gpu_memory_allocated_bytes{" not in text
        assert sample(text, "avatarbooth_personal_model_draws_total", resident="yes") == 0  # no draw yet
        assert "avatarbooth_jobs_total" not in text and "avatarbooth_users_enrolled" not in text  # the chat side's
        assert_no_personal_labels(text)

        os.kill(valkey.pid or 0, signal.SIGKILL)
        await asyncio.to_thread(valkey.stop)
        assert await get(port, "/healthz") == (503, "Valkey does not answer PING (ConnectionError)\n")
    finally:
        if worker.returncode is None:
            worker.terminate()
        await asyncio.wait_for(worker.wait(), 30)


async def test_a_port_in_use_stops_the_start_with_the_setting_to_change(
    tmp_path: Path, valkey: EmbeddedValkey
) -> None:
    from avatarbooth.runtime import StartupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(write_config(tmp_path, tmp_path / "models", valkey.url, f"port = {port}"))
        with pytest.raises(StartupError, match=rf"cannot serve metrics on 127.0.0.1:{port} .*\[metrics\] port"):
            async with serve_chat(config, start_worker=False, serve_metrics=True, status=io.StringIO()):
                pass


def test_metrics_are_off_unless_a_port_is_set_and_bad_values_say_what_to_fix(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert load_config(config).metrics == MetricsSettings(host="127.0.0.1", port=None, worker_port=None)
    config.write_text('[metrics]\nport = 9464\nworker_port = 0\nhost = "0.0.0.0"\n')
    assert load_config(config).metrics == MetricsSettings(host="0.0.0.0", port=9464, worker_port=None)
    for text, message in (
        ("port = 70000", r"\[metrics\] port must be a TCP port"),
        ('worker_port = "9465"', r"\[metrics\] worker_port must be a TCP port"),
        ("host = 5", r"\[metrics\] host must be an address"),
        ("path = '/m'", r"\[metrics\] unknown setting"),
        ("port = 9464\nworker_port = 9464", r"give the worker another port"),
    ):
        config.write_text(f"[metrics]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(config)
