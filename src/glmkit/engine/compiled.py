"""Compiled decode steps: one for a single sequence (chat, generate, bench, serve with one stream) and one
for 2..MAX_ROWS cache rows at their own offsets (continuous batching's decode step).

Each step is exported (torch.export) and compiled ahead of time by AOTInductor into a package: a shared
library with the weights inside, called from C++ with no Python-side guards or wrapper per token. Inductor's
freezing turns weight-only int8 matmuls into generated C++ micro-kernels; max-autotune picks among C++ GEMM
templates. One package serves every position and cache length, and the rows step every batch size up to
MAX_ROWS (all dynamic sizes: the attended length comes in as the length of a marker tensor). Packages live in
$GLMKIT_HOME/compiled, named by a hash of the weights' files, the configuration, the traced code, torch, the CPU
and the thread count, so compiling is paid once per model and machine (1.3-1.8 min per step for the default
model here) and a later run loads them in about two seconds. Compiling can run in a background thread while the
engine keeps decoding eagerly (the one-row step first, then the rows step); any failure leaves eager decoding
in place. The steps compute exactly what the model's forward computes; no sampling here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from glmkit.engine import hugepages, packages
from glmkit.kv_cache import KVCache
from glmkit.model import Transformer

# torch.export's own use of a deprecated pytree class, not something a glmkit user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

PACKAGE_FORMAT = 1  # bump when DecodeStep's inputs or outputs change: old packages are then never picked up
MAX_ROWS = 16  # the rows step's largest batch (the server's default is 8); bigger batches decode eagerly


class DecodeStep(torch.nn.Module):
    """The model's one-token step in an export-friendly signature: the cache as flat per-layer tensors
    (written in place) and the step's offset as the length of `attended` minus one, so it stays a dynamic size."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attended: torch.Tensor,
                *kv: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden_states(tokens, positions, _cache(kv), attended.shape[0] - 1)  # (1, 1, C)
        return self.model.head(h)[:, -1]  # (1, V)


class RowsStep(DecodeStep):
    """The decode step of rows 0..n-1 (2 <= n <= MAX_ROWS), one new token each at its own offset `starts` (n,);
    `attended`'s length is max(starts) + 1, the keys any row attends."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, attended: torch.Tensor,
                *kv: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden_states(tokens, positions, _cache(kv), starts, attended=attended.shape[0])  # (n, 1, C)
        return self.model.head(h)[:, -1]  # (n, V)


def _cache(kv: tuple[torch.Tensor, ...]) -> KVCache:
    """A KVCache over the flat per-layer tensors a step gets: keys of every layer, then values, (B, K, S, D)."""
    layers = len(kv) // 2
    cache = KVCache.__new__(KVCache)
    cache.k, cache.v = list(kv[:layers]), list(kv[layers:])
    return cache


def rows_supported(model: Transformer) -> str | None:
    """Why a model has no rows step (None: it has one). A MoE layer's decode path loops over its tokens."""
    return "a Mixture-of-Experts model's batched steps decode eagerly" if model.config.moe is not None else None


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


def _twin(model: Transformer) -> Transformer:
    """The model's module tree again, sharing every tensor (no weight is copied). torch.export swaps a module's
    parameters for fake tensors while it traces; on the live model, an eager step running meanwhile on another
    thread (a background build) would meet them."""
    memo = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        memo.update({id(t): t for t in tensors if isinstance(t, torch.Tensor)})
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _packed_weights_replace_originals():
    """While compiling: a weight that inductor's C++ GEMM template has repacked leaves the package. torch 2.13
    drops it only when its name has no dots, so an exported model's weights (model.layers.0.mlp.in_proj.q) all
    stayed beside their packed copies (the default model's int8 step: 275 MB instead of 169). The same rule, on
    the tensors themselves: a weight goes when one graph attribute holds it, that attribute feeds only this
    GEMM, and the template does not read it."""
    try:
        import torch._inductor.compile_fx  # noqa: F401 - first: the template module alone hits an import cycle
        from torch._inductor import ir
        from torch._inductor.codegen import cpp_gemm_template as gemm
        from torch._inductor.virtualized import V
        torch_prune = gemm.prune_tensors
    except (ImportError, AttributeError):  # another torch: its own rule alone
        yield
        return

    def held(module, target: str):
        try:
            return functools.reduce(getattr, target.split("."), module)
        except AttributeError:
            return None

    def same(a, b) -> bool:
        return isinstance(b, torch.Tensor) and not a.is_mkldnn and not b.is_mkldnn and \
            a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    def prune(input_nodes, new_input_nodes):
        torch_prune(input_nodes, new_input_nodes)
        constants = V.graph.constants
        kept = [constants[n.get_name()] for n in new_input_nodes
                if isinstance(n, (ir.TensorBox, ir.StorageBox)) and n.get_name() in constants]
        attrs = [(n, held(V.graph.module, n.target)) for n in V.graph.graph.nodes if n.op == "get_attr"]
        for node in input_nodes:
            if node in new_input_nodes or not isinstance(node, (ir.TensorBox, ir.StorageBox)):
                continue
            tensor = constants.get(node.get_name())
            if tensor is None or any(same(tensor, k) for k in kept):
                continue
            holders = [n for n, t in attrs if same(tensor, t)]
            if len(holders) == 1 and len(holders[0].users) == 1:
                del constants[node.get_name()]
                *path, leaf = holders[0].target.split(".")
                for module in (V.graph.module, V.graph.graph.owning_module):  # (often one module: hasattr skips)
                    owner = held(module, ".".join(path)) if path else module
                    if owner is not None and hasattr(owner, leaf):
                        delattr(owner, leaf)

    gemm.prune_tensors = prune
    try:
        yield
    finally:
        gemm.prune_tensors = torch_prune


