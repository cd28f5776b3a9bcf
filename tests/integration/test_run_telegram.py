"""`TELEGRAM_TOKEN=... avatarbooth run --config cfg.toml` as an operator runs it, against the fake Bot API.

The command is a real subprocess: it starts the embedded Valkey and a worker process, and serves
Telegram through the real python-telegram-bot; the test plays a user through the fake server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from bot import texts
from tests.bot.fake_telegram import TOKEN, FakeTelegram
from tests.bot.test_telegram import button
from tests.support import face_photo

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


async def test_run_serves_the_journey_on_telegram_and_stops_cleanly(tmp_path: Path, tiny_preset_dir: Path) -> None:
    async with FakeTelegram() as tg:
        config = tmp_path / "config.toml"
        config.write_text(
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[engine]\npreset = "tiny"\nmodels_dir = "{tiny_preset_dir.parent}"\n'
            f'[telegram]\nenabled = true\nbase_url = "{tg.base_url}"\nbase_file_url = "{tg.base_file_url}"\n'
            "progress_interval_s = 0.5\n"
        )
        env = {**os.environ, "TELEGRAM_TOKEN": TOKEN}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "avatarbooth", "run", "--config", str(config),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            ann = tg.user(2001, "Ann")
            tg.send_text(ann, "/start")
            consent = await tg.wait_text(ann.id, "Welcome to AvatarBooth", timeout=120)
            tg.press(ann, consent, button(consent, texts.TELEGRAM_AGREE_BUTTON))
            await tg.wait_text(ann.id, "your consent is recorded")

            for n in range(3):
                tg.send_photo(ann, face_photo(n), media_group_id="album")
            await tg.wait_text(ann.id, "3 of 3 photos", timeout=60)

            tg.send_text(ann, "/train lora")
            await tg.wait_text(ann.id, "lora model v1 is ready", timeout=120)
            tg.send_text(ann, "/draw me as an astronaut")
            await tg.wait_for(lambda: [c for c in tg.calls_of("sendPhoto") if c.params.get("chat_id") in (ann.id, str(ann.id))], timeout=60)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()[-3000:]
    logs = stdout + stderr + (tmp_path / "data" / "logs" / "worker.log").read_bytes()
    assert TOKEN.encode() not in logs
