"""The console adapter: ``avatarbooth chat`` (interactive) and ``avatarbooth demo`` (piped script).

Reads one command per line, runs it to completion (jobs finished) before reading the next, so a
piped script is deterministic. This is where a failure (`bot.chat.failures`) becomes a printed reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from bot import texts
from bot.chat.failures import failure_text
from bot.chat.intake import Incoming, NotReceived, take_photos
from bot.options import PREVIEW_OPTIONS, parse_options, parse_train_words
from bot.replies import ImageOut
from bot.service import BotService, Reply, UserRef
from storage.errors import StorageError

_log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[Reply | None]]


class ConsoleAdapter:
    """Drive a `BotService` for one user from a text stream; write images into `out_dir`.

    After `run`, `written_images` lists the image files written and `job_ids` the queue job ids
    of every command, in order.
    """

    def __init__(
        self,
        service: BotService,
        *,
        user: UserRef,
        out_dir: Path,
        stdin: TextIO,
        stdout: TextIO,
        echo: bool = False,
        forget_saved_images: bool = True,
    ) -> None:
        self._service = service
        self._user = user
        self._out_dir = out_dir
        self._stdin = stdin
        self._stdout = stdout
        self._echo = echo  # print each command before its reply (for piped scripts)
        # /forget deletes the images saved into out_dir; only the demo (public test photos) keeps them.
        self._forget_saved_images = forget_saved_images
        self.written_images: list[Path] = []
        self.job_ids: list[str] = []
        self._numbers: dict[str, int] = {}  # the last image number used per command
        self._last_images: list[ImageOut] = []  # the newest result's, for /upscale N
        self._handlers: dict[str, Handler] = {
            "/start": self._start,
            "/agree": self._agree,
            "/photo": self._photo,
            "/photos": self._photos,
            "/preview": self._preview,
            "/train": self._train,
            "/draw": self._draw,
            "/pack": self._pack,
            "/upscale": self._upscale,
            "/styles": self._styles,
            "/status": self._status,
            "/forget": self._forget,
            "/help": self._help,
        }

    async def run(self) -> int:
        """Finish interrupted work, then answer commands until end of input; returns 0."""
        await self._answer("resume", self._resume())
        while True:
            if self._stdin.isatty():
                self._write("> ", end="")
            # Read on the loop's thread: nothing else runs between commands, and a reader thread
            # blocked in readline() would keep the process from exiting on Ctrl-C.
            line = self._stdin.readline()
            if not line:
                return 0
            await self.handle_line(line)

    async def handle_line(self, line: str) -> None:
        """Run one input line: a command, or nothing for blank lines and '#' comments."""
        text = line.strip()
        if not text or text.startswith("#"):
            return
        if self._echo:
            self._write(f"> {text}")
        command, *tail = text.split(maxsplit=1)
        command = command.lower()
        rest = tail[0] if tail else ""
        if not command.startswith("/"):
            self._write(texts.NOT_A_COMMAND)
            return
        handler = self._handlers.get(command)
        if handler is None:
            self._write(texts.UNKNOWN_COMMAND.format(command=command))
            return
        await self._answer(command, handler(rest.strip()))

    async def _answer(self, command: str, pending: Awaitable[Reply | None]) -> None:
        """Await a command and print its reply; a failure prints what to do instead, and the
        console goes on with the next command."""
        try:
            reply = await pending
        except StorageError as exc:  # the data folder failed (disk full, read-only): say so, keep going
            _log.warning("a console command failed on storage: %s", type(exc).__name__)
            self._write(texts.CONSOLE_STORAGE_FAILED.format(reason=exc))
            return
        except Exception as exc:
            self._write(failure_text(exc, "console"))
            return
        if reply is not None:
            await self._print_reply(command.lstrip("/"), reply)

    async def _print_reply(self, kind: str, reply: Reply) -> None:
        self.job_ids.extend(reply.job_ids)
        if reply.text:
            self._write(reply.text)
        if not reply.images:
            return
        self._last_images = list(reply.images)
        number = self._next_number(kind)
        for index, image in enumerate(reply.images, start=1):
            part = "" if len(reply.images) == 1 else f"-{index}"
            target = self._out_dir / f"{kind}-{number}{part}{image.path.suffix or '.png'}"
            await asyncio.to_thread(_copy, image.path, target)
            self.written_images.append(target)
            self._write(texts.IMAGE_SAVED.format(path=target))

    def _next_number(self, kind: str) -> int:
        """Readable names that never overwrite: preview-1.png, draw-2-1.png, draw-2-2.png, ..."""
        number = self._numbers.get(kind, 0) + 1
        while any(self._out_dir.glob(f"{kind}-{number}.*")) or any(
            self._out_dir.glob(f"{kind}-{number}-*")
        ):
            number += 1
        self._numbers[kind] = number
        return number

    async def _progress(self, line: str) -> None:
        self._write(line)

    def _write(self, text: str, end: str = "\n") -> None:
        self._stdout.write(text + end)
        self._stdout.flush()

    # --- commands -------------------------------------------------------------------------------

    async def _resume(self) -> Reply | None:
        return await self._service.resume_pending(self._user, on_progress=self._progress)

    async def _start(self, _: str) -> Reply:
        return await self._service.start(self._user)

    async def _agree(self, _: str) -> Reply:
        return await self._service.agree(self._user)

    async def _photo(self, rest: str) -> Reply | None:
        try:
            paths = shlex.split(rest)
        except ValueError as exc:
            self._write(texts.BAD_QUOTING.format(reason=exc))
            return None
        if not paths:
            self._write(texts.NO_FILES)
            return None
        limit = self._service.settings.max_upload_bytes
        files = [_incoming(path, limit) for path in paths]
        return await take_photos(self._service, self._user, files, on_progress=self._progress)

    async def _photos(self, _: str) -> Reply:
        return await self._service.photos(self._user)

    async def _preview(self, rest: str) -> Reply:
        options = parse_options(rest, allowed=PREVIEW_OPTIONS)
        return await self._service.preview(
            self._user, options.prompt or None, on_progress=self._progress,
            style=options.style, aspect=options.aspect, fast=options.fast,
        )

    async def _train(self, rest: str) -> Reply:
        method, class_word = parse_train_words(rest)
        return await self._service.train(self._user, method, on_progress=self._progress, class_word=class_word)

    async def _draw(self, rest: str) -> Reply:
        options = parse_options(rest)
        return await self._service.draw(
            self._user, options.prompt, on_progress=self._progress,
            style=options.style, aspect=options.aspect, boost=options.boost, fast=options.fast,
        )

    async def _pack(self, rest: str) -> Reply:
        return await self._service.pack(self._user, rest.strip() or None, on_progress=self._progress)

    async def _upscale(self, rest: str) -> Reply | None:
        """/upscale [N]: image N (from 1) of the newest result, the console's 2× upscale button."""
        count = len(self._last_images)
        if not count:
            self._write(texts.CONSOLE_NOTHING_TO_UPSCALE)
            return None
        number = int(rest) if rest.isdigit() else 0 if rest else 1
        if not 1 <= number <= count:
            self._write(texts.CONSOLE_NO_SUCH_IMAGE.format(count=count, number=rest))
            return None
        image_id = self._last_images[number - 1].image_id
        return await self._service.upscale(self._user, image_id, on_progress=self._progress)

    async def _styles(self, _: str) -> Reply:
        return await self._service.styles()

    async def _status(self, _: str) -> Reply:
        return await self._service.status(self._user)

    async def _forget(self, _: str) -> Reply:
        """Erase the user, and the images this console wrote for them (this session's and earlier
        ones', by their names) from the output folder: a copy outside the data folder is a trace too."""
        reply = await self._service.forget(self._user)
        self._last_images.clear()
        if not self._forget_saved_images:
            return reply
        removed = await asyncio.to_thread(_delete_written_images, self._out_dir)
        self.written_images.clear()
        if removed:
            reply.add(texts.CONSOLE_FORGOTTEN_FILES.format(count=removed, folder=self._out_dir))
        return reply

    async def _help(self, _: str) -> Reply:
        return await self._service.help()


