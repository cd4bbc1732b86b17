"""The package's layering, read from its imports (every import statement, also those inside functions).

Lower layers never import higher ones, packages of one layer never import each other, and no
module imports itself back through others: the layering the README's architecture section draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_r1"

# Lowest first. A top-level module (megatron_r1/<name>.py) or subpackage (megatron_r1/<name>/).
LAYERS = [
    {"platform", "heartbeat", "config"},  # the device, the liveness check, the config
    {"placement", "checksums"},  # which ranks train and which generate; SHA256SUMS of shipped models
    {"distributed"},  # process groups
    {"algorithms", "data"},  # pure math; prompts, corpora, tokenizers
    {"models"},  # Megatron models and their Hugging Face adapters
    {"train"},  # the training library: step, optimizer, checkpoints, metrics, the loop
    {"rewards", "planner", "convert"},  # rule/model rewards; memory planner; checkpoint conversion
    {"rollout"},  # vLLM engines, weight sync, rollout collection, held-out evaluation
    {"stages", "pipeline"},  # the commands; the multi-stage driver
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (resolved to modules, not names inside them)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_r1"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    deps.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("megatron_r1"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _unit(module: str) -> str:
    """The layering unit of a module: its subpackage, or itself when it is a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _imports()} - {"megatron_r1"}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_no_upward_or_sideways_imports_between_packages():
    wrong = []
    for module, deps in _imports().items():
        a = _unit(module)
        for dep in deps:
            b = _unit(dep)
            if a != b and a in RANK and b in RANK and RANK[b] >= RANK[a]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles_between_modules():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk reads imports in function bodies too: hiding one there does not hide a cycle."""
    graph = _imports()
    assert "megatron_r1.models.hf.base" in graph["megatron_r1.cli"]  # imported inside `load_config`