def _reason(e: Exception) -> str:
    """A compiler failure in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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
    """step(tokens (1, 1), positions, cache rows, start) -> logits (1, V), once `ready`; rows(tokens (n, 1),
    positions, starts (n,), cache rows 0..n-1) -> logits (n, V), once `rows_ready`. Packages live in
    `directory` ($GLMKIT_HOME/compiled as glmkit.load sets it up): decode-<key>.pt2 and its companion
    rows-<key>.pt2."""

    def __init__(self, model: Transformer, directory: Path, label: str | None = None, weight_files: list | None = None,
                 on_ready=None, batched: bool = True):
        """label: which model this is (its source), recorded beside a package built for it; weight_files: the
        files the weights came from (package_key); on_ready(self): called once the one-row step is usable;
        batched: also the rows step."""
        self.model, self.directory, self.label = model, Path(directory), label
        self.weight_files, self.on_ready = weight_files, on_ready
        self.ready = self.rows_ready = False
        self.cached = False  # True when the one-row package came from disk
        self.error: str | None = None
        self.rows_error: str | None = rows_supported(model) if batched else "not asked for (batched=False)"
        self.seconds: float | None = None
        self.path: Path | None = None
        self._run = self._run_rows = None
        self._attended = torch.empty(0, dtype=torch.uint8)
        self._thread: threading.Thread | None = None
        self._unpaged: set[tuple[int, int]] = set()  # (start, end) of loaded weights not yet on huge pages

    def compile(self, build: bool = True) -> "CompiledDecoder":
        """Load the packages from disk, or export and compile them now (blocking); on failure stay eager.
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
        options = inductor_options(self.model)
        try:
            t0 = time.perf_counter()
            self.path = self.directory / f"decode-{package_key(self.model, options, self.weight_files)}.pt2"
            self.cached = self.path.exists()
            run = self._package(self.path, DecodeStep, options, build)
            if run is None:
                self.error = "no compiled package on disk for this model (glmkit compile builds one)"
                return self
            self._run, self.ready, self.seconds = run, True, time.perf_counter() - t0
            if not self.cached:
                packages.record(self.path, self.label)
            if self.on_ready is not None:
                self.on_ready(self)
            self._to_huge_pages()  # once decoding has switched to the step
        except Exception as e:  # noqa: BLE001 - any compiler failure means: keep decoding eagerly
            self.error = _reason(e)
            warnings.warn(f"the compiled decode step is unavailable ({self.error}); decoding stays eager.",
                          stacklevel=2)
        if self.path is not None:
            self._compile_rows(options, build)
            packages.collect_garbage(self.directory)  # stale packages of this model (and others) go
        return self

    def _compile_rows(self, options: dict, build: bool) -> None:
        if self.rows_error is not None:
            return
        try:
            self._run_rows = self._package(packages.companion(self.path), RowsStep, options, build)
            self.rows_ready = self._run_rows is not None
            self._to_huge_pages()
            self.rows_error = None if self.rows_ready else "no rows package on disk (glmkit compile builds one)"
        except Exception as e:  # noqa: BLE001 - batched steps stay eager; the one-row step is unaffected
            self.rows_error = _reason(e)
            warnings.warn(f"the compiled batched decode step is unavailable ({self.rows_error}); batched decoding "
                          "stays eager.", stacklevel=2)

    def _package(self, path: Path, step: type, options: dict, build: bool):
        """The package's entry point, loaded from `path` or (build) exported and compiled there first; None when
        it is not on disk and build is False. A package that does not load (truncated, from another build) is
        removed and rebuilt."""
        runner = self._load(path) if path.exists() else None
        if runner is None and not build:
            return None
        if runner is None:
            self._build(path, step, options)
            runner = self._load(path, strict=True)
        else:
            packages.touch(path)
        return runner.loader.boxed_run  # the loader's own entry point: its Python wrapper re-flattens the inputs

    def _to_huge_pages(self) -> None:
        """The weights of the packages loaded so far onto 2 MiB pages (engine/hugepages.py)."""
        hugepages.collapse(self._unpaged)
        self._unpaged.clear()

    def _load(self, path: Path, strict: bool = False):
        """The loaded package (None: it does not load); the memory its weights were copied into is kept in
        `_unpaged`, to be moved onto 2 MiB pages (engine/hugepages.py) once the step is in use."""
        try:
            runner, spans = hugepages.loaded(lambda: torch._inductor.aoti_load_package(str(path)))
            self._unpaged |= spans
            return runner
        except Exception:
            if strict:
                raise
            path.unlink(missing_ok=True)
            return None

    def _build(self, path: Path, step: type, options: dict) -> None:
        from torch.export import Dim

        if threading.current_thread() is self._thread:  # a background build yields the CPU to decoding: the
            try:  # lowest priority for this thread and the compilers it starts (loading a package stays quick)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
        c, m = self.model.config, self.model
        n = 1 if step is DecodeStep else 2
        cache = KVCache(c, n, 16, dtype=m.dtype, device=m.device)
        kv = tuple(cache.k + cache.v)
        shape = {"2d": (n, 2, 1), "mrope": (n, 3, 1)}.get(c.positions, (n, 1))
        tokens = torch.zeros(n, 1, dtype=torch.long, device=m.device)
        positions = torch.full(shape, 5, dtype=torch.long, device=m.device)
        attended, max_len = Dim("attended", min=2, max=1 << 20), Dim("max_len", min=2, max=1 << 20)
        marker = torch.empty(6, dtype=torch.uint8)
        if step is DecodeStep:
            example = (tokens, positions, marker)
            dynamic = ({}, {}, {0: attended}, tuple({2: max_len} for _ in kv))
        else:
            rows = Dim("rows", min=2, max=MAX_ROWS)
            example = (tokens, positions, torch.tensor([5, 3], device=m.device), marker)
            dynamic = ({0: rows}, {0: rows}, {0: rows}, {0: attended}, tuple({0: rows, 2: max_len} for _ in kv))
        with torch.no_grad():  # a twin of the model: export must not touch the one another thread decodes with
            program = torch.export.export(step(_twin(m)).eval(), example + kv, dynamic_shapes=dynamic, strict=False)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: packages are native code
        partial = path.with_name(f".partial-{os.getpid()}-{path.name}")  # must end in .pt2
        try:
            with _packed_weights_replace_originals():
                torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
            os.replace(partial, path)  # complete packages only: an interrupted compile leaves nothing behind
        finally:
            partial.unlink(missing_ok=True)

    def compile_in_background(self, build: bool = True) -> "CompiledDecoder":
        def run() -> None:
            import torch._inductor.config as inductor

            inductor.compile_threads = 1  # one compile worker: eager decoding keeps its cores
            self.compile(build)

        self._thread = threading.Thread(target=run, name="glmkit-compile", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Until compiling (both steps) ends; -> whether the one-row step is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def usable(self, start: int) -> bool:
        """The package was exported for steps with at least one cached position."""
        return self.ready and start >= 1

    def usable_rows(self, n: int, attended: int) -> bool:
        return self.rows_ready and 2 <= n <= MAX_ROWS and attended >= 2

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        # the package assumes contiguous inputs (an expanded view would be read as if it were not)
        return self._run([tokens.contiguous(), positions.contiguous(), self._marker(start + 1), *cache.k, *cache.v])[0]

    def rows(self, tokens: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, cache: KVCache,
             attended: int) -> torch.Tensor:
        """Rows 0..n-1 of the cache (`cache` is that view, its rows contiguous), `attended` = max(starts) + 1."""
        return self._run_rows([tokens.contiguous(), positions.contiguous(), starts.contiguous(),
                               self._marker(attended), *cache.k, *cache.v])[0]

    def _marker(self, length: int) -> torch.Tensor:
        if self._attended.numel() < length:
            self._attended = torch.empty(2 * length, dtype=torch.uint8)
        return self._attended[:length]
