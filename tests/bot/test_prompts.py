"""Prompts at the boundary: the blocklist refuses before anything is queued; styles shape the request."""

from __future__ import annotations

import io

import pytest

from bot.console import ConsoleAdapter
from bot.options import PREVIEW_OPTIONS, PromptOptions, parse_options
from bot.errors import PromptBlocked, RepeatedOption, UnknownOption, UnknownStyleName
from bot.service import BotService, UserRef
from bot.styles import STYLES
from storage.db import Database
from tests.bot.test_service import (  # noqa: F401  (fixtures)
    ALICE,
    blobs,
    blobs_dir,
    clock,
    db,
    jobs,
    service,
    worker,
)
from tests.support import face_photo


async def test_a_blocked_prompt_is_refused_before_any_job_exists(service: BotService, db: Database) -> None:
    await service.agree(ALICE)
    user = await db.get_or_create_user(ALICE.platform, ALICE.platform_user_id)
    with pytest.raises(PromptBlocked) as blocked:
        await service.draw(ALICE, "me, N.U.D.E, on a beach")
    assert blocked.value.term == "nude"
    assert "Rephrase your prompt" in blocked.value.user_message
    with pytest.raises(PromptBlocked):
        await service.preview(ALICE, "me nude")
    assert await db.list_jobs(user.id) == []


async def test_an_unknown_style_names_the_choices(service: BotService) -> None:
    await service.agree(ALICE)
    with pytest.raises(UnknownStyleName) as unknown:
        await service.draw(ALICE, "me", style="baroque-ish")
    assert "'baroque-ish'" in unknown.value.user_message and "anime" in unknown.value.user_message


@pytest.mark.slow
async def test_a_style_wraps_the_prompt_and_sets_its_negative_prompt(
    service: BotService, db: Database, worker: None
) -> None:
    from bot.service import Upload

    await service.agree(ALICE)
    await service.add_photos(ALICE, [Upload(f"{n}.jpg", face_photo(n)) for n in range(3)])
    await service.draw(ALICE, "me as an astronaut", style="anime")
    user = await db.get_or_create_user(ALICE.platform, ALICE.platform_user_id)
    (draw,) = [job for job in await db.list_jobs(user.id) if job.kind == "draw"]
    assert draw.payload is not None
    request = draw.payload["request"]
    styled, negative = STYLES["anime"].apply("me as an astronaut")
    assert request["prompt"] == styled and styled != "me as an astronaut"
    assert request["negative_prompt"] == negative != ""


def test_a_style_option_is_read_before_the_prompt() -> None:
    assert parse_options("--style anime me as an astronaut") == PromptOptions("me as an astronaut", style="anime")
    assert parse_options("--style=oil-painting me") == PromptOptions("me", style="oil-painting")
    assert parse_options("me as an astronaut") == PromptOptions("me as an astronaut")


def test_fast_is_a_flag_of_preview_and_draw_that_takes_no_value_and_comes_once() -> None:
    assert parse_options("--fast --ar 3:4 me") == PromptOptions("me", aspect="3:4", fast=True)
    assert parse_options("--boost --fast me") == PromptOptions("me", boost=True, fast=True)
    assert parse_options("--fast", allowed=PREVIEW_OPTIONS) == PromptOptions("", fast=True)
    assert parse_options("me --fast") == PromptOptions("me --fast")  # after the prompt: the prompt's words
    with pytest.raises(UnknownOption, match="'--fast=x'"):
        parse_options("--fast=x me")
    with pytest.raises(RepeatedOption, match="--fast twice"):
        parse_options("--fast --style anime --fast me")
    with pytest.raises(UnknownOption, match="'--boost'"):  # the boost is for drawing from a model
        parse_options("--fast --boost", allowed=PREVIEW_OPTIONS)


async def test_styles_lists_every_preset(service: BotService, tmp_path: object) -> None:
    out = io.StringIO()
    console = ConsoleAdapter(
        service, user=UserRef("console", "x"), out_dir=tmp_path, stdin=io.StringIO("/styles\n"), stdout=out  # type: ignore[arg-type]
    )
    await console.run()
    for name in STYLES:
        assert f"  {name}: " in out.getvalue()
