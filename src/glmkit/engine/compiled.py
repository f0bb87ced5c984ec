"""A compiled one-token decode step for the single-sequence case (chat, generate, bench).

torch.compile with inductor's freezing (weights become constants, so weight-only int8 matmuls turn into
generated C++ micro-kernels), max-autotune with the C++ GEMM backend, the C++ wrapper, and a dynamic
position, so one graph serves every cache length. Compilation is cached on disk under
$GLMKIT_HOME/inductor (paid once per model and machine: ~1-1.5 min cold, seconds warm); it can run
in a background thread while the engine keeps decoding eagerly, and any failure leaves eager decoding
in place. The step computes exactly what the model's forward computes; no sampling here.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import torch

from glmkit.kv_cache import KVCache
from glmkit.model import Transformer


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled code: $TORCHINDUCTOR_CACHE_DIR, which glmkit.llm points at
    $GLMKIT_HOME/inductor unless it is set already."""
    from torch._inductor.runtime.runtime_utils import cache_dir

    return Path(cache_dir())


# inductor settings (set process-wide: freezing is read from the global config, not from torch.compile's
# per-function options): frozen weights, autotuned C++ GEMM templates, the C++ wrapper
OPTIONS = {"freezing": True, "cpp_wrapper": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
           "fx_graph_cache": True}


class DecodeStep(torch.nn.Module):
    """The model's one-token step as a module, so that inductor's freezing sees its weights as parameters
    (a compiled plain function would get them as graph inputs, and nothing would be frozen)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        h = self.model.hidden_states(tokens, positions, cache, start)  # (1, 1, C)
        return self.model.head(h)[:, -1]  # (1, V)


class CompiledDecoder:
    """step(tokens (1, 1), positions, cache rows, start) -> logits (1, V), once `ready`."""

    def __init__(self, model: Transformer):
        self.model = model
        self.ready = False
        self.error: str | None = None
        self.seconds: float | None = None
        self._fn = None
        self._thread: threading.Thread | None = None

    def options(self) -> dict:
        """OPTIONS; all-int8 models keep to the C++ GEMM templates (on a busy machine autotuning can wrongly
        prefer ATen's slower weight-only kernel), float ones may also use ATen's GEMMs."""
        from glmkit.quant import Int8Linear

        linears = [m for m in self.model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
        int8 = bool(linears) and all(isinstance(m, Int8Linear) for m in linears)
        return {**OPTIONS, "max_autotune_gemm_backends": "CPP" if int8 else "CPP,ATEN"}

    def compile(self) -> "CompiledDecoder":
        """Compile now (blocking) by running a few steps on a scratch cache; on failure stay eager."""
        try:
            t0 = time.perf_counter()
            fn = torch.compile(DecodeStep(self.model), fullgraph=True, dynamic=True)
            p = self.model.embed.weight
            c = self.model.config
            import torch._inductor.config as inductor

            for key, value in self.options().items():  # global: a later recompile must freeze too
                setattr(inductor, key, value)
            with torch.inference_mode():  # the engine's cache holds inference tensors: so must this one
                cache = KVCache(c, 1, 64, dtype=p.dtype, device=p.device)
                for t in cache.k + cache.v:  # the engine's cache grows: its length must not be specialised
                    torch._dynamo.mark_dynamic(t, 2)
                for start in (3, 4, 5):  # a few positions: the position is a dynamic size from the start
                    tokens = torch.zeros(1, 1, dtype=torch.long, device=p.device)
                    shape = (1, 2, 1) if c.positions == "2d" else (1, 1)
                    positions = torch.full(shape, start, dtype=torch.long, device=p.device)
                    fn(tokens, positions, cache, start)
            self._fn, self.ready, self.seconds = fn, True, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - any compiler failure means: keep decoding eagerly
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"the compiled decode step is unavailable ({self.error}); decoding stays eager.",
                          stacklevel=2)
        return self

    def compile_in_background(self) -> "CompiledDecoder":
        def run() -> None:
            # yield the CPU to decoding: the lowest priority for this thread and the compilers it starts, and
            # one compile worker, so eager decoding's threads are not starved while the step compiles
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
            import torch._inductor.config as inductor

            inductor.compile_threads = 1
            self.compile()

        self._thread = threading.Thread(target=run, name="glmkit-compile", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        return self._fn(tokens, positions, cache, start)
