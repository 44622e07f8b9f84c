"""dvc.yaml lists, for every stage, exactly the `src/` modules its script imports (directly or
through other modules), so a code change re-runs exactly the stages it can affect."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "cifar_pipeline"
SOURCE = Path("src") / PACKAGE


def _imported_modules(path: Path) -> set[str]:
    """Names of the package's modules that `path` imports anywhere (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            if node.module == PACKAGE:
                names.update(alias.name for alias in node.names)
            else:
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith(PACKAGE + "."))
    return {name for name in names if (PROJECT / SOURCE / f"{name}.py").exists()}


def _closure(script: Path) -> set[str]:
    # Importing any module runs the package's __init__ first.
    seen = {"__init__"}
    todo = _imported_modules(script) | _imported_modules(PROJECT / SOURCE / "__init__.py")
    while todo:
        name = todo.pop()
        seen.add(name)
        todo |= _imported_modules(PROJECT / SOURCE / f"{name}.py") - seen
    return {str(SOURCE / f"{name}.py") for name in seen}


def _stages():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = next(word for word in stage["cmd"].split() if word.startswith("stages/"))
        yield name, script, stage["deps"]


@pytest.mark.parametrize("name,script,deps", list(_stages()), ids=[name for name, _, _ in _stages()])
def test_each_stage_depends_on_exactly_the_modules_it_imports(name, script, deps):
    listed = {dep for dep in deps if dep.startswith(str(SOURCE))}
    assert script in deps
    assert listed == _closure(PROJECT / script), (
        f"{name}: missing {sorted(_closure(PROJECT / script) - listed)}, "
        f"not imported {sorted(listed - _closure(PROJECT / script))}")
