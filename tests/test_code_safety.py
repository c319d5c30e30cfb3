"""No code path of ours unpickles, evaluates or shells out with what a peer or a file sent: a scan
of every Python file we ship or run (docs/security.md). Ray pickles inside its own cluster; that
is Ray's trusted network, not our wire or our files."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("protocol/src", "server/src", "client/src", "bench", "scripts")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}
UNSAFE_CALLS = {"eval", "exec", "pickle.loads", "pickle.load", "yaml.load", "pd.read_pickle"}
# Loaders that must say they will not unpickle: function -> (keyword, required value).
GUARDED_LOADS = {"np.load": ("allow_pickle", False), "torch.load": ("weights_only", True)}


def python_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def findings(source: str, name: str = "<snippet>") -> Iterator[str]:
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            modules += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.split(".")[0] in UNSAFE_MODULES:
                    yield f"{name}:{node.lineno}: imports {module}"
        if isinstance(node, ast.Call):
            yield from call_findings(node, name)


def call_findings(call: ast.Call, name: str) -> Iterator[str]:
    function = dotted(call.func).replace("numpy.", "np.")
    where = f"{name}:{call.lineno}"
    if function in UNSAFE_CALLS:
        yield f"{where}: calls {function}"
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    for keyword, value in keywords.items():
        if keyword == "allow_pickle" and not is_constant(value, False):
            yield f"{where}: allow_pickle other than False"
        if keyword == "shell" and not is_constant(value, False):
            yield f"{where}: subprocess with shell"
    if function in GUARDED_LOADS:
        keyword, required = GUARDED_LOADS[function]
        if keyword not in keywords or not is_constant(keywords[keyword], required):
            yield f"{where}: {function} without {keyword}={required}"


def is_constant(node: ast.expr, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_scan_covers_our_code() -> None:
    files = python_files()
    assert len(files) > 80
    assert any(path.name == "decoder.py" for path in files)
    assert any(path.name == "libero_env.py" for path in files)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from cloudpickle import loads",
        "eval(text)",
        "np.load(path)",
        "numpy.load(path, allow_pickle=True)",
        "torch.load(path)",
        "subprocess.run(cmd, shell=True)",
        "yaml.load(stream)",
    ],
)
def test_the_scan_finds_planted_hazards(snippet: str) -> None:
    assert list(findings(snippet)), snippet


def test_no_unpickling_eval_or_shell_anywhere() -> None:
    found = [
        finding
        for path in python_files()
        for finding in findings(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []
