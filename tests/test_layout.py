"""The import rules of DESIGN.md, and the console entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "glmkit"

# module (file or package under src/glmkit) -> import prefixes it must not use
FORBIDDEN = {
    "config": ["torch", "glmkit.model", "glmkit.engine", "glmkit.loaders", "glmkit.llm"],
    "presets": ["torch", "glmkit.model", "glmkit.engine"],
    "chat_format": ["torch", "glmkit.model", "glmkit.engine"],
    "errors": ["torch"],
    "model": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.train", "glmkit.llm",
              "safetensors", "json", "pathlib", "os"],
    "kv_cache": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.model"],
    "loaders": ["glmkit.engine", "glmkit.server", "glmkit.train", "glmkit.model", "glmkit.llm"],
    "quant": ["glmkit.engine", "glmkit.server"],
    "engine": ["glmkit.server", "glmkit.cli", "glmkit.train", "fastapi", "uvicorn", "starlette", "httpx"],
    "server": ["glmkit.train"],
    "train": ["glmkit.server"],
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(module: str) -> list[Path]:
    return [SRC / f"{module}.py"] if (SRC / f"{module}.py").exists() else sorted((SRC / module).rglob("*.py"))


@pytest.mark.parametrize("module", list(FORBIDDEN))
def test_import_rules(module):
    for path in _files(module):
        for name in _imports(path):
            for bad in FORBIDDEN[module]:
                assert not (name == bad or name.startswith(bad + ".")), \
                    f"{path.relative_to(SRC)} imports {name}, which DESIGN.md forbids for {module}"


def test_nothing_imports_cli():
    for path in SRC.rglob("*.py"):
        if "cli" not in path.relative_to(SRC).parts and path.name != "__main__.py":  # __main__ is an entry point
            assert not any(n.startswith("glmkit.cli") for n in _imports(path)), path


def test_config_import_loads_no_torch():
    code = "import sys, glmkit.config, glmkit; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "glmkit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("glmkit ")
    bad = subprocess.run([sys.executable, "-m", "glmkit", "generate", "/nonexistent/model", "--prompt", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
