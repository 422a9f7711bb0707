"""The studies floor without Ray: its place above store/tracing/editing, batching, the CLI."""

import ast
from pathlib import Path

from tracekit.store import SweepItem
from tracekit.studies.ray_executor import _batches

PACKAGE = Path(__file__).resolve().parents[1] / "tracekit"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_lower_floor_imports_the_studies():
    """Studies drive the store, tracing and editing; only the command line (and analysis) sit above them."""
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("studies", "cli", "analysis", "__main__.py"):
            continue
        upward = {m for m in imported_modules(path) if m.startswith("tracekit.studies")}
        assert not upward, f"{relative} imports {upward}: the studies sit above it"


def test_batches_keep_points_together_and_prepared_items_apart():
    items = [SweepItem({"case_id": c, "method": m}) for c in (3, 1, 2) for m in ("rome", "ft-1", "rome")]
    needs = [item.key["method"] == "rome" for item in items]
    batches = _batches(items, needs, lambda key: key["case_id"], points_per_batch=1)
    assert [([i for i, _ in b.entries], b.needs_prepare) for b in batches] == [
        ([1], False), ([0, 2], True), ([4], False), ([3, 5], True), ([7], False), ([6, 8], True)]
    two = _batches(items, [False] * 9, lambda key: key["case_id"], points_per_batch=2)
    assert [[i for i, _ in b.entries] for b in two] == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]


def test_the_sweeps_are_commands_of_the_installed_package(capsys):
    from tracekit.cli import main

    for command in ("trace-dataset", "edit-sweep"):
        try:
            main([command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0
        assert "--executor {local,ray}" in capsys.readouterr().out
