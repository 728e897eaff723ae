"""The `-m gpu` tests skip on this machine, so nothing here would notice one that cannot run at all
(it once lost its `@pytest.fixture` and every test errored on a GPU). This checks, without a GPU,
that every argument of every gpu test is a fixture or a parametrized name that pytest can supply."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GPU_FILES = sorted(p for p in TESTS.glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
BUILTIN = {"request", "tmp_path", "tmp_path_factory", "monkeypatch", "caplog", "capsys", "capfd", "recwarn",
           "pytestconfig"}


def _decorator_name(d: ast.expr) -> str:
    d = d.func if isinstance(d, ast.Call) else d
    return ast.unparse(d)


def _fixtures(tree: ast.Module) -> set[str]:
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
            and any(_decorator_name(d) in ("pytest.fixture", "fixture") for d in f.decorator_list)}


def _parametrized(fn: ast.FunctionDef) -> set[str]:
    names = set()
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and _decorator_name(d) == "pytest.mark.parametrize":
            first = ast.literal_eval(d.args[0])
            names |= set(first) if isinstance(first, (tuple, list)) else {n.strip() for n in first.split(",")}
    return names


def test_there_are_gpu_test_files():
    assert {p.name for p in GPU_FILES} >= {"test_kernels_gpu.py", "test_cuda_runtime.py"}


@pytest.mark.parametrize("path", GPU_FILES, ids=lambda p: p.name)
def test_every_gpu_test_argument_has_a_provider(path):
    tree = ast.parse(path.read_text())
    shared = _fixtures(ast.parse((TESTS / "conftest.py").read_text())) | BUILTIN
    provided = _fixtures(tree) | shared
    missing = []
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
            for arg in fn.args.args:
                if arg.arg not in provided | _parametrized(fn):
                    missing.append(f"{fn.name}({arg.arg})")
        if isinstance(fn, ast.FunctionDef) and fn.name in _fixtures(tree):
            missing += [f"fixture {fn.name}({a.arg})" for a in fn.args.args if a.arg not in provided]
    assert missing == []
