"""The packages import only downward (docs/architecture.md), lazy imports inside functions included."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_distill"

#: layer of each top-level part of lit_distill; a part may import its own modules and parts of lower layers.
LAYERS = {
    "protocols": 0, "lightning_internals": 0, "_lazy": 0, "quiet": 0,
    "utils": 1, "diffusion": 1, "losses": 1, "models": 1, "data": 1, "rewards": 1, "metrics": 1,
    "methods": 2, "callbacks": 2, "distributed": 2,
    "pipeline": 3, "run_report": 3,
    "distill_cli": 4,
    "cli": 5,
}
#: layers whose parts may import each other (the lower layer is one toolbox; leaves and the methods / callbacks /
#: strategies meet only through the protocols)
SHARED_LAYERS = {1}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_parts(path: Path, source: str | None = None) -> set[str]:
    """The lit_distill parts the module at ``path`` (text ``source``, default: the file) imports anywhere in
    the file, at module level or inside functions."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lit_distill" and len(parts) > 1:
                found.add(parts[1])
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue  # the top-level package re-exports the public names
        own = part_of(path)
        for part in imported_parts(path) - {own}:
            if part not in LAYERS:
                out.append(f"{path.relative_to(PACKAGE.parent)} imports lit_distill.{part}, which has no layer")
            elif LAYERS[part] > LAYERS[own] or (LAYERS[part] == LAYERS[own] and LAYERS[own] not in SHARED_LAYERS):
                out.append(f"{path.relative_to(PACKAGE.parent)} ({own}, layer {LAYERS[own]}) imports "
                           f"lit_distill.{part} (layer {LAYERS[part]})")
    return out


def test_every_part_has_a_layer():
    parts = {part_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts <= set(LAYERS), sorted(parts - set(LAYERS))


def test_layers_import_only_downward():
    assert not violations(), "\n".join(violations())


@pytest.mark.parametrize("source, expected", [
    ("from lit_distill.methods import TeacherRL\n", {"methods"}),
    ("def f():\n    from ..pipeline import quickstart\n", {"pipeline"}),
    ("import lit_distill.callbacks.fid\n", {"callbacks"}),
    ("from .. import methods\n", {"methods"}),
])
def test_the_check_sees_every_form_of_import(source, expected):
    """The checker itself: absolute, relative (also ``from .. import x``) and function-level imports of a module
    at lit_distill/models/x.py are found."""
    assert imported_parts(PACKAGE / "models" / "x.py", source) == expected
