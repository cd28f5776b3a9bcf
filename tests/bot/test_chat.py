"""The presentation every adapter shares (bot.chat): button ids, the progress throttle, the
background task set and the upload intake (run through every adapter in test_every_adapter)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import pytest

from bot import texts
from bot.chat.actions import IMAGE_VERBS, MAX_ID, PATTERN, Action, Verb, decode
from bot.chat.intake import Incoming, NotReceived, receive
from bot.chat.progress import ProgressThrottle
from bot.chat.tasks import TaskSet
from bot.replies import Unreceived, Upload
from bot.settings import BotSettings
from engine.api import Refusal


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
    assert IMAGE_VERBS == (Verb.REROLL, Verb.MORE, Verb.UPSCALE, Verb.FULL, Verb.DELETE)


def test_the_upscale_button_round_trips_in_the_current_format_only() -> None:
    action = Action(Verb.UPSCALE, 4711, 42)
    assert action.encode() == "ab2:upscale:4711:42"
    assert decode("ab2:upscale:4711:42") == action
    assert decode(Action(Verb.UPSCALE, MAX_ID - 1, MAX_ID - 1).encode()) == Action(Verb.UPSCALE, MAX_ID - 1, MAX_ID - 1)
    assert decode("ab2:upscale:4711:0") is None  # it names an image
    # The previous releases had no upscale button: their formats never decode to one.
    assert decode("ab1:u:4711:42") is None
    assert decode("ab:upscale:42:4711") is None
    assert decode("ab1:f:4711:42") == Action(Verb.FULL, 4711, 42)  # and theirs still work beside it


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


# --- background tasks (bot.chat.tasks) ---------------------------------------------------------




async def test_a_stop_drains_the_work_within_its_grace_cancels_the_rest_and_logs_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet("Test")
    done: list[str] = []
    cancelled: list[str] = []

    async def quick(name: str) -> None:
        await asyncio.sleep(0.01)
        done.append(name)

    async def starts_more() -> None:  # what running work starts while draining is drained too
        await asyncio.sleep(0.01)
        tasks.spawn(quick("started while draining"))

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    async def fails() -> None:
        raise RuntimeError("a bug of ours")

    tasks.spawn(quick("quick"))
    tasks.spawn(starts_more())
    tasks.spawn(slow())
    failing = tasks.spawn(fails())
    await asyncio.wait([failing])
    assert len(tasks) == 3  # the failed one left the set; the others run on
    tasks.spawn(quick("after the failure"))

    loop = asyncio.get_running_loop()
    started = loop.time()
    await tasks.drain(0.5)
    assert loop.time() - started < 5  # the slow task was cancelled after the grace, not awaited
    assert sorted(done) == ["after the failure", "quick", "started while draining"]
    assert cancelled == ["slow"]
    assert len(tasks) == 0
    (failure,) = [r for r in caplog.records if r.name == "bot.chat.tasks"]
    assert failure.levelno == logging.ERROR
    assert failure.getMessage() == "a Test task failed"
    assert failure.exc_info is not None and str(failure.exc_info[1]) == "a bug of ours"


async def test_a_task_started_elsewhere_is_stopped_with_the_set_while_it_is_tracked() -> None:
    tasks = TaskSet()
    inside, outside = asyncio.Event(), asyncio.Event()

    async def command(tracked_until_done: bool) -> None:
        with tasks.tracking(asyncio.current_task()):
            inside.set()
            if tracked_until_done:
                await asyncio.sleep(30)
        outside.set()
        await asyncio.sleep(30)  # after the block: the set no longer stops it

    finished_block = asyncio.create_task(command(tracked_until_done=False))
    await asyncio.wait_for(outside.wait(), 1)
    assert len(tasks) == 0
    inside.clear()
    running = asyncio.create_task(command(tracked_until_done=True))
    await asyncio.wait_for(inside.wait(), 1)
    assert len(tasks) == 1
    await asyncio.wait_for(tasks.cancel_all(), 1)
    assert running.cancelled()
    assert not finished_block.done()
    finished_block.cancel()
    await asyncio.gather(finished_block, return_exceptions=True)


def test_every_verb_has_one_label_for_every_platform() -> None:
    assert set(texts.BUTTON_LABELS) == {verb.value for verb in Verb}
    assert all(label.strip() for label in texts.BUTTON_LABELS.values())


# --- the upload intake (bot.chat.intake) ----------------------------------------------------------


async def test_the_intake_fetches_every_file_at_once_and_keeps_the_order_sent() -> None:
    settings = BotSettings(max_upload_bytes=100)
    started: list[str] = []
    release = asyncio.Event()

    def reader(name: str, data: bytes | None) -> Callable[[], Awaitable[bytes]]:
        async def read() -> bytes:
            started.append(name)
            await release.wait()  # each waits for the others to have started: fetched at once
            if data is None:
                raise NotReceived("not kept, the platform lost it.")
            return data

        return read

    def unread() -> Awaitable[bytes]:
        raise AssertionError("a file over a limit is never read")

    files = [
        Incoming("a.jpg", 10, reader("a", b"a")),
        Incoming("big.jpg", 101, unread),
        Incoming("gone.jpg", 10, reader("gone", None)),
        Incoming("huge.jpg", 50, unread, platform_limit=40, over_platform_limit="not kept, over 40."),
        Incoming(None, None, reader("unsized", b"u")),  # a size the platform does not say
    ]
    receiving = asyncio.create_task(receive(files, settings))
    while len(started) < 3:
        await asyncio.sleep(0)
    release.set()
    too_large = texts.refused(texts.refusal(Refusal.FILE_TOO_LARGE, settings))
    assert await receiving == [
        Upload("a.jpg", b"a"),
        Unreceived("big.jpg", too_large),
        Unreceived("gone.jpg", "not kept, the platform lost it."),
        Unreceived("huge.jpg", "not kept, over 40."),  # the platform's own limit says it better
        Upload(None, b"u"),
    ]
