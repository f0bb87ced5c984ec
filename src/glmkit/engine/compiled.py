"""A compiled one-token decode step for the single-sequence case (chat, generate, bench, serve).

The step is exported (torch.export) and compiled ahead of time by AOTInductor into a package: a shared
library with the weights inside, called from C++ with no Python-side guards or wrapper per token. Inductor's
freezing turns weight-only int8 matmuls into generated C++ micro-kernels; max-autotune picks among C++ GEMM
templates. One package serves every position and cache length (both are dynamic sizes: the position
comes in as the length of a marker tensor). Packages live in $GLMKIT_HOME/compiled, named by a hash of
the weights, the configuration, the traced code, torch, the CPU and the thread count, so compiling is paid
once per model and machine (1.3-1.8 min for the default model here) and a later run loads it in about
two seconds, weight hashing included. Compiling
can run in a background thread while the engine keeps decoding eagerly; any failure leaves eager
decoding in place. The step computes exactly what the model's forward computes; no sampling here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from glmkit.engine import packages
from glmkit.kv_cache import KVCache
from glmkit.model import Transformer

# torch.export's own use of a deprecated pytree class, not something a glmkit user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

PACKAGE_FORMAT = 1  # bump when DecodeStep's inputs or outputs change: old packages are then never picked up


class DecodeStep(torch.nn.Module):
    """The model's one-token step in an export-friendly signature: the cache as flat per-layer tensors
    (written in place) and the step's offset as the length of `attended` minus one, so it stays a dynamic size."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attended: torch.Tensor,
                *kv: torch.Tensor) -> torch.Tensor:
        layers = len(kv) // 2
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v = list(kv[:layers]), list(kv[layers:])  # (1, K, max_len, D) each
        h = self.model.hidden_states(tokens, positions, cache, attended.shape[0] - 1)  # (1, 1, C)
        return self.model.head(h)[:, -1]  # (1, V)


def inductor_options(model: Transformer) -> dict:
    """All-int8 dense models keep to the C++ GEMM templates (on a busy machine autotuning can wrongly prefer ATen's
    slower weight-only kernel); float ones may also use ATen's GEMMs. MoE models are not frozen: inductor's
    weight-only templates need constant weights, and an expert chosen at run time is a slice at a traced
    offset, which freezing cannot lower. On a GPU: inductor's defaults."""
    if model.device.type != "cpu":
        return {"freezing": True}

    if model.config.moe is not None:  # experts chosen at run time: weights stay inputs of the packed kernels
        return {"freezing": False}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or getattr(m, "bits", None)]
    int8 = bool(linears) and all(getattr(m, "bits", None) == 8 for m in linears)
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP" if int8 else "CPP,ATEN"}


