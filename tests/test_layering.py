"""The user's model pays for what it uses: flashgen.attention imports neither the tuner nor the database."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.cpu_interpreter
def test_the_runtime_path_does_not_import_optuna_or_sqlalchemy(tmp_path):
    # A user who never tuned: no database file (the default one may exist on a developer's machine).
    code = (
        "import sys, torch, flashgen\n"
        "q = torch.randn(1, 1, 16, 16, dtype=torch.float16)\n"
        "flashgen.attention(q, q, q)\n"
        "print(sorted(m for m in ('optuna', 'sqlalchemy', 'flashgen.tuner', 'flashgen.db') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "TRITON_INTERPRET": "1",
                                 "FLASHGEN_DB": f"sqlite:///{tmp_path / 'never-tuned.sqlite3'}"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_only_the_tuner_imports_optuna_at_module_level():
    package = Path(__file__).resolve().parent.parent / "flashgen"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "optuna" for name in names):
                importers.add(path.name)
    assert importers == {"tuner.py"}


def test_reading_the_shipped_caches_needs_no_sqlalchemy():
    code = (
        "import sys, flashgen.dispatch as d\n"
        "sources = d._shipped_sources()\n"
        "print(sum(len(entries) for _, entries in sources) > 0, 'sqlalchemy' in sys.modules, 'optuna' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]
