"""Style presets for ``/draw``: a prompt template around the user's words and a negative prompt.

Prompt policy belongs to the chat side (standard library only): it lists the styles and
checks a chosen name before it queues anything, without loading torch.

>>> apply_style("watercolor", "me in a meadow")[0]
'watercolor painting of me in a meadow, soft washes of colour bleeding into textured paper, loose brushwork'
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from bot.errors import UnknownStyleName

PLACEHOLDER = "{prompt}"
"""Where the user's words go in a template."""

# Artefacts every style wants to avoid; each style adds what contradicts its own look.
_COMMON_NEGATIVE = "blurry, lowres, jpeg artifacts, deformed face, extra fingers, watermark, signature, text"


@dataclass(frozen=True)
class Style:
    """One preset: ``template`` holds ``{prompt}`` once; ``negative`` is what the style steers away from."""

    name: str
    title: str  # how the chat side shows it, e.g. "Oil painting"
    template: str
    negative: str

    def __post_init__(self) -> None:
        if self.template.count(PLACEHOLDER) != 1:
            raise ValueError(f"style {self.name!r}: the template must contain {PLACEHOLDER} exactly once")

    def apply(self, prompt: str) -> tuple[str, str]:
        """(styled prompt, negative prompt) for the user's ``prompt``."""
        # str.replace, not str.format: braces in a user's prompt must not be read as fields.
        return self.template.replace(PLACEHOLDER, prompt.strip()), self.negative


def _style(name: str, title: str, template: str, negative: str) -> Style:
    return Style(name, title, template, f"{negative}, {_COMMON_NEGATIVE}")


_ALL = (
    _style(
        "photo",
        "Portrait photo",
        "natural light portrait photograph of {prompt}, 85mm lens, shallow depth of field, true skin texture",
        "painting, illustration, cartoon, 3d render, plastic skin, oversaturated",
    ),
    _style(
        "headshot",
        "Studio headshot",
        "professional studio headshot of {prompt}, softbox lighting, seamless grey backdrop, crisp focus on the eyes",
        "harsh shadows, busy background, wide angle distortion, cartoon, painting",
    ),
    _style(
        "astronaut",
        "Astronaut",
        "{prompt} as an astronaut in a detailed pressurised suit, visor reflections, "
        "earth glowing on the horizon, cinematic sci-fi still",
        "medieval, fantasy, cartoon, flat lighting, underwater",
    ),
    _style(
        "oil",
        "Oil painting",
        "classical oil painting of {prompt}, visible impasto brushstrokes, warm chiaroscuro, gallery canvas texture",
        "photograph, photorealistic, digital art, flat colours, anime",
    ),
    _style(
        "watercolor",
        "Watercolour",
        "watercolor painting of {prompt}, soft washes of colour bleeding into textured paper, loose brushwork",
        "photograph, hard edges, heavy outlines, 3d render, oil paint",
    ),
    _style(
        "anime",
        "Anime",
        "anime illustration of {prompt}, clean line art, cel shading, expressive eyes, vivid key visual colours",
        "photograph, photorealistic, 3d render, western comic, muddy colours",
    ),
    _style(
        "3d",
        "3D render",
        "stylised 3d character render of {prompt}, subsurface scattering, soft global illumination, "
        "octane-style studio scene",
        "photograph, 2d, flat illustration, sketch, painting",
    ),
    _style(
        "cyberpunk",
        "Cyberpunk",
        "{prompt} in a rain-soaked cyberpunk city at night, neon signs in magenta and teal, "
        "reflective streets, moody cinematic frame",
        "daylight, rural, pastel, medieval, washed out",
    ),
    _style(
        "fantasy",
        "Fantasy armour",
        "epic fantasy portrait of {prompt} wearing ornate engraved plate armour, flowing cape, "
        "dramatic rim light, mountain fortress behind",
        "modern clothing, city, sci-fi, cartoon, low detail",
    ),
    _style(
        "comic",
        "Comic book",
        "comic book panel of {prompt}, bold ink outlines, halftone dots, dynamic pose, flat vibrant colours",
        "photograph, photorealistic, soft gradients, 3d render, blurry lines",
    ),
    _style(
        "sketch",
        "Pencil sketch",
        "graphite pencil sketch of {prompt}, cross-hatching, smudged shading on off-white paper, monochrome",
        "colour, photograph, paint, 3d render, digital gradients",
    ),
    _style(
        "film",
        "Vintage film",
        "1970s film photograph of {prompt}, kodachrome colours, soft grain, light leaks, slightly faded print",
        "digital look, hdr, oversharpened, modern clothing, cartoon",
    ),
)

STYLES: Mapping[str, Style] = MappingProxyType({style.name: style for style in _ALL})
"""Every style by name, in the order the chat side lists them."""


def style_names() -> list[str]:
    """The style names, in display order."""
    return list(STYLES)


def get_style(name: str) -> Style:
    """The style called ``name`` (case and surrounding spaces ignored); ``UnknownStyleName`` lists the choices."""
    style = STYLES.get(name.strip().lower())
    if style is None:
        raise UnknownStyleName(name, style_names())
    return style


def apply_style(name: str, prompt: str) -> tuple[str, str]:
    """(styled prompt, negative prompt): the user's ``prompt`` set into the style ``name``'s template."""
    return get_style(name).apply(prompt)
