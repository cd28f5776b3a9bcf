"""The presentation every adapter shares (bot.chat): button ids and the progress throttle."""

from __future__ import annotations

import asyncio
import re

import pytest

from bot.chat.actions import IMAGE_VERBS, MAX_ID, PATTERN, Action, Verb, decode
from bot.chat.progress import ProgressThrottle


@pytest.mark.parametrize("verb", list(Verb))
def test_every_action_survives_its_id_and_fits_every_platform(verb: Verb) -> None:
    action = Action(verb, MAX_ID - 1, 0 if verb is Verb.AGREE else MAX_ID - 1)
    data = action.encode()
    assert decode(data) == action
    assert len(data.encode()) <= 64  # Telegram's callback data; Discord allows 100
    assert re.fullmatch(PATTERN, data)


@pytest.mark.parametrize(
    ("old", "action"),
    [
        ("ab1:r:4711:42", Action(Verb.REROLL, 4711, 42)),
        ("ab1:m:4711:42", Action(Verb.MORE, 4711, 42)),
        ("ab1:f:4711:42", Action(Verb.FULL, 4711, 42)),
        ("ab1:d:4711:42", Action(Verb.DELETE, 4711, 42)),
        ("ab1:a:4711:0", Action(Verb.AGREE, 4711, 0)),
        ("ab:reroll:42:4711", Action(Verb.REROLL, 4711, 42)),  # Discord's: image first, then owner
        ("ab:more:42:4711", Action(Verb.MORE, 4711, 42)),
        ("ab:delete:42:4711", Action(Verb.DELETE, 4711, 42)),
        ("ab:agree:4711", Action(Verb.AGREE, 4711, 0)),
    ],
)
def test_the_previous_releases_button_ids_still_work(old: str, action: Action) -> None:
    assert decode(old) == action
    assert re.fullmatch(PATTERN, old)


@pytest.mark.parametrize(
    "forged",
    [
        None,
        42,
        "",
        "ab2:reroll:4711",  # no image
        "ab2:agree:4711:42",  # agree names no image
        "ab2:reroll:4711:0",  # and every other verb does
        "ab2:launch:4711:42",
        "ab1:x:4711:42",
        f"ab2:reroll:{MAX_ID}:42",  # beyond 64 bits: would overflow SQLite
        "ab2:reroll:99999999999999999999:42",
        "ab2:reroll:-1:42",
        "ab2:reroll:4711:42:extra",
        "ab3:reroll:4711:42",
    ],
)
def test_anything_else_is_no_action(forged: object) -> None:
    assert decode(forged) is None


def test_a_button_belongs_to_its_owner_only() -> None:
    action = Action(Verb.DELETE, 4711, 42)
    assert action.belongs_to(4711) and action.belongs_to("4711")
    assert not action.belongs_to(4712)
    assert IMAGE_VERBS == (Verb.REROLL, Verb.MORE, Verb.FULL, Verb.DELETE)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_throttle_shows_the_newest_line_at_most_once_per_interval() -> None:
    edits: list[str] = []
    clock = _Clock()

    async def edit(line: str) -> bool:
        edits.append(line)
        return True

    throttle = ProgressThrottle(edit, interval=0.2, clock=clock)
    throttle.shown("opened")
    for step in range(5):  # all within one interval of the opening
        throttle.push(f"step {step}")
    await asyncio.sleep(0.05)
    assert edits == []  # the interval since the message opened has not passed
    clock.now += 0.2
    await asyncio.sleep(0.25)
    assert edits == ["step 4"]  # the newest only
    throttle.push("step 4")  # what is shown already is not shown again
    await asyncio.sleep(0.01)
    assert edits == ["step 4"]
    await throttle.close()
    throttle.push("after the result")
    await asyncio.sleep(0.01)
    assert edits == ["step 4"]


async def test_closing_waits_for_an_edit_in_flight_and_a_failed_edit_is_not_shown() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []
    calls = 0

    async def edit(line: str) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the platform is down")
        started.set()
        await release.wait()
        finished.append(line)
        return True

    throttle = ProgressThrottle(edit, interval=0.0)
    throttle.push("one")
    await asyncio.sleep(0.01)
    throttle.push("one")  # the failed edit showed nothing: it is tried again
    await asyncio.wait_for(started.wait(), 1)
    closing = asyncio.create_task(throttle.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # the edit in flight lands before the result can
    release.set()
    await asyncio.wait_for(closing, 1)
    assert finished == ["one"]
