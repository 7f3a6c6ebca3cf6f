"""The import arrows of ARCHITECTURE.md, checked over every module of the tree.

Each source file is parsed (nothing is imported); every ``import medfed.X`` and
``from medfed.X import ...`` it makes, at any depth (inside functions too), must be an
arrow the architecture allows. A second test proves the check bites: a module that
breaks a rule is reported with its file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where each part of the one import package lives in the repository.
PARTS = {
    "server": ROOT / "server",
    "client": ROOT / "client",
    "strategies": ROOT / "strategies",
    "tasks": ROOT / "tasks",
    "core": ROOT / "medfed" / "core",
    "cli": ROOT / "medfed" / "cli",
    "data": ROOT / "medfed" / "data",
    "synth": ROOT / "medfed" / "synth",
    "local": ROOT / "medfed" / "local",
}
#: Who may import whom (the part itself always may; "package" is ``medfed/__init__``).
#: ``data`` (data sources) and ``synth`` (generated sites) sit beside the core and import
#: only it, so the parts that may import the core may read data through them too.
ALLOWED = {
    "core": set(),
    "strategies": {"core"},
    "tasks": {"core", "data", "synth"},
    "data": {"core"},
    "synth": {"core"},
    "client": {"core", "tasks", "data"},
    "server": {"core", "strategies", "tasks"},
    "local": {"core", "server", "client", "strategies", "tasks", "data", "synth"},
    "cli": {"core", "server", "client", "strategies", "tasks", "data", "synth", "local"},
}


def part_of_module(name: str) -> str | None:
    """The part ``medfed.<part>...`` names (None for anything outside medfed)."""
    pieces = name.split(".")
    if pieces[0] != "medfed":
        return None
    return pieces[1] if len(pieces) > 1 and pieces[1] in PARTS else "package"


def imported_parts(source: str) -> list[tuple[int, str, str]]:
    """(line, module, part) of every medfed import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + (
                [f"{node.module}.{a.name}" for a in node.names] if node.module == "medfed" else []
            )
        else:
            continue
        for name in names:
            part = part_of_module(name)
            if part is not None and name != "medfed":
                found.append((node.lineno, name, part))
    return sorted(found)


def violations(part: str, path: Path, source: str) -> list[str]:
    """Each import in ``source`` (a file of ``part``) that no arrow allows."""
    allowed = ALLOWED[part] | {part}
    return [
        f"{path.relative_to(ROOT)}:{line} ({part}) imports {name}"
        for line, name, target in imported_parts(source)
        if target not in allowed
    ]


def test_every_module_imports_only_what_the_architecture_allows() -> None:
    problems, files = [], 0
    for part, folder in PARTS.items():
        for path in sorted(folder.rglob("*.py")):
            files += 1
            problems += violations(part, path, path.read_text(encoding="utf-8"))
    assert files > 120, f"only {files} files found: the layout moved"
    assert not problems, "\n".join(problems)


def test_the_check_reports_a_broken_arrow_with_file_and_line() -> None:
    path = PARTS["tasks"] / "made_up.py"
    source = (
        "import numpy\nfrom medfed.core import wire\n"
        "def f():\n    from medfed.client.worker import SiteWorker\n"
        "import medfed.server.app\nfrom medfed import local\n"
    )
    assert violations("tasks", path, source) == [
        "tasks/made_up.py:4 (tasks) imports medfed.client.worker",
        "tasks/made_up.py:5 (tasks) imports medfed.server.app",
        "tasks/made_up.py:6 (tasks) imports medfed.local",
    ]
    assert violations("core", PARTS["core"] / "x.py", "from medfed.tasks import dp\n") == [
        "medfed/core/x.py:1 (core) imports medfed.tasks"
    ]
    assert violations("cli", PARTS["cli"] / "x.py", "import medfed.local\n") == []
