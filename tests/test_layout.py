"""The package's architecture, enforced: which parts may import which, no import cycles, and no deferred import of
a slimtune module except one that needs an optional dependency (triton).

Read from the source with ``ast`` (nothing is imported). The allowed directions, bottom to top:

* ``errors``, ``version`` — nothing;
* ``core`` — errors only: the machinery every method shares knows no method;
* ``quant`` — core (4-bit storage registers its layers with ``core.frozen``);
* ``methods/<name>`` — core, and its own package; nothing of another method, except DoRA from LoRA;
* ``methods`` (the package) — the method packages (registration);
* ``models`` — core, methods; ``memory`` — core, quant, methods, models;
* ``compat`` (PEFT's API), ``interop`` (other checkpoint formats), ``ranks`` (rank allocation), ``train`` (the
  training loop) — the layers users call, on top of those (see ``ALLOWED``);
* ``cli`` and the package root — anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "slimtune"
OPTIONAL = {"triton"}  # third-party packages a deferred import may be waiting for


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The slimtune modules an ``import from`` names (``from . import a, b`` names modules a and b)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("slimtune"):
        return []
    found = []
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        found.append(candidate if candidate in MODULES else target)
    return found


class _Imports(ast.NodeVisitor):
    """Collects a module's imports, split by whether they run at import time or inside a function."""

    def __init__(self, name: str, is_package: bool) -> None:
        self.name, self.is_package, self.depth = name, is_package, 0
        self.top: set[str] = set()
        self.deferred: set[str] = set()
        self.third: set[str] = set()

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def _add(self, slimtune: list[str], third_party: list[str]) -> None:
        (self.deferred if self.depth else self.top).update(slimtune)
        if not self.depth:
            self.third.update(third_party)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        targets = resolve(self.name, self.is_package, node)
        self._add(targets, [] if targets or node.level else [(node.module or "").split(".")[0]])

    def visit_Import(self, node: ast.Import) -> None:
        names = [alias.name for alias in node.names]
        self._add([n for n in names if n.startswith("slimtune")],
                  [n.split(".")[0] for n in names if not n.startswith("slimtune")])


def scan() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """``(import-time imports, deferred imports, third-party roots imported at import time)`` per module."""
    top: dict[str, set[str]] = {}
    deferred: dict[str, set[str]] = {}
    third: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        top[name], deferred[name], third[name] = visitor.top, visitor.deferred, visitor.third
    return top, deferred, third


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}
TOP, DEFERRED, THIRD = scan()


def part(module: str) -> str:
    """``core``, ``quant``, ``methods.<name>``, ``methods``, ``models``, ``memory``, ``cli``, ``errors``, ... """
    parts = module.split(".")[1:]
    if not parts:
        return "root"
    if parts[0] == "methods" and len(parts) > 1:
        return f"methods.{parts[1]}"
    return parts[0]


ALLOWED = {
    "errors": set(), "version": set(),
    "core": {"core", "errors"},
    "quant": {"quant", "core", "errors"},
    "models": {"models", "core", "methods", "errors"},
    "memory": {"memory", "core", "quant", "methods", "models", "errors", "version"},
    "methods": {"methods"},
    # the user-facing layers built on the library (each may grow its own package):
    "compat": {"compat", "core", "methods", "quant", "errors", "version"},  # PEFT's API spelled by slimtune
    "interop": {"interop", "core", "methods", "errors"},  # other ecosystems' checkpoint formats (kohya / LyCORIS)
    "ranks": {"ranks", "core", "methods", "models", "errors"},  # rank allocation under a budget
    "train": {"train", "core", "quant", "methods", "models", "memory", "ranks", "compat", "errors", "version"},
    "cli": None, "root": None, "__main__": None,
}


def allowed_parts(source: str) -> set[str] | None:
    if source.startswith("methods."):
        own = {source, "core", "errors"}
        return own | {"methods.lora"} if source == "methods.dora" else own
    return ALLOWED[source]


def test_every_part_is_known():
    methods = {f"methods.{n}" for n in ("lora", "dora", "hra", "loha", "lokr")}
    assert {part(m) for m in MODULES} - methods <= set(ALLOWED)


def may_import(source: str, target: str) -> bool:
    """Whether a module of part ``source`` may import one of part ``target``."""
    allowed = allowed_parts(source)
    if allowed is None or target == source:
        return True
    if target.startswith("methods"):  # a method package, or the package that registers them all
        return (source in ("methods", "models", "memory", "compat", "interop", "ranks", "train")
                or (source, target) == ("methods.dora", "methods.lora"))
    return target in allowed


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_allowed_directions(module):
    source = part(module)
    wrong = sorted(t for t in TOP[module] | DEFERRED[module] if not may_import(source, part(t)))
    assert not wrong, f"{module} ({source}) may import only {sorted(allowed_parts(source) or ())}, imports {wrong}"


def test_methods_import_core_and_not_each_other():
    for module in MODULES:
        source = part(module)
        if not source.startswith("methods."):
            continue
        others = {part(t) for t in TOP[module] | DEFERRED[module]} - {source, "core", "errors"}
        assert others <= ({"methods.lora"} if source == "methods.dora" else set()), (module, others)


def test_no_import_cycles():
    graph = {m: {t for t in TOP[m] if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _needs_optional(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` imports an optional dependency (directly or through slimtune modules)."""
    seen = set() if seen is None else seen
    if module in seen or module not in MODULES:
        return False
    seen.add(module)
    return bool(THIRD[module] & OPTIONAL) or any(_needs_optional(t, seen) for t in TOP[module])


def test_deferred_imports_only_wait_for_optional_dependencies():
    """A function-level import of a slimtune module must not dodge a cycle: it is allowed only where the module
    imports triton (absent from CPU installs), so that code reaches it only behind ``use_triton``."""
    bad = sorted((m, t) for m in MODULES for t in DEFERRED[m] if t in MODULES and not _needs_optional(t))
    assert not bad, f"deferred imports of slimtune modules that need no optional dependency: {bad}"


def test_method_files_stay_small():
    """One idea per file: no adapter-method file over ~300 lines."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "methods").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 320}
    assert not long, long


def test_each_triton_kernel_module_sits_beside_its_reference():
    """Every module that imports triton lives in a method's folder (or quant, or core for the lean frozen layers, or
    memory for the chunked loss) beside the PyTorch reference a CPU test compares it with."""
    kernels = sorted(m for m in MODULES if THIRD[m] & OPTIONAL)
    assert kernels == ["slimtune.core.triton_rms_norm", "slimtune.core.triton_swiglu",
                       "slimtune.memory.triton_cross_entropy", "slimtune.methods.dora.triton_kernels",
                       "slimtune.methods.dora.triton_norm", "slimtune.methods.dora.triton_prepass",
                       "slimtune.methods.loha.triton_kernels", "slimtune.quant.nf4_triton"]
    tests = Path(__file__).resolve().parent
    for test in ("core/test_rms_norm.py", "core/test_swiglu.py", "memory/test_chunked_loss.py",
                 "methods/dora/test_triton_kernels.py",
                 "methods/dora/test_prepass.py", "methods/loha/test_triton_kernels.py", "quant/test_nf4.py"):
        assert (tests / test).is_file(), test