_WRITTEN_IMAGE = re.compile(r"[a-z]+-\d+(?:-\d+)?\.(?:png|jpg|webp)")  # what _print_reply names them


def _delete_written_images(out_dir: Path) -> int:
    """Delete the images the console wrote into ``out_dir``; returns how many."""
    if not out_dir.is_dir():
        return 0
    written = [p for p in out_dir.iterdir() if p.is_file() and _WRITTEN_IMAGE.fullmatch(p.name)]
    for path in written:
        path.unlink(missing_ok=True)
    return len(written)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _incoming(name: str, limit: int) -> Incoming:
    """A file named on the command line; reading takes at most one byte past the upload limit
    (enough for the service to refuse a file that grew after its size was taken)."""
    path = Path(name).expanduser()
    try:
        size: int | None = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None

    def read_now() -> bytes:
        with path.open("rb") as handle:
            return handle.read(limit + 1)

    async def read() -> bytes:
        try:
            return await asyncio.to_thread(read_now)
        except FileNotFoundError as exc:
            raise NotReceived(texts.FILE_MISSING.format(path=name)) from exc
        except OSError as exc:
            reason = "it is a folder" if path.is_dir() else exc.strerror or type(exc).__name__
            raise NotReceived(texts.FILE_UNREADABLE.format(path=name, reason=reason)) from exc

    return Incoming(path.name, size, read)
