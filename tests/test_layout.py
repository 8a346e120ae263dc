"""The package layout: no import cycles in ``hilt/`` (module-level and function-level imports alike), and
every entry point README.md shows still works after the move to ``hilt/training/``."""
from __future__ import annotations

import ast
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- import cycles

def module_files(root: Path, package: str = "hilt") -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` under ``root/package`` (``__init__.py`` is the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str = "hilt") -> dict[str, set[str]]:
    """{module: the package modules it imports}, from every ``import`` / ``from ... import`` anywhere in the
    file (module level, inside functions and classes). ``from a import b`` counts as importing ``a.b`` when
    that is a module, else ``a``; an edge goes to the named module only (not to its parent packages)."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in files:  # `import a.b.c` where only a.b is ours
                        target = target.rpartition(".")[0]
                    if target:
                        edges.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = name.split(".") if is_pkg else name.split(".")[:-1]
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in files:
                        edges.add(sub)
                    elif base in files:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def tangled(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each module in one can reach every
    other through imports: the modules of one or more cycles), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(sorted(c) for c in sccs)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through the first module of each :func:`tangled` component."""
    cycles = []
    for comp in tangled(graph):  # a shortest path back to the start within the component
        members, start = set(comp), min(comp)
        prev, frontier = {start: None}, [start]
        while frontier:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        path = [v]
                        while prev[path[-1]] is not None:
                            path.append(prev[path[-1]])
                        cycles.append(list(reversed(path)) + [start])
                        nxt = []
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                else:
                    continue
                break
            frontier = nxt
    return cycles


def test_no_import_cycles_in_hilt():
    graph = import_graph(ROOT)
    assert "hilt.models.gpt" in graph and len(graph) > 20  # the scan sees the package
    cycles = find_cycles(graph)
    assert not cycles, ("import cycles in hilt/, e.g.:\n" + "\n".join(" -> ".join(c) for c in cycles)
                        + "\nmodules tangled together: " + "; ".join(", ".join(c) for c in tangled(graph)))


def test_the_cycle_scan_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("class C:\n    def m(self):\n        from . import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
    (pkg / "c.py").write_text("import pkg.sub\n")  # the cycle broken: pkg.c -> pkg.sub only
    assert find_cycles(import_graph(tmp_path, "pkg")) == []


def test_models_do_not_import_the_hf_adapter_or_the_registry_consumers():
    graph = import_graph(ROOT)
    assert "hilt.hf" not in graph["hilt.models.npt"]
    assert "hilt.models.registry" in graph["hilt.training.checkpoint"]
    assert not any(m.startswith("hilt.training") for m in graph["hilt.models.registry"])


# ----------------------------------------------------------------------------------- README entry points

def run_module_help(module: str, capsys) -> str:
    """``python -m <module> --help`` in this process (runpy, as ``-m`` does): exit code 0 and the usage."""
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": it was imported before
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module, prog, option", [
    ("hilt.train", "python -m hilt.train", "--max-steps"),
    ("hilt.ablate", "python -m hilt.ablate", "--seeds"),
    ("hilt.npt_train", "python -m hilt.npt_train", "--curriculum"),
])
def test_python_dash_m_entry_points(module, prog, option, capsys):
    out = run_module_help(module, capsys)
    assert out.startswith(f"usage: {prog}") and option in out


def test_torchrun_npt_train_help():
    """``torchrun -m hilt.npt_train`` (``torchrun -m hilt.train`` runs end to end in tests/training/test_ddp.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "0",
                        "-m", "hilt.npt_train", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "python -m hilt.npt_train" in r.stdout and "--curriculum" in r.stdout


def test_readme_module_paths_import():
    import hilt
    import hilt.checkpoint
    import hilt.data
    import hilt.generate
    import hilt.hf
    import hilt.reasoning
    import hilt.train
    from hilt.training import checkpoint, data, lformer, loop

    assert hilt.train.train is loop.train and callable(hilt.train.main)
    assert hilt.train.TrainConfig().model == "hilt"
    assert hilt.data.decode(hilt.data.encode("héllo")) == "héllo" and hilt.data.encode is data.encode
    assert hilt.checkpoint.load is checkpoint.load and hilt.load.__module__ == "hilt"
    assert hilt.reasoning.LFormerTraining is lformer.LFormerTraining
    assert callable(hilt.generate.generate) and callable(hilt.hf.convert_hf_llama_to_npt)
