"""Routing by residency, measured: two `avatarbooth worker` processes that each keep one LoRA loaded
(``resident_loras = 1``), blobs in a real S3 bucket and each worker with its own data folder (as on
two hosts), and two users drawing in turn. Every draw's worker logs whether the user's model was
already in its memory; the hit rate is counted from those lines.

Without routing, whichever worker polls first takes the draw, so the users' LoRAs are loaded again
and again; with it, each user's draws stay with the worker that holds their LoRA. Training leaves
nothing loaded for drawing, so each user's first draw is a miss.
"""

from __future__ import annotations

import io
import re
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from avatarbooth.config import AppConfig, load_config
from avatarbooth.runtime import WorkerProcess, serve_chat
from bot.service import Upload, UserRef
from tests.support import face_photo, free_port

pytestmark = pytest.mark.slow
USERS = [UserRef("console", "alice"), UserRef("console", "bob")]
DRAWS = 8  # in turn: alice, bob, alice, ...
LINE = re.compile(r"job (draw-\d+): the personal model was (resident|not resident)")


def host_config(
    folder: Path, models_dir: Path, bucket: str, valkey_url: str, wait_s: float, metrics_port: int = 0
) -> AppConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        f'[storage]\ndata_dir = "{folder / "data"}"\nblob_store = "s3"\ns3_bucket = "{bucket}"\n'
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\nresident_loras = 1\nface_detail = false\n'
        f'[queue]\nredis_url = "{valkey_url}"\nresidency_wait_s = {wait_s}\n'
        f"[limits]\nimages_per_draw = 1\n[training]\nsteps = 20\n[metrics]\nworker_port = {metrics_port}\n"
    )
    return load_config(path, preset="tiny")


async def draws_in_turn(
    tmp_path: Path, phase: str, chat: AppConfig, models_dir: Path, bucket: str, valkey_url: str, wait_s: float
) -> list[str]:
    """Start two workers, train both users' LoRAs, draw DRAWS times in turn; the residency of each draw,
    from the workers' logs, checked against their /metrics counts."""
    logs, ports = [], [free_port(), free_port()]
    with ExitStack() as stack:
        for n, port in enumerate(ports, start=1):
            config = host_config(tmp_path / phase / f"worker-{n}", models_dir, bucket, valkey_url, wait_s, port)
            worker = stack.enter_context(WorkerProcess(config, metrics=True))
            await worker.wait_ready(valkey_url)
            logs.append(worker.log_path)
        async with serve_chat(chat, start_worker=False, status=io.StringIO()) as running:
            service = running.service
            for n, user in enumerate(USERS):
                await service.agree(user)
                photos = [Upload(f"selfie-{i}.jpg", face_photo(3 * n + i)) for i in range(3)]
                assert (await service.add_photos(user, photos)).text.count(": accepted") == 3
                assert "lora model v1 is ready" in (await service.train(user, "lora")).text
            for n in range(DRAWS):
                drawn = await service.draw(USERS[n % 2], "me as an astronaut")
                assert drawn.images and "lora model v1" in drawn.text, drawn.text
        counted = [sum(draws(port, resident) for port in ports) for resident in ("yes", "no")]
    found = {job: seen for log in logs for job, seen in LINE.findall(log.read_text())}
    assert len(found) == DRAWS, found  # one line per draw, from whichever worker drew it
    seen = [found[job] for job in sorted(found, key=lambda job: int(job.split("-")[1]))]
    assert counted == [seen.count("resident"), seen.count("not resident")], (counted, seen)
    return seen


def draws(port: int, resident: str) -> float:
    """A worker's ``avatarbooth_personal_model_draws_total`` with that label, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == "avatarbooth_personal_model_draws_total" and found.labels == {"resident": resident}:
                return float(found.value)
    raise AssertionError(f"no avatarbooth_personal_model_draws_total{{resident={resident!r}}} on port {port}")


async def test_draws_go_to_the_worker_that_holds_the_users_lora(
    tmp_path: Path, tiny_preset_dir: Path, s3_bucket: str, valkey_url: str
) -> None:
    chat = host_config(tmp_path / "chat", tiny_preset_dir.parent, s3_bucket, valkey_url, 0)
    routed = await draws_in_turn(tmp_path, "on", chat, tiny_preset_dir.parent, s3_bucket, valkey_url, wait_s=2.0)

    # Each user's first draw loads their LoRA on a worker of its own; every later draw finds it there.
    # (With wait_s=0, routing off, a run found 4 of 8: whichever worker polled first drew.)
    assert routed == ["not resident"] * 2 + ["resident"] * (DRAWS - 2), routed
    print(f"residency hit rate over {DRAWS} alternating draws: {routed.count('resident') / DRAWS}")
