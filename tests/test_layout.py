"""The import rules of DESIGN.md (both columns: what a module may import, and what it must not), and the
console entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "glmkit"

# DESIGN.md's table. Every module may also import the standard library (unless MUST_NOT says otherwise),
# glmkit.errors and glmkit.config (the bottom layers), and its own package. "model" stands for the model
# group of the table's row (model, moe, positions, kv_cache). loaders' third-party extras: numpy (gguf's arrays)
# and huggingface_hub (hub.py's downloads).
MODEL = ["glmkit.model", "glmkit.layers", "glmkit.mla", "glmkit.moe", "glmkit.positions", "glmkit.kv_cache",
         "glmkit.vision"]
MAY = {
    "config": [],
    "model": ["torch", "glmkit.kv_cache", "glmkit.moe", "glmkit.layers", "glmkit.mla", "glmkit.vision"],
    "vision": ["torch", "glmkit.layers"],
    "layers": ["torch", "glmkit.kv_cache"],
    "mla": ["torch", "glmkit.layers"],
    "moe": ["torch"],
    "positions": ["torch"],
    "kv_cache": ["torch"],
    "loaders": ["torch", "safetensors", "gguf", "numpy", "huggingface_hub", "glmkit.quant", "glmkit.parallel", "tqdm"],
    "quant": ["torch"],
    "chat": ["jinja2", "glmkit.tokenizer"],
    "engine": ["torch", *MODEL, "glmkit.forward", "glmkit.parallel"],
    "llm": ["torch", "typing_extensions", "glmkit.loaders", *MODEL, "glmkit.chat", "glmkit.engine", "glmkit.tokenizer",
            "glmkit.quant", "glmkit.adapters", "glmkit.grammar", "glmkit.forward",
            "glmkit.infill", "glmkit.images", "glmkit.parallel"],
    "server": ["glmkit.llm", "glmkit.engine", "glmkit.chat", "glmkit.tokenizer", "fastapi", "uvicorn", "starlette",
               "pydantic", "prometheus_client", "glmkit.parallel"],
    "train": ["torch", "safetensors", "tqdm", *MODEL, "glmkit.loaders", "glmkit.tokenizer", "glmkit.chat",
              "glmkit.adapters"],
    # not rows of DESIGN's table, held to the same standard
    "tokenizer": ["sentencepiece", "tiktoken", "tokenizers", "google.protobuf"],
    "adapters": ["torch", "safetensors", "glmkit.loaders", "glmkit.quant"],
    "grammar": ["torch", "llguidance", "glmkit.tokenizer"],
    "forward": ["torch", *MODEL],
    "infill": [],
    "images": ["torch", "PIL", "glmkit.chat"],
    "parallel": ["torch"],
}
MUST_NOT = {
    "config": ["torch", "glmkit.model", "glmkit.engine", "glmkit.loaders", "glmkit.llm"],
    "chat": ["torch", "glmkit.model", "glmkit.engine"],
    "errors": ["torch"],
    "model": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.train", "glmkit.llm",
              "safetensors", "json", "pathlib", "os"],
    "positions": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "json", "pathlib", "os"],
    "moe": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.model", "json", "pathlib",
            "os"],
    "layers": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.model", "json", "pathlib", "os"],
    "mla": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.model", "json", "pathlib", "os"],
    "kv_cache": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.model"],
    "loaders": ["glmkit.engine", "glmkit.server", "glmkit.train", "glmkit.model", "glmkit.llm"],
    "quant": ["glmkit.engine", "glmkit.server", "glmkit.train"],
    "engine": ["glmkit.server", "glmkit.cli", "glmkit.train", "glmkit.loaders", "fastapi", "uvicorn", "starlette",
               "httpx"],
    "llm": ["glmkit.server", "glmkit.cli", "glmkit.train"],
    "server": ["glmkit.train", "glmkit.cli"],
    "train": ["glmkit.server", "glmkit.cli"],
    "grammar": ["glmkit.engine", "glmkit.model", "glmkit.chat", "glmkit.server", "glmkit.llm"],
    "forward": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.server", "glmkit.llm"],
    "vision": ["glmkit.loaders", "glmkit.tokenizer", "glmkit.engine", "glmkit.model", "json", "pathlib", "os"],
    "images": ["glmkit.model", "glmkit.engine", "glmkit.server", "glmkit.llm"],
}
EVERYONE = ["__future__", "glmkit.errors", "glmkit.config", "glmkit.__version__"]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions ('from glmkit import x' counts as glmkit.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "glmkit":
                names.update(f"glmkit.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return names


def _files(module: str) -> list[Path]:
    """The files of a module or package, entry points (__main__.py) aside."""
    if (SRC / f"{module}.py").exists():
        return [SRC / f"{module}.py"]
    return sorted(p for p in (SRC / module).rglob("*.py") if p.name != "__main__.py")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("module", sorted(set(MAY) | set(MUST_NOT)))
def test_rule_names_a_module_that_exists(module):
    assert _files(module), f"the import rules name {module!r}, which is not a module of src/glmkit"
    for allowed in (MAY.get(module, []) + MUST_NOT.get(module, [])):
        if allowed.startswith("glmkit."):
            assert _files(allowed.split(".")[1]), f"the rule for {module} names {allowed}, which does not exist"


@pytest.mark.parametrize("module", sorted(MUST_NOT))
def test_must_not_import(module):
    for path in _files(module):
        for name in _imports(path):
            for bad in MUST_NOT[module]:
                assert not _under(name, bad), f"{path.relative_to(SRC)} imports {name}, which DESIGN.md forbids"


@pytest.mark.parametrize("module", sorted(MAY))
def test_may_import_only_what_the_table_allows(module):
    allowed = MAY[module] + EVERYONE + [f"glmkit.{module}"]
    for path in _files(module):
        for name in _imports(path):
            top = name.split(".")[0]
            if top != "glmkit" and top in sys.stdlib_module_names:
                continue
            assert name != "glmkit", f"{path.relative_to(SRC)} imports the glmkit package itself"
            assert any(_under(name, ok) for ok in allowed), \
                f"{path.relative_to(SRC)} imports {name}, which DESIGN.md does not allow {module} to import"


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
