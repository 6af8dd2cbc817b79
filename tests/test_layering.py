"""The house's one-way rule, checked on the source: `shapescap -> vizer -> rewards -> data`, never back, and
inside vizer/ from the commands down to the fast paths (VIZER_LAYERS), never up.

Every import counts, also those inside functions, so a back edge cannot hide in a lazy import; and no
cycle may run between modules of the project (module-level imports), however it is spelled.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "data": set(),
    "rewards": {"data"},
    "vizer": {"data", "rewards"},
    "shapescap": {"data", "rewards", "vizer"},
    "benchmarks": {"data", "rewards", "vizer", "shapescap"},
}
# vizer's floors, top to bottom: a module imports only from its own floor or those below. A unit is a
# top-level module or a whole subpackage; a module that no floor names fails too, so each new one is placed.
VIZER_LAYERS = [
    {"vizer.__main__", "vizer.cli"},  # the commands
    {"vizer.train", "vizer.grpo", "vizer.export"},  # a run, its trainer, and what leaves it (merge, push)
    {"vizer.watch"},  # watching a run: timing, canary, monitor
    {"vizer.eval"},  # judging captions
    {"vizer.recipe_rewards", "vizer.mapper", "vizer.objective"},  # rewards and the paper's objective
    {"vizer.models", "vizer.families", "vizer.run_dir", "vizer.scale"},  # models, the run directory, the batch
    {"vizer.config", "vizer.model_ids", "vizer.records"},  # the recipe and where its ids point
    {"vizer.tiny", "vizer.qwen2vl_processor"},  # offline test models and a processor that needs no torchvision
    {"vizer.fast"},  # the exact fast paths import nothing else of vizer
]
FLOOR = {unit: len(VIZER_LAYERS) - i for i, floor in enumerate(VIZER_LAYERS) for unit in floor}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules of the project that `path` imports (resolving relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ALLOWED)
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py"))


def back_edges(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        own = module_name(path).split(".")[0]
        for target in sorted(project_imports(path)):
            other = target.split(".")[0]
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)} imports {target} ({own} may import {sorted(ALLOWED[own])})")
    return bad


def vizer_unit(module: str) -> str | None:
    """The floor unit holding a vizer module (the longest name in VIZER_LAYERS it starts with); None for vizer
    itself and for modules of other packages."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in FLOOR:
            return ".".join(parts[:n])
    return None


def upward_imports(files: list[Path]) -> list[str]:
    """Imports inside vizer/ that run up a floor, and vizer modules that no floor names."""
    bad = []
    for path in files:
        module = module_name(path)
        if module.split(".")[0] != "vizer" or module == "vizer":
            continue
        unit = vizer_unit(module)
        if unit is None:
            bad.append(f"{path.relative_to(ROOT)} stands on no floor of VIZER_LAYERS")
            continue
        for target in sorted(project_imports(path)):
            other = vizer_unit(target)
            if other and other != unit and FLOOR[other] > FLOOR[unit]:
                bad.append(f"{path.relative_to(ROOT)} imports {target} (floor {FLOOR[other]}) from floor {FLOOR[unit]}")
    return bad


def cycles(files: list[Path]) -> list[list[str]]:
    modules = {module_name(p): p for p in files}
    graph = {
        m: {t for t in project_imports(p, top_level_only=True) if t in modules and t != m} for m, p in modules.items()
    }
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_dependencies_point_one_way():
    assert back_edges(sources()) == []


def test_vizer_imports_point_down_its_floors():
    assert upward_imports(sources()) == []


def test_no_import_cycles_between_modules():
    assert cycles(sources()) == []


def test_the_check_sees_a_back_edge_and_a_cycle(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "data" / "a.py").write_text("def f():\n    from vizer.config import load_recipe\n")  # lazy back edge
    (tmp_path / "data" / "b.py").write_text("from .c import x\n")
    (tmp_path / "data" / "c.py").write_text("from data.b import y\n")
    files = sorted((tmp_path / "data").rglob("*.py"))
    assert back_edges(files) == [
        "data/a.py imports vizer.config (data may import [])",
        "data/a.py imports vizer.config.load_recipe (data may import [])",
    ]
    assert cycles(files) == [["data.b", "data.c", "data.b"]]


def test_the_check_sees_a_fast_path_importing_the_run_and_an_unplaced_module(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "vizer" / "fast").mkdir(parents=True)
    (tmp_path / "vizer" / "fast" / "shared_vision.py").write_text("def f():\n    import vizer.train\n")
    (tmp_path / "vizer" / "eval").mkdir()
    (tmp_path / "vizer" / "eval" / "metrics.py").write_text("from ..fast import shared_vision\n")  # down: fine
    (tmp_path / "vizer" / "newcomer.py").write_text("")
    files = sorted((tmp_path / "vizer").rglob("*.py"))
    assert upward_imports(files) == [
        "vizer/fast/shared_vision.py imports vizer.train (floor 8) from floor 1",
        "vizer/newcomer.py stands on no floor of VIZER_LAYERS",
    ]
