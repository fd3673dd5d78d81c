"""The package's layout is its architecture: imports flow downhill.

* no import cycle among the package's modules, counting imports inside functions (an import hidden in
  a function to dodge a cycle is still an edge) and leaving out ``if TYPE_CHECKING:`` blocks;
* the library never imports the lab (:mod:`multiverse_kernels.bench`: benchmarks, roofline, timing,
  the GPU run), and the package root holds no lab tooling (the ``gpu_run`` entry point only forwards);
* native-library loading (``_native``) is at the bottom: it imports no other module of the package but
  the build helpers and the plan format.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "multiverse_kernels"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        tree = ast.parse(p.read_text())
        hints = {id(x) for b in ast.walk(tree)
                 if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test) for x in ast.walk(b)}
        for n in ast.walk(tree):
            if id(n) in hints:
                continue
            names: list[str] = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = base[: len(base) - (n.level - 1)]
                    prefix = ".".join(base + ([n.module] if n.module else []))
                else:
                    prefix = n.module or ""
                names = [prefix] + [f"{prefix}.{a.name}" for a in n.names]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != m and not m.startswith(name + "."):  # a package importing its own parts
                    graph[m].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    detail = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_library_does_not_import_the_lab():
    graph = _graph()
    lab = "multiverse_kernels.bench"
    for m, deps in graph.items():
        if m == lab or m.startswith(lab + ".") or m in ("multiverse_kernels.gpu_run",
                                                          "multiverse_kernels.testing"):
            continue  # the lab itself, the GPU entry point and the test helpers may use the lab
        bad = sorted(d for d in deps if d == lab or d.startswith(lab + "."))
        assert not bad, f"{m} (library) imports the lab: {bad}"


def test_package_root_holds_no_lab_tooling():
    root = {p.stem for p in PKG.glob("*.py")}
    for name in ("bench", "bench_sweep", "gpu_timing", "roofline"):
        assert name not in root, f"multiverse_kernels/{name}.py belongs in multiverse_kernels/bench/"
    shim = (PKG / "gpu_run.py").read_text()
    assert "from .bench.gpu_run import main" in shim and len(shim.splitlines()) < 10


def test_native_loading_is_at_the_bottom():
    graph = _graph()
    bottom = {"multiverse_kernels._jit", "multiverse_kernels.plan_format"}
    assert graph["multiverse_kernels._native"] <= bottom
    assert "multiverse_kernels._native" in graph["multiverse_kernels.planning"]
    assert not {d for d in graph["multiverse_kernels.planning"] if "backends" in d or "absorption" in d}
