"""Helper of the build tests: a file that setup.py loads by path must work without torch."""
from __future__ import annotations

import subprocess
import sys


def run_without_torch(path: str, expr: str) -> str:
    """Load the module at ``path`` by path in a fresh python where ``import torch`` fails, and return the
    printed value of ``expr`` (``m`` is the module); fails the test if it needs torch or raises."""
    src = open(path).read()
    assert not any(line.strip().startswith(("import torch", "from torch")) for line in src.splitlines()), path
    code = ("import sys, importlib.util; sys.modules['torch'] = None; "
            f"spec = importlib.util.spec_from_file_location('b', {path!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m); "
            f"print({expr})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()
