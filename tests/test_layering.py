"""The layering of docs/ARCHITECTURE.md: imports flow one way with no cycle, and the LM, the token loader and the
training machinery run on a machine that has torch but none of the media packages (the GPU machine is such a
machine)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"common", "lm", "encoders", "adapters", "llama3mm", "data", "train", "demo", "evaluation"}
# What each package may import from the project (itself always allowed).
ALLOWED = {
    "common": set(),
    "lm": {"common"},
    "encoders": {"common"},
    "adapters": {"common", "lm", "encoders"},
    "llama3mm": {"common", "lm", "encoders", "adapters"},
    "data": {"common", "lm"},
    "train": PROJECT_PACKAGES,
    "demo": {"common", "lm", "encoders", "adapters", "llama3mm", "data"},
    # Scores models: reads any checkpoint the project writes (train.average's reader of runs and LM directories).
    "evaluation": {"common", "lm", "llama3mm", "data", "train"},
}
# Third-party packages lm/ may import at all (docs/ARCHITECTURE.md: torch, tiktoken, safetensors only).
LM_THIRD_PARTY = {"torch", "tiktoken", "safetensors"}


def imported_roots(path: Path) -> set[str]:
    """Top-level module names a file imports (absolute imports only; the project uses no relative ones)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_project_imports_flow_one_way():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for root in imported_roots(path) & PROJECT_PACKAGES - {package} - allowed:
                violations.append(f"{path.relative_to(ROOT)} imports {root}")
    assert not violations, violations


def test_lm_imports_only_torch_tiktoken_safetensors():
    stdlib = set(sys.stdlib_module_names)
    foreign = {
        f"{path.relative_to(ROOT)}: {root}"
        for path in sorted((ROOT / "lm").rglob("*.py"))
        for root in imported_roots(path) - stdlib - LM_THIRD_PARTY - {"lm", "common", "__future__"}
    }
    # xformers is the optional CUDA extra, imported only where it loads.
    assert {f for f in foreign if not f.endswith(": xformers")} == set()


def test_training_core_imports_with_torch_alone():
    """Block the media and peer packages and import everything a GPU LM run needs."""
    blocked = ["webdataset", "open_clip", "torchaudio", "torchvision", "av", "gradio", "soundfile", "PIL"]
    blocked += ["transformers", "matplotlib", "pyarrow", "llama_models"]
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import lm, lm.generate, lm.checkpoint, data.loader, data.mixture
import train.loop, train.checkpoint, train.config, train.metrics, train.optim, train.parallel
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def module_name(path: Path) -> str:
    """``lm/model.py`` -> ``lm.model``; ``lm/__init__.py`` -> ``lm``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Project modules a file imports anywhere (function-level imports too), outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names & modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports; a module importing its own parent package is not an edge (the
    package's ``__init__`` runs first either way)."""
    paths = {
        module_name(p): p
        for package in PROJECT_PACKAGES
        if (ROOT / package).is_dir()
        for p in (ROOT / package).rglob("*.py")
    }
    modules = set(paths)
    return {
        name: {dep for dep in imported_modules(path, modules) if dep != name and not name.startswith(dep + ".")}
        for name, path in paths.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan): every import cycle, however long."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    """docs/ARCHITECTURE.md: modules form a tree of dependencies, function-level imports included."""
    assert import_cycles(import_graph()) == []


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


MAX_FUNCTION_LINES = 80


def test_functions_read_at_a_glance():
    """docs/ARCHITECTURE.md: no function of the project (bench/ and tests/ aside) is longer than 80 lines."""
    long = []
    for package in sorted(PROJECT_PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_only_public_names_cross_modules():
    """docs/ARCHITECTURE.md: a module imports another's public names only (no `from lm.generate import _x`)."""
    private = []
    for package in sorted(PROJECT_PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] in PROJECT_PACKAGES:
                        names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                        private += [f"{path.relative_to(ROOT)}: from {node.module} import {n}" for n in names]
    assert private == []
