"""The layering rules of DESIGN.md, checked on the source and on what an import really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ML_LIBRARIES = {"torch", "diffusers", "transformers", "peft", "insightface", "onnxruntime", "onnx", "cv2"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every absolute module each file of ``package`` imports (relative imports resolved)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    names.add(package + ("." + node.module if node.module else ""))
                elif node.module:
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
                    names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def violations(package: str, forbidden: set[str], allowed_ours: set[str] | None = None) -> list[str]:
    ours = {"bot", "engine", "storage", "avatarbooth"}
    bad = []
    for file, names in imported_modules(package).items():
        for name in names:
            top = name.split(".")[0]
            if top in forbidden:
                bad.append(f"{file}: {name}")
            elif allowed_ours is not None and top in ours and top != package:
                if not any(name == a or name.startswith(a + ".") for a in allowed_ours):
                    bad.append(f"{file}: {name}")
    return bad


def test_bot_imports_no_ml_library_and_only_storage_and_engine_api() -> None:
    # Prompt policy (bot.styles, bot.safety) is the chat side's own: of the engine it sees the api only.
    assert violations("bot", ML_LIBRARIES | {"numpy"}, allowed_ours={"storage", "engine.api"}) == []


def test_engine_imports_nothing_of_bot_and_never_the_database() -> None:
    forbidden = {"bot", "avatarbooth", "aiosqlite", "sqlite3"}
    assert violations("engine", forbidden, allowed_ours={"storage.blobs", "storage.errors"}) == []


def test_storage_imports_none_of_our_other_packages() -> None:
    assert violations("storage", {"bot", "engine", "avatarbooth"} | ML_LIBRARIES) == []


def test_the_rule_checker_catches_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "bad.py").write_text("import torch\nfrom engine.worker import run_worker\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(violations("bot", ML_LIBRARIES, allowed_ours={"storage", "engine.api"})) == [
        "bot/bad.py: engine.worker",
        "bot/bad.py: engine.worker.run_worker",
        "bot/bad.py: torch",
    ]


@pytest.mark.parametrize("module", ["bot.service", "bot.console", "engine.api", "storage.db", "avatarbooth.config"])
def test_chat_side_modules_do_not_load_ml_libraries(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"loaded = sorted(m for m in {sorted(ML_LIBRARIES)!r} if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
