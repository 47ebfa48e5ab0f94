"""The layers of the source tree: what may import what (read from the files, so a new import that breaks them fails)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def streamd_imports(path: Path) -> set[str]:
    """The streamd modules a file imports (at any depth of the file, TYPE_CHECKING included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("streamd"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("streamd"))
    return found


@pytest.mark.parametrize(
    "package, allowed",
    [
        # the model's contract, shared with the trainer: NumPy only, no backend, no pipeline
        ("streamd/model", ("streamd.errors",)),
        # the tracker is plain NumPy over Detections: the pipeline wraps it (streamd.stages.track), not the other way
        ("streamd/tracking", ("streamd.model",)),
    ],
)
def test_a_package_imports_only_what_its_layer_allows(package: str, allowed: tuple[str, ...]):
    allowed = (*allowed, package.replace("/", "."))  # and itself
    for path in sorted((ROOT / package).glob("*.py")):
        outside = {m for m in streamd_imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"
