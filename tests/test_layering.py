"""The layering of DESIGN.md: imports flow one way, and the LM, the token loader and the training machinery run
on a machine that has torch but none of the media packages (the GPU machine is such a machine)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"lm", "encoders", "adapters", "llama3mm", "data", "train", "demo"}
# What each package may import from the project (itself always allowed).
ALLOWED = {
    "lm": set(),
    "encoders": set(),
    "adapters": {"lm", "encoders"},
    "llama3mm": {"lm", "encoders", "adapters"},
    "data": {"lm"},
    "train": PROJECT_PACKAGES,
    "demo": {"lm", "encoders", "adapters", "llama3mm", "data"},
}
# Third-party packages lm/ may import at all (DESIGN.md: torch, tiktoken, safetensors only).
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
        for root in imported_roots(path) - stdlib - LM_THIRD_PARTY - {"lm", "__future__"}
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
