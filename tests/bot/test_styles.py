"""Style presets: enough of them, well-formed, and a clear error for an unknown name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.errors import UnknownStyleName
from bot.styles import PLACEHOLDER, STYLES, apply_style, get_style, style_names

ROOT = Path(__file__).resolve().parents[2]


def test_there_are_at_least_ten_styles_each_with_one_placeholder_and_a_negative() -> None:
    assert len(STYLES) >= 10
    assert style_names() == list(STYLES)
    for name, style in STYLES.items():
        assert style.name == name and name == name.lower() and " " not in name
        assert style.template.count(PLACEHOLDER) == 1
        assert style.negative and style.title


def test_templates_leave_me_to_the_user_and_pass_the_blocklist() -> None:
    from engine.render.renderer import expand_me
    from bot.safety import PromptBlocklist

    blocklist = PromptBlocklist.default()
    for style in STYLES.values():
        bare = style.template.replace(PLACEHOLDER, "")
        assert expand_me(bare, "sks", "person") == bare  # "me" in a styled prompt is only the user's
        assert blocklist.check(style.template) is None
        assert blocklist.check(style.negative) is None


def test_a_style_wraps_the_prompt_and_brings_its_negative() -> None:
    prompt, negative = apply_style("oil", "  me as a sailor ")
    assert "me as a sailor" in prompt and prompt.startswith("classical oil painting of me as a sailor")
    assert negative == STYLES["oil"].negative
    assert "photograph" in negative


def test_braces_in_a_prompt_are_kept_as_written() -> None:
    prompt, _ = apply_style("photo", "me holding a sign saying {hello} {prompt}")
    assert "me holding a sign saying {hello} {prompt}" in prompt


def test_names_are_matched_without_regard_to_case_or_spaces() -> None:
    assert get_style(" Anime ") is STYLES["anime"]


def test_an_unknown_style_is_refused_with_a_message_that_lists_the_styles() -> None:
    with pytest.raises(UnknownStyleName) as caught:
        apply_style("vaporwave", "me")
    message = caught.value.user_message
    assert "'vaporwave'" in message
    assert all(name in message for name in style_names())


def test_a_template_without_the_placeholder_is_refused() -> None:
    from bot.styles import Style

    with pytest.raises(ValueError, match="exactly once"):
        Style("broken", "Broken", "a photo", "blurry")


def test_styles_and_the_blocklist_import_without_ml_libraries() -> None:
    code = (
        "import sys, bot.styles, bot.safety\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
