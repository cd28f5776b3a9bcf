"""The chat side's limits and identity settings, filled in from config.toml by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


MAX_IMAGES_PER_REQUEST = 8  # best-of-N beyond this costs more GPU time than it buys likeness

AUTO_CLASS_WORD = "auto"
"""``class_word`` that means: the majority of the user's photos' apparent genders ("woman", "man"),
"person" when unknown or mixed."""
CLASS_WORD_CHOICES = ("woman", "man", "person")
"""The class words a user may name with /train (plain nouns the base models know well)."""


@dataclass(frozen=True)
class BotSettings:
    """Limits the chat side enforces before anything reaches a worker.

    Field names match config.toml's keys (see ``avatarbooth.config``); every number is positive.
    """

    min_photos: int = 3
    max_photos: int = 5
    max_upload_bytes: int = 20 * MIB
    # Checked from the image header, before decoding: a 20000x20000 "photo" is refused unread.
    max_pixels: int = 40_000_000
    min_side: int = 256  # the tiny preset may lower it in config.toml
    draws_per_hour: int = 30  # images (previews and draws) per user per rolling hour
    max_prompt_chars: int = 300
    default_preview_prompt: str = "a portrait photo of me, soft light, detailed face"
    token: str = "sks"  # the rare word that stands for the user in prompts
    class_word: str = AUTO_CLASS_WORD  # or a fixed word for everyone, e.g. "person"
    enabled_methods: tuple[str, ...] = ("lora", "ti")  # dreambooth is opt-in: gigabytes per user
    preview_num_images: int = 1
    draw_num_images: int = 2
    pack_best_of: int = 2  # each pack image is the best of this many by likeness
    interactive_timeout_s: int = 300
    training_timeout_s: int = 3600
    consent_version: str = "1"

    def __post_init__(self) -> None:
        if self.min_photos > self.max_photos:
            raise ValueError(
                f"min_photos ({self.min_photos}) must not exceed max_photos ({self.max_photos})"
            )
        for name, count in (
            ("preview", self.preview_num_images), ("draw", self.draw_num_images), ("pack image", self.pack_best_of)
        ):
            if not 1 <= count <= MAX_IMAGES_PER_REQUEST:
                raise ValueError(
                    f"images per {name} must be between 1 and {MAX_IMAGES_PER_REQUEST}, not {count}"
                )
        if not self.class_word.strip() or len(self.class_word.split()) != 1:
            raise ValueError(
                f"class_word must be {AUTO_CLASS_WORD!r} or one word such as 'person', not {self.class_word!r}"
            )
        if not self.enabled_methods:
            raise ValueError("enabled_methods must name at least one training method, e.g. 'lora'")

    @property
    def default_method(self) -> str:
        """The training method /train uses when none is named."""
        return self.enabled_methods[0]
