"""The chat side's error tree: every refusal of a command is a `BotError` with a message to show.

Adapters catch `BotError` in one place and reply with `user_message`; each message says what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot import texts
from engine.api import JobFailure


class BotError(Exception):
    """Root of the chat side's errors; `user_message` is what the user sees."""

    def __init__(self, user_message: str) -> None:
        super().__init__(user_message)
        self.user_message = user_message


class ConsentRequired(BotError):
    def __init__(self) -> None:
        super().__init__(texts.CONSENT_REQUIRED)


class NotEnoughPhotos(BotError):
    def __init__(self, have: int, need: int) -> None:
        super().__init__(texts.NOT_ENOUGH_PHOTOS.format(have=have, need=need, missing=need - have))
        self.have, self.need = have, need


class TooManyPhotos(BotError):
    def __init__(self, max_photos: int) -> None:
        super().__init__(texts.TOO_MANY_PHOTOS.format(max_photos=max_photos))


class TrainingAlreadyRunning(BotError):
    def __init__(self) -> None:
        super().__init__(texts.TRAINING_ALREADY_RUNNING)


class NoModelYet(BotError):
    def __init__(self) -> None:
        super().__init__(texts.NO_MODEL_YET)


class UnknownMethod(BotError):
    def __init__(self, method: str, choices: Sequence[str]) -> None:
        super().__init__(texts.UNKNOWN_METHOD.format(method=method, choices=", ".join(choices)))
        self.method = method


class UnknownClassWord(BotError):
    """A word /train was asked to draw the user as that is not one of the allowed class words."""

    def __init__(self, word: str, choices: Sequence[str]) -> None:
        super().__init__(
            texts.UNKNOWN_CLASS_WORD.format(word=word, choices=", ".join(choices), example=choices[0])
        )
        self.word = word


class MethodNotEnabled(BotError):
    """A real training method (ti, dreambooth) that this version does not offer."""

    def __init__(self, method: str, enabled: Sequence[str]) -> None:
        super().__init__(
            texts.METHOD_NOT_ENABLED.format(method=method, enabled=", ".join(enabled), default=enabled[0])
        )
        self.method = method


class EmptyPrompt(BotError):
    def __init__(self) -> None:
        super().__init__(texts.EMPTY_PROMPT)


class NotYourImage(BotError):
    """An image id that does not exist or belongs to someone else (never say which)."""

    def __init__(self) -> None:
        super().__init__(texts.NOT_YOUR_IMAGE)


class PromptBlocked(BotError):
    def __init__(self, term: str) -> None:
        super().__init__(texts.PROMPT_BLOCKED.format(term=term))
        self.term = term


class UnknownStyleName(BotError):
    def __init__(self, style: str, names: list[str]) -> None:
        super().__init__(texts.UNKNOWN_STYLE.format(style=style, names=", ".join(names)))


class UnknownPack(BotError):
    def __init__(self, name: str, names: list[str]) -> None:
        super().__init__(texts.UNKNOWN_PACK.format(name=name, names=", ".join(names)))


class PackNeedsModel(BotError):
    def __init__(self) -> None:
        super().__init__(texts.PACK_NEEDS_MODEL)


class UpscaleLimit(BotError):
    """An image upscaled as often as the bot allows (`bot.upscale.MAX_UPSCALES`)."""

    def __init__(self, upscales: int) -> None:
        super().__init__(texts.UPSCALE_LIMIT.format(factor=2**upscales))
        self.upscales = upscales


class UnknownAspect(BotError):
    def __init__(self, aspect: str, choices: Sequence[str]) -> None:
        super().__init__(texts.UNKNOWN_ASPECT.format(aspect=aspect, choices=", ".join(choices)))
        self.aspect = aspect


class UnknownOption(BotError):
    def __init__(self, option: str) -> None:
        super().__init__(texts.UNKNOWN_OPTION.format(option=option))
        self.option = option


class MissingOptionValue(BotError):
    def __init__(self, option: str, example: str) -> None:
        super().__init__(texts.MISSING_OPTION_VALUE.format(option=option, example=example))
        self.option = option


class RepeatedOption(BotError):
    def __init__(self, option: str) -> None:
        super().__init__(texts.REPEATED_OPTION.format(option=option))
        self.option = option


class PromptTooLong(BotError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(texts.PROMPT_TOO_LONG.format(length=length, limit=limit))


class RateLimited(BotError):
    def __init__(self, limit: int, retry_after_s: float) -> None:
        super().__init__(texts.RATE_LIMITED.format(limit=limit, wait=texts.duration(retry_after_s)))
        self.retry_after_s = retry_after_s


class JobFailed(BotError):
    """A worker job failed, timed out or returned something unreadable.

    `failure` is the worker's own `JobFailure` when it reported one (None for a timeout); the
    original exception, if any, is kept as `__cause__` by ``raise ... from``.
    """

    def __init__(self, user_message: str, failure: JobFailure | None = None) -> None:
        super().__init__(user_message)
        self.failure = failure

    @classmethod
    def from_failure(cls, what: str, failure: JobFailure) -> JobFailed:
        return cls(texts.job_failed(what, failure.code), failure)

    @classmethod
    def timed_out(cls, what: str, seconds: float) -> JobFailed:
        return cls(texts.job_timed_out(what, seconds))

    @classmethod
    def lost(cls, what: str) -> JobFailed:
        return JobLost(texts.JOB_LOST.format(what=what))

    @classmethod
    def unreadable(cls, what: str) -> JobFailed:
        return cls(texts.JOB_BROKEN_RESULT.format(what=what))


class JobLost(JobFailed):
    """The queue holds the job neither as waiting, running nor done (a queue server that lost its
    data): the service submits it again under the same id, a few times, before it says so."""


class ResultNotSaved(BotError):
    """A job finished but its result could not be written to the database, even after retries."""

    def __init__(self, what: str) -> None:
        super().__init__(texts.RESULT_NOT_SAVED.format(what=what))


class ErasedMeanwhile(BotError):
    """The user used /forget while a job ran; its result was discarded."""

    def __init__(self) -> None:
        super().__init__(texts.ERASED_MEANWHILE)


class QueueUnavailable(BotError):
    """Redis/Valkey could not be reached; `__cause__` holds the connection error."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(texts.QUEUE_UNAVAILABLE)
        self.detail = detail
