"""Avatar packs (``/pack``): named sets of styled prompts, read from a data file (``bot/packs.toml``).

A pack renders ``count`` images from the user's newest model, cycling through its prompts; each
image is the best of a few by likeness (``BotSettings.pack_best_of``). The file is checked when the
bot starts: an unknown style, an aspect ratio the engine lacks or an empty prompt list is refused
with what to fix, never found out by a user halfway through a pack.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from bot.errors import UnknownPack
from bot.styles import STYLES
from engine.api import ASPECT_RATIOS, DEFAULT_ASPECT

PACKS_FILE = Path(__file__).with_name("packs.toml")
MAX_PACK_IMAGES = 40  # one pack's worth of GPU time; more is several packs


class PackFileError(ValueError):
    """The packs file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class PackPrompt:
    prompt: str  # "me" is the user, as in /draw
    style: str | None = None  # a key of bot.styles.STYLES

    def subject(self) -> str:
        """How a reply names the image: its style's title and its words."""
        return f"{STYLES[self.style].title}: {self.prompt}" if self.style else self.prompt

    def styled(self) -> tuple[str, str]:
        """(prompt, negative prompt) as the draw sends them."""
        if self.style is None:
            return self.prompt, ""
        return STYLES[self.style].apply(self.prompt)


@dataclass(frozen=True)
class Pack:
    name: str
    title: str
    description: str
    count: int
    aspect: str
    prompts: tuple[PackPrompt, ...]

    def prompt_for(self, index: int) -> PackPrompt:
        """The prompt of the pack's ``index``-th image (from 0): the prompts in turn."""
        return self.prompts[index % len(self.prompts)]


def load_packs(path: Path = PACKS_FILE) -> Mapping[str, Pack]:
    """Every pack in ``path`` by name, in the file's order; `PackFileError` says what to fix."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PackFileError(f"cannot read the packs file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PackFileError(f"{path} is not valid TOML ({exc}); fix it") from exc
    packs = {}
    for name, table in data.items():
        where = f"{path}: [{name}]"
        if not isinstance(table, dict):
            raise PackFileError(f"{where} must be a table with title, count and prompts")
        packs[name] = _pack(name, table, where)
    if not packs:
        raise PackFileError(f"{path} defines no pack; add at least one [name] table")
    return MappingProxyType(packs)


def find_pack(packs: Mapping[str, Pack], name: str) -> Pack:
    """The pack called ``name`` (case and spaces ignored); `UnknownPack` lists the choices."""
    pack = packs.get(name.strip().lower())
    if pack is None:
        raise UnknownPack(name, list(packs))
    return pack


def _pack(name: str, table: dict[str, object], where: str) -> Pack:
    if name != name.strip().lower() or not name.replace("-", "").replace("_", "").isalnum():
        raise PackFileError(f"{where}: a pack's name is one lower-case word (letters, digits, - or _)")
    unknown = set(table) - {"title", "description", "count", "aspect", "prompts"}
    if unknown:
        raise PackFileError(f"{where}: unknown keys {sorted(unknown)}; use title, description, count, aspect, prompts")
    count = table.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_PACK_IMAGES:
        raise PackFileError(f"{where}: count must be a whole number from 1 to {MAX_PACK_IMAGES}, not {count!r}")
    aspect = table.get("aspect", DEFAULT_ASPECT)
    if aspect not in ASPECT_RATIOS:
        raise PackFileError(f"{where}: aspect {aspect!r} is not one of {', '.join(ASPECT_RATIOS)}")
    raw_prompts = table.get("prompts")
    if not isinstance(raw_prompts, list) or not raw_prompts:
        raise PackFileError(f"{where}: prompts must be a list of {{ prompt = \"me ...\", style = \"...\" }}")
    prompts = tuple(_prompt(item, f"{where} prompt {n}") for n, item in enumerate(raw_prompts, start=1))
    title = table.get("title", name)
    description = table.get("description", "")
    if not isinstance(title, str) or not isinstance(description, str):
        raise PackFileError(f"{where}: title and description must be text")
    return Pack(name, title, description, count, str(aspect), prompts)


def _prompt(item: object, where: str) -> PackPrompt:
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise PackFileError(f"{where}: needs a prompt, e.g. {{ prompt = \"me in a park\" }}")
    if set(item) - {"prompt", "style"}:
        raise PackFileError(f"{where}: only prompt and style may be given")
    style = item.get("style")
    if style is not None and style not in STYLES:
        raise PackFileError(f"{where}: unknown style {style!r}; /styles lists {', '.join(STYLES)}")
    return PackPrompt(" ".join(item["prompt"].split()), style)
