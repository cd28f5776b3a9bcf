"""The console adapter driven through text streams, over a real service (SQLite, blobs, Valkey)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot import texts
from bot.console import ConsoleAdapter
from bot.jobs import JobClient
from bot.service import BotService, UserRef
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.bot.test_service import FakeClock, make_service
from tests.support import face_photo, running_worker

USER = UserRef("console", "tester")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "db.sqlite3") as database:
        yield database


@pytest.fixture
async def service(tmp_path: Path, valkey_url: str, db: Database) -> AsyncIterator[BotService]:
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as jobs:
        yield make_service(db, LocalBlobStore(tmp_path / "blobs"), jobs, FakeClock())


async def run_script(service: BotService, script: str, out_dir: Path, *, echo: bool = False) -> tuple[int, str, ConsoleAdapter]:
    stdout = io.StringIO()
    console = ConsoleAdapter(service, user=USER, out_dir=out_dir, stdin=io.StringIO(script), stdout=stdout, echo=echo)
    code = await console.run()
    return code, stdout.getvalue(), console


async def test_help_and_eof(service: BotService, tmp_path: Path) -> None:
    code, out, _ = await run_script(service, "/help\n", tmp_path)
    assert code == 0
    assert out == texts.HELP + "\n"


async def test_unknown_commands_and_plain_text_get_a_hint(service: BotService, tmp_path: Path) -> None:
    _, out, _ = await run_script(service, "/dance\nhello there\n", tmp_path)
    assert out.splitlines() == [
        "I don't know '/dance'. Send /help for the list of commands.",
        "Commands start with '/'. Send /help for the list of commands.",
    ]


async def test_blank_lines_and_comments_are_skipped_and_echo_shows_commands(service: BotService, tmp_path: Path) -> None:
    _, out, _ = await run_script(service, "\n# a comment\n   \n/HELP\n", tmp_path, echo=True)
    assert out.splitlines()[0] == "> /HELP"
    assert out.count("Commands:") == 1


async def test_a_bot_error_is_printed_as_its_message(service: BotService, tmp_path: Path) -> None:
    photo = tmp_path / "me.jpg"
    photo.write_bytes(face_photo(0))
    _, out, _ = await run_script(service, f"/photo {photo}\n/draw\n", tmp_path)
    assert out.splitlines() == [texts.CONSENT_REQUIRED, texts.EMPTY_PROMPT]


async def test_upscale_before_any_image_says_how_to_make_one(service: BotService, tmp_path: Path) -> None:
    _, out, console = await run_script(service, "/upscale\n/upscale 3\n", tmp_path)
    assert out.splitlines() == [texts.CONSOLE_NOTHING_TO_UPSCALE] * 2
    assert console.job_ids == []


async def test_train_reads_a_method_and_a_class_word(service: BotService, tmp_path: Path) -> None:
    _, out, _ = await run_script(service, "/train lora astronaut\n/train Astronaut\n/train woman\n", tmp_path)
    assert out.splitlines() == [
        "I can't train you as 'astronaut'. Choose one of: woman, man, person, e.g. /train lora woman; "
        "or leave it out and your photos decide.",
        "I don't know the training method 'astronaut'. Choose one of: lora, ti, dreambooth.",
        texts.CONSENT_REQUIRED,  # "woman" alone is the class word: checked, then consent is asked for
    ]


async def test_missing_and_unreadable_paths_are_not_sent(service: BotService, tmp_path: Path) -> None:
    script = f"/agree\n/photo {tmp_path / 'nope.jpg'} {tmp_path}\n/photo\n/photo \"unclosed\n"
    _, out, _ = await run_script(service, script, tmp_path)
    lines = out.splitlines()[1:]
    assert lines == [
        texts.photo_unreceived("photo 1 (nope.jpg)", texts.FILE_MISSING.format(path=tmp_path / "nope.jpg")),
        texts.photo_unreceived(
            f"photo 2 ({tmp_path.name})",
            texts.FILE_UNREADABLE.format(path=tmp_path, reason="it is a folder"),
        ),
        texts.enrollment_standing(0, service.settings.min_photos, service.settings.max_photos),
        texts.NO_FILES,
        "I couldn't read that line (No closing quotation); check the quotes and send it again.",
    ]


async def test_quoted_paths_with_spaces_reach_the_service(service: BotService, tmp_path: Path) -> None:
    folder = tmp_path / "my photos"
    folder.mkdir()
    (folder / "my notes.txt").write_text("not a photo")
    (folder / "it's.txt").write_text("neither")
    script = f"/agree\n/photo \"{folder / 'my notes.txt'}\" '{folder}/missing one.png' \"{folder}/it's.txt\"\n"
    _, out, _ = await run_script(service, script, tmp_path)
    lines = out.splitlines()[1:]
    assert lines[0].startswith("photo 1 (my notes.txt): refused, not a photo I can read")
    assert lines[1] == texts.photo_unreceived(
        "photo 2 (missing one.png)", texts.FILE_MISSING.format(path=f"{folder}/missing one.png")
    )
    assert lines[2].startswith("photo 3 (it's.txt): refused, not a photo I can read")


@pytest.mark.slow
async def test_images_are_written_with_readable_names(
    service: BotService, tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    photos = []
    for n in range(3):
        photos.append(tmp_path / f"selfie {n}.jpg")
        photos[-1].write_bytes(face_photo(n))
    quoted = " ".join(f"'{p}'" for p in photos)
    script = (
        f"/agree\n/photo {quoted}\n/preview\n/draw me as an astronaut\n/preview a painting\n"
        "/upscale 2\n/upscale\n"  # image 2 of nothing but the painting: refused; then the painting, 2×
    )
    out_dir = tmp_path / "out"
    async with running_worker(valkey_url, tmp_path / "blobs", tiny_preset_dir.parent):
        _, out, console = await run_script(service, script, out_dir)
    assert "photo 3 (selfie 2.jpg): accepted." in out
    names = [p.name for p in console.written_images]
    assert names == ["preview-1.png", "draw-1-1.png", "draw-1-2.png", "preview-2.png", "upscale-1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in console.written_images)
    assert console.job_ids == [*(f"check_photo-{n}" for n in (1, 2, 3)), "preview-4", "draw-5", "preview-6", "draw-7"]
    assert f"saved {out_dir / 'draw-1-2.png'}" in out
    assert texts.TINY_NOTE in out
    assert texts.CONSOLE_NO_SUCH_IMAGE.format(count=1, number=2) in out
    assert texts.upscaled(256, 256, 1) in out
    with Image.open(console.written_images[-1]) as upscaled, Image.open(console.written_images[-2]) as painting:
        assert upscaled.size == (2 * painting.width, 2 * painting.height)

    (out_dir / "my notes.txt").write_text("not ours")  # the user's own file in the folder stays
    _, out, _ = await run_script(service, "/forget\n", out_dir)
    assert texts.CONSOLE_FORGOTTEN_FILES.format(count=5, folder=out_dir) in out
    assert [p.name for p in out_dir.iterdir()] == ["my notes.txt"]


async def test_a_storage_failure_is_said_and_the_console_goes_on(
    tmp_path: Path, valkey_url: str, db: Database
) -> None:
    blobs_root = tmp_path / "blobs"
    blobs_root.write_bytes(b"")  # a file where the blob folder goes: every write fails
    photo = tmp_path / "me.jpg"
    photo.write_bytes(face_photo(0))
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as jobs:
        service = make_service(db, LocalBlobStore(blobs_root), jobs, FakeClock())
        code, out, _ = await run_script(service, f"/agree\n/photo {photo}\n/help\n", tmp_path / "out")
    assert code == 0
    assert "I could not read or write the data folder" in out and "then send the command again" in out
    assert out.rstrip().endswith(texts.HELP.rstrip())  # the next command still ran


async def test_an_unexpected_failure_is_said_logged_and_the_console_goes_on(
    tmp_path: Path, valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Database.open(tmp_path / "closed.sqlite3") as closed:
        pass  # closed: every query now fails with what aiosqlite raises, not one of our errors
    async with await JobClient.connect(valkey_url, poll_delay=0.02) as jobs:
        service = make_service(closed, LocalBlobStore(tmp_path / "blobs"), jobs, FakeClock())
        code, out, _ = await run_script(service, "/agree\n/help\n", tmp_path / "out")
    assert code == 0
    assert out.startswith(texts.SOMETHING_BROKE + "\n")
    assert out.rstrip().endswith(texts.HELP.rstrip())  # the next command still ran
    assert any(r.exc_info and "console command failed" in r.getMessage() for r in caplog.records)