def package_key(model: Transformer, options: dict, weight_files: list | None = None) -> str:
    """A hash of everything the compiled code depends on: the weights, the configuration, the module types and
    the source of the code traced, torch, the CPU's vector capability and the thread count (inductor bakes it
    into the code). The weights count by the identity (path, size, mtime) of the files they came from when
    those are known (a start-up reads no weight for this), else by every byte."""
    from glmkit import __version__

    h = hashlib.sha256()
    meta = {"format": PACKAGE_FORMAT, "glmkit": __version__, "torch": torch.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None,
            "options": options, "config": model.config.to_dict(),
            "modules": sorted({type(m).__name__ for m in model.modules()})}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for file in traced_sources(model):
        h.update(file.read_bytes())  # the code that is traced: a change must not reuse a package
    h.update(json.dumps(weight_files).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if not weight_files:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def _private(directory: Path) -> bool:
    """Packages are native code: only a folder this user owns and nobody else may write is trusted."""
    st = directory.stat()
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def traced_sources(model: Transformer) -> list[Path]:
    """The source files of the code a decode step runs: this module, the cache, and the module of every layer
    type in the model (a package's whole folder, e.g. quant/ with its packing helpers)."""
    files = {Path(__file__), Path(sys.modules[KVCache.__module__].__file__)}
    for kind in {type(m) for m in model.modules()}:
        source = getattr(sys.modules.get(kind.__module__), "__file__", None)
        if source is None or not kind.__module__.startswith("glmkit"):
            continue
        path = Path(source)
        files |= set(path.parent.glob("*.py")) if path.name == "__init__.py" else {path}
    return sorted(files)


class CompiledDecoder:
    """step(tokens (1, 1), positions, cache rows, start) -> logits (1, V), once `ready`. Packages live in
    `directory` ($GLMKIT_HOME/compiled as glmkit.load sets it up)."""

    def __init__(self, model: Transformer, directory: Path, label: str | None = None, weight_files: list | None = None,
                 on_ready=None):
        """label: which model this is (its source), recorded beside a package built for it; weight_files: the
        files the weights came from (package_key); on_ready(self): called once the step is usable."""
        self.model, self.directory, self.label = model, Path(directory), label
        self.weight_files, self.on_ready = weight_files, on_ready
        self.ready = False
        self.cached = False  # True when the package came from disk
        self.error: str | None = None
        self.seconds: float | None = None
        self.path: Path | None = None
        self._run = None
        self._attended = torch.empty(0, dtype=torch.uint8)
        self._thread: threading.Thread | None = None

    def compile(self, build: bool = True) -> "CompiledDecoder":
        """Load the package from disk, or export and compile it now (blocking); on failure stay eager.
        build=False only looks on disk: without a package, decoding stays eager and nothing is said."""
        if getattr(self.model, "tp", None) is not None:
            self.error = "a tensor-parallel model decodes eagerly (the compiled step holds no collectives)"
            return self
        if self.directory.exists() and not _private(self.directory):
            self.error = f"{self.directory} is writable by other users; glmkit loads no compiled code from it"
            warnings.warn(f"{self.error} (chmod 700 it); decoding stays eager.", stacklevel=2)
            return self
        if not build and not any(self.directory.glob("decode-*.pt2")):  # nothing could match: skip hashing the weights
            self.error = "no compiled package on disk (glmkit compile builds one)"
            return self
        try:
            t0 = time.perf_counter()
            options = inductor_options(self.model)
            self.path = self.directory / f"decode-{package_key(self.model, options, self.weight_files)}.pt2"
            runner = self._load() if self.path.exists() else None
            self.cached = runner is not None
            if runner is None and not build:
                self.error = "no compiled package on disk for this model (glmkit compile builds one)"
                return self
            if runner is None:
                self._build(options)
                runner = self._load(strict=True)
                packages.record(self.path, self.label)
                packages.collect_garbage(self.directory)  # stale packages of this model (and others) go
            else:
                packages.touch(self.path)
            # the loader's own entry point: the Python wrapper around it re-flattens the inputs on every call
            self._run, self.ready, self.seconds = runner.loader.boxed_run, True, time.perf_counter() - t0
            if self.on_ready is not None:
                self.on_ready(self)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: keep decoding eagerly
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"the compiled decode step is unavailable ({self.error}); decoding stays eager.",
                          stacklevel=2)
        return self

    def _load(self, strict: bool = False):
        """The package's runner; a package that does not load (truncated, from another build) is removed
        and rebuilt, unless it was just built (strict)."""
        try:
            return torch._inductor.aoti_load_package(str(self.path))
        except Exception:
            if strict:
                raise
            self.path.unlink(missing_ok=True)
            return None

    def _build(self, options: dict) -> None:
        from torch.export import Dim

        c, m = self.model.config, self.model
        cache = KVCache(c, 1, 16, dtype=m.dtype, device=m.device)
        kv = tuple(cache.k + cache.v)
        shape = {"2d": (1, 2, 1), "mrope": (1, 3, 1)}.get(c.positions, (1, 1))
        example = (torch.zeros(1, 1, dtype=torch.long, device=m.device),
                   torch.full(shape, 5, dtype=torch.long, device=m.device), torch.empty(6, dtype=torch.uint8))
        attended, max_len = Dim("attended", min=2, max=1 << 20), Dim("max_len", min=2, max=1 << 20)
        dynamic = ({}, {}, {0: attended}, tuple({2: max_len} for _ in kv))
        with torch.no_grad():
            program = torch.export.export(DecodeStep(self.model).eval(), example + kv, dynamic_shapes=dynamic,
                                          strict=False)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: packages are native code
        partial = self.path.with_name(f".partial-{os.getpid()}-{self.path.name}")  # must end in .pt2
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
            os.replace(partial, self.path)  # complete packages only: an interrupted compile leaves nothing behind
        finally:
            partial.unlink(missing_ok=True)

    def compile_in_background(self, build: bool = True) -> "CompiledDecoder":
        def run() -> None:
            # yield the CPU to decoding: the lowest priority for this thread and the compilers it starts, and
            # one compile worker, so eager decoding's threads are not starved while the step compiles
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            import torch._inductor.config as inductor

            inductor.compile_threads = 1
            self.compile(build)

        self._thread = threading.Thread(target=run, name="glmkit-compile", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def usable(self, start: int) -> bool:
        """The package was exported for steps with at least one cached position."""
        return self.ready and start >= 1

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        if self._attended.numel() <= start:
            self._attended = torch.empty(2 * (start + 1), dtype=torch.uint8)
        # the package assumes contiguous inputs (an expanded view would be read as if it were not)
        return self._run([tokens.contiguous(), positions.contiguous(), self._attended[: start + 1], *cache.k, *cache.v])[0]
