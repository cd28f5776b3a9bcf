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


@pytest.mark.parametrize("package", ["engine/render", "engine/personal"])
def test_drawing_and_model_files_import_nothing_of_training(package: str) -> None:
    # Loading a trained model is not training it: the renderer and the model formats stand alone.
    training = [
        f"{file}: {name}"
        for file, names in imported_modules(package).items()
        for name in names
        if name == "engine.train" or name.startswith("engine.train.")
    ]
    assert training == []


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


PRODUCT_PACKAGES = ("bot", "engine", "storage", "avatarbooth")
MAX_MODULE_LINES = 850


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Which of our modules each of our modules imports, anywhere in it (function-local imports
    count: they only hide a cycle), except under ``if TYPE_CHECKING:``."""
    files = {module_name(p): p for package in PRODUCT_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_module_of_ours_imports_another_in_a_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "a.py").write_text("from engine.b import x\n")
    (tmp_path / "engine" / "b.py").write_text("def x():\n    from engine import a\n")
    (tmp_path / "engine" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert cycles(import_graph()) == [["engine.a", "engine.b"]]


def test_no_product_module_is_over_850_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for package in PRODUCT_PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_reading_the_config_loads_no_chat_platform_library() -> None:
    code = "import sys, avatarbooth.config\nprint(','.join(m for m in ('telegram', 'discord') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
