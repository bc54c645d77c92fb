"""The import rules of the package layout (README "Architecture"), read from the source itself.

Every import counts, also one inside a function: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnctl"


def _module_file(dotted: str) -> Path | None:
    """The file of `attnctl.a.b` (a module or a package's __init__), None if there is none."""
    parts = dotted.split(".")
    if parts[0] != "attnctl":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(path: Path) -> str:
    parts = ["attnctl", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[Path]:
    """The attnctl files that `path` imports."""
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule `name` if there is one, else pkg itself
            targets = [
                f"{base}.{alias.name}" if _module_file(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        else:
            continue
        found |= {f for f in map(_module_file, targets) if f is not None and f != path}
    return found


GRAPH = {path: _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _area(path: Path) -> str:
    """The top-level part of attnctl a file belongs to: "core", "processors", ... or the file name."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _violations(rule) -> list[str]:
    return sorted(f"{_name(a)} -> {_name(b)}" for a, targets in GRAPH.items() for b in targets if rule(a, b))


def test_the_graph_is_read():
    """The reader finds the imports it should (guards the rules below against an empty graph)."""
    softpag = PACKAGE / "processors" / "softpag.py"
    assert PACKAGE / "core" / "attention.py" in GRAPH[softpag]
    assert PACKAGE / "processors" / "softpag_math.py" in GRAPH[softpag]
    assert PACKAGE / "cli" / "__init__.py" in GRAPH[PACKAGE / "__main__.py"]
    assert PACKAGE / "cli" / "generate.py" in GRAPH[PACKAGE / "cli" / "__init__.py"]
    assert sum(map(len, GRAPH.values())) > 150


def test_no_circle_between_files():
    done: set[Path] = set()
    circles: list[str] = []

    def visit(path: Path, trail: list[Path]) -> None:
        if path in trail:
            circles.append(" -> ".join(_name(p) for p in trail[trail.index(path) :] + [path]))
            return
        if path in done:
            return
        for target in sorted(GRAPH[path]):
            visit(target, trail + [path])
        done.add(path)

    for path in GRAPH:
        visit(path, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


# area -> the areas its files may not import
FORBIDDEN = {
    "core": {"processors", "pipelines", "cli", "ui", "testbed", "headhunter", "bench", "kernels", "tiny"},
    "processors": {"pipelines", "cli", "ui", "testbed", "headhunter", "bench"},
}


@pytest.mark.parametrize("area", sorted(FORBIDDEN))
def test_layers_import_only_downwards(area):
    bad = _violations(lambda a, b: _area(a) == area and _area(b) in FORBIDDEN[area])
    assert not bad, f"{area}/ imports what it may not:\n" + "\n".join(bad)


def test_families_import_nothing_above_tokens():
    allowed = {PACKAGE / "core" / "tokens.py"}
    bad = _violations(lambda a, b: _area(a) == "families" and _area(b) != "families" and b not in allowed)
    assert not bad, "\n".join(bad)


def test_kernels_import_only_kernels():
    bad = _violations(lambda a, b: _area(a) == "kernels" and _area(b) != "kernels")
    assert not bad, "\n".join(bad)


def test_only_main_imports_the_cli():
    bad = _violations(lambda a, b: _area(b) == "cli" and _area(a) not in ("cli", "__main__"))
    assert not bad, "\n".join(bad)
