"""The package reads one way: every import (lazy ones inside functions too) goes to the same pipeline stage
or a lower one, and no modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "layerscope"
# Lowest first; a module may import its own stage and lower ones only.
STAGES = [
    {"errors", "names", "strictjson", "outputs", "tables", "__init__"},
    {"checkpoint"},
    {"spectral"},
    {"activations", "planning"},
    {"export"},
    {"runtime", "viz"},
    {"adapters", "experiments", "demo", "cli", "__main__"},
]


def _stage(module: str) -> int:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    found = [i for i, names in enumerate(STAGES) if head in names]
    assert found, f"{module}: top-level name {head!r} has no stage (add it to STAGES)"
    return found[0]


def _modules() -> dict[str, Path]:
    out = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            found = []
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + ".") \
                        and modules[target].name != "__init__.py":
                    targets.add(target)
        graph[name] = targets
    return graph


def test_no_import_runs_against_the_stage_order():
    upward = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _stage(b) > _stage(a)]
    assert not upward, upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in graph[node]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_dense_and_sparse_dispatch_agree_in_output_and_gradients():
    import torch

    from layerscope.runtime import layers

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16, dtype=torch.float64)  # float64: the two summation orders agree to ~1e-15
    module = layers.MoELoraLinear(base, 24, 16, experts=4, rank=3, top_k=2, lora_alpha=6.0)
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    results = []
    for width in (10**6, 0):  # everything dense, then everything sparse
        original = layers.DENSE_DISPATCH_MAX_WIDTH
        layers.DENSE_DISPATCH_MAX_WIDTH = width
        try:
            module.zero_grad()
            out = module(x)
            out.pow(2).sum().backward()
            results.append((out.detach(), module.lora_A.grad.clone(), module.lora_B.grad.clone(),
                            module.router.weight.grad.clone()))
        finally:
            layers.DENSE_DISPATCH_MAX_WIDTH = original
    for dense, sparse in zip(*results):
        torch.testing.assert_close(dense, sparse, rtol=1e-12, atol=1e-12)
