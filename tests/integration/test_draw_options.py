"""Draw options end to end: aspect ratios and the InstantID boost, on the tiny preset's real models.

The engine tests call the worker's job functions on one real ``WorkerContext`` (loaded once for the
module); the chat-side test goes through BotService, a real Valkey queue and the real worker.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from bot.options import parse_options
from bot.errors import MissingOptionValue, RepeatedOption, UnknownAspect, UnknownOption
from bot.jobs import JobClient
from bot.service import BotService, Upload, UserRef
from bot.settings import BotSettings
from engine.api import ASPECT_RATIOS, CheckPhotoRequest, DrawRequest, PreviewRequest, TrainRequest
from engine.settings import EngineSettings
from engine.worker import InvalidRequest, WorkerContext, aspect_size, do_check_photo, do_draw, do_preview, do_train
from storage.blobs import LocalBlobStore
from storage.db import Database
from tests.support import face_photo, running_worker

pytestmark = pytest.mark.slow
OWNER = "u1"
ALICE = UserRef("console", "alice")


@dataclass(frozen=True)
class Enrolled:
    app: WorkerContext
    faces: list[str]
    lora: DrawRequest  # a draw from the user's trained LoRA


@pytest.fixture(scope="module")
def enrolled(tiny_preset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enrolled]:
    """Three accepted selfies and a LoRA trained on them (a few steps), in one loaded worker."""
    blobs = tmp_path_factory.mktemp("blobs")
    settings = EngineSettings(
        preset="tiny", models_dir=tiny_preset_dir.parent, blobs_dir=blobs, redis_url="redis://unused"
    )
    app = WorkerContext.load(settings)
    faces, crops = [], []
    for n in range(3):
        photo = app.blobs.put(OWNER, "photos", face_photo(n), ".jpg")
        checked = do_check_photo(app, CheckPhotoRequest(f"check-{n}", OWNER, photo, faces))
        assert checked.accepted and checked.embedding_key and checked.crop_key, checked
        faces.append(checked.embedding_key)
        crops.append(checked.crop_key)
    trained = do_train(app, TrainRequest("train-1", OWNER, "lora", crops, "sks", "person", steps=4))
    lora = DrawRequest(
        "draw", OWNER, "me as an astronaut", faces, adapter_key=trained.adapter_key,
        method="lora", token="sks", class_word="person", seed=5,
    )
    yield Enrolled(app, faces, lora)


def _image(app: WorkerContext, key: str) -> Image.Image:
    return Image.open(io.BytesIO(app.blobs.get(key)))


def test_aspect_sizes_keep_the_pixel_count_in_multiples_of_the_step() -> None:
    for aspect, (w, h) in ASPECT_RATIOS.items():
        width, height = aspect_size(aspect, 1024, 64)
        assert width % 64 == 0 and height % 64 == 0
        assert abs(width * height / 1024**2 - 1) < 0.1
        assert abs(width / height - w / h) < 0.06, aspect
    assert aspect_size("9:16", 128, 8) == (96, 168)
    with pytest.raises(InvalidRequest, match="1:1, 3:4"):
        aspect_size("5:4", 1024, 64)


def test_draws_and_previews_come_in_the_asked_shape(enrolled: Enrolled) -> None:
    app = enrolled.app
    preview = do_preview(app, PreviewRequest("p", OWNER, enrolled.faces, "me", aspect="9:16"))
    instantid = do_draw(app, DrawRequest("d1", OWNER, "me", enrolled.faces, aspect="3:4"))
    lora = do_draw(app, DrawRequest(**{**enrolled.lora.to_dict(), "aspect": "16:9"}))
    boosted = do_draw(app, DrawRequest(**{**enrolled.lora.to_dict(), "aspect": "2:3", "identity_boost": True}))
    square = do_draw(app, enrolled.lora)

    assert _image(app, preview.image_keys[0]).size == (96, 168)
    assert _image(app, instantid.image_keys[0]).size == (112, 144)
    assert _image(app, lora.image_keys[0]).size == (168, 96)
    assert _image(app, boosted.image_keys[0]).size == (104, 160)
    assert _image(app, square.image_keys[0]).size == (128, 128)
    with pytest.raises(InvalidRequest, match="aspect ratio '7:5'"):
        do_draw(app, DrawRequest("d2", OWNER, "me", enrolled.faces, aspect="7:5"))


def test_the_boost_draws_through_instantid_with_the_lora_then_turns_it_off(enrolled: Enrolled) -> None:
    app = enrolled.app
    preview = PreviewRequest("p", OWNER, enrolled.faces, "sks person as an astronaut", seed=5)
    plain_instantid = app.blobs.get(do_preview(app, preview).image_keys[0])

    without = do_draw(app, enrolled.lora)
    boosted = do_draw(app, DrawRequest(**{**enrolled.lora.to_dict(), "identity_boost": True}))

    assert boosted.prompt_used == without.prompt_used == "sks person as an astronaut"
    boosted_image = app.blobs.get(boosted.image_keys[0])
    assert boosted_image != app.blobs.get(without.image_keys[0])
    assert boosted_image != plain_instantid  # the LoRA was active during the InstantID call
    # ... and off again afterwards: InstantID alone draws exactly what it drew before.
    assert app.blobs.get(do_preview(app, preview).image_keys[0]) == plain_instantid


def test_the_boost_without_a_lora_model_changes_nothing(enrolled: Enrolled) -> None:
    app = enrolled.app
    no_model = DrawRequest("d", OWNER, "me in a garden", enrolled.faces, seed=2)
    plain = do_draw(app, no_model)
    boosted = do_draw(app, DrawRequest(**{**no_model.to_dict(), "identity_boost": True}))
    assert app.blobs.get(boosted.image_keys[0]) == app.blobs.get(plain.image_keys[0])


def test_prompt_options_are_parsed_before_the_prompt() -> None:
    assert parse_options("--ar 3:4 --boost --style=anime me as an astronaut") == (
        parse_options("--style anime --boost --ar=3:4 me as an astronaut")
    )
    options = parse_options("--ar 3:4 --boost me --ar 1:1")
    assert (options.aspect, options.boost, options.prompt) == ("3:4", True, "me --ar 1:1")
    with pytest.raises(MissingOptionValue, match="--ar 3:4"):
        parse_options("--ar")
    with pytest.raises(UnknownOption, match="--boost"):
        parse_options("--boost me", allowed=("--style", "--ar"))


def test_an_option_given_twice_is_refused_not_silently_last_wins() -> None:
    for line in ("--ar 3:4 --ar 1:1 me", "--style anime --ar 3:4 --style=photo me", "--boost --boost me"):
        option = line.split()[0].partition("=")[0]
        with pytest.raises(RepeatedOption, match=f"{option} twice"):
            parse_options(line)


async def test_the_service_validates_the_aspect_and_redraws_keep_it(
    tmp_path: Path, valkey_url: str, tiny_preset_dir: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    async with (
        running_worker(valkey_url, blobs.root, tiny_preset_dir.parent),
        Database.open(tmp_path / "db.sqlite3") as db,
        await JobClient.connect(valkey_url) as jobs,
    ):
        service = BotService(db, blobs, jobs, BotSettings(), preset_name="tiny")
        await service.agree(ALICE)
        await service.add_photos(ALICE, [Upload(f"{n}.jpg", face_photo(n)) for n in range(3)])

        with pytest.raises(UnknownAspect, match="1:1, 3:4, 4:3, 2:3, 3:2, 9:16, 16:9"):
            await service.draw(ALICE, "me", aspect="5:4")
        drawn = await service.draw(ALICE, "me in a garden", aspect="3:4", boost=True)
        image_id = drawn.images[0].image_id
        again = await service.reroll(ALICE, image_id)
        varied = await service.more_like(ALICE, image_id)

        sizes = [
            await asyncio.to_thread(lambda p=image.path: Image.open(p).size)
            for reply in (drawn, again, varied)
            for image in reply.images
        ]
        assert sizes and set(sizes) == {(112, 144)}
