"""The package's imports point one way (docs/architecture.md, "Layers").

Read from the source with ``ast`` (function-level imports included; imports under
``if TYPE_CHECKING:`` are types only and skipped):
- kernels and methods import neither vLLM nor any other part of the package but the
  shared pure modules; kernels never import methods;
- the scheduler side never imports the worker side and the worker side never the
  scheduler side: what crosses between them is in ``protocol``;
- protocol and the shared modules import neither side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_adakv"
PURE = {"vllm_adakv.tensors", "vllm_adakv.kernels", "vllm_adakv.methods"}
SHARED = {"vllm_adakv.config", "vllm_adakv.memory", "vllm_adakv.decode_plan",
          "vllm_adakv.overrides", "vllm_adakv.metrics", "vllm_adakv.protocol", *PURE}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` (module ``module``) imports at run time."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    here = (module or _module(path)).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base != "vllm_adakv":  # "from vllm_adakv import kernels" names the submodule
                names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _under(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


MODULES = {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_layout_is_what_this_test_expects():
    for side in ("vllm_adakv.scheduler", "vllm_adakv.worker", "vllm_adakv.kernels",
                 "vllm_adakv.methods", "vllm_adakv.protocol"):
        assert side in MODULES, side
    # the parser resolves relative imports: methods import their siblings
    assert "vllm_adakv.methods.snapkv" in MODULES["vllm_adakv.methods.adakv"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, PURE)))
def test_kernels_and_methods_import_no_vllm_and_no_side(module):
    own = [n for n in MODULES[module] if _under(n, {"vllm_adakv"})]
    assert not [n for n in MODULES[module] if _under(n, {"vllm"})], module
    assert all(_under(n, PURE) for n in own), (module, own)
    if _under(module, {"vllm_adakv.kernels"}):
        assert not [n for n in own if _under(n, {"vllm_adakv.methods"})], module


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, SHARED - PURE)))
def test_shared_modules_import_no_side(module):
    sides = {"vllm_adakv.scheduler", "vllm_adakv.worker", "vllm_adakv.patches",
             "vllm_adakv.plugin", "vllm_adakv.cli"}
    assert not [n for n in MODULES[module] if _under(n, sides)], module


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if _under(m, {"vllm_adakv.scheduler"})))
def test_scheduler_side_never_imports_the_worker_side(module):
    assert not [n for n in MODULES[module] if _under(n, {"vllm_adakv.worker"})], module


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if _under(m, {"vllm_adakv.worker"})))
def test_worker_side_never_imports_the_scheduler_side(module):
    assert not [n for n in MODULES[module] if _under(n, {"vllm_adakv.scheduler"})], module


def test_the_parser_sees_what_the_checks_need(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    import vllm\n"
                   "def f():\n    from vllm_adakv.worker import batch\n"
                   "from ..worker.context import current\n")
    names = _imports(bad, "vllm_adakv.scheduler.bad")
    assert "vllm_adakv.worker.batch" in names  # inside a function
    assert "vllm_adakv.worker.context.current" in names  # relative
    assert not [n for n in names if _under(n, {"vllm"})]  # types only
