"""glmkit's own CPU kernels (kernels/quant.cpp), loaded as torch ops so eager code, torch.export and AOTInductor
packages all call them: int4 and int8 weights times activations quantized to int8 in blocks of 32, summed with
integer dot products (llama.cpp's method; torch's weight-only CPU kernels turn every weight into a float first), built
for AVX-512 VNNI where the CPU has it and for AVX2 + FMA otherwise.

`torch.ops.glmkit.int4_linear(x, packed, sz, expert, group_size)`: x (M, K) float32 / bfloat16 -> (M, N)
float32 through one expert of stacked weights in the "vnni" layout (int4_packing). `int8_linear(x, tiles,
scales)`: the same for int8 weights in tiles of 16 rows (quant.int8_tiles) with per-row scales.
`moe_int4_token(x, ids, weights, gate_up, gate_up_sz, down, down_sz, gs_gate_up, gs_down)`: one token (1, C)
through its chosen SwiGLU experts, weighted and summed -> (1, C) float32, in one call.

The source is compiled once per machine with the C++ compiler torch.utils.cpp_extension uses (~20 s), into
$GLMKIT_HOME/kernels. `available()` says whether the ops are there: False on a CPU with neither instruction
set, without a working compiler (one warning), or with GLMKIT_KERNELS=0; callers then keep torch's kernels.
GLMKIT_KERNELS=avx2 (or avx512vnni) picks one instruction set when the CPU has several.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "quant.cpp"
# instruction set -> (the CPU flags it needs as Linux names them, compiler flags); the first the CPU has is built
BUILDS = {
    "avx512vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma"},
                   ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma"]),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}

_lock = threading.Lock()
_state: dict[str, bool] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def instruction_set() -> str | None:
    """The instruction set the kernels are built for here (a key of BUILDS): the first this CPU has, or the one
    GLMKIT_KERNELS names if it has that one; None when it has none of them or GLMKIT_KERNELS=0."""
    wanted = os.environ.get("GLMKIT_KERNELS", "1")
    names = [wanted] if wanted in BUILDS else [] if wanted == "0" else list(BUILDS)
    flags = cpu_flags()
    return next((name for name in names if BUILDS[name][0] <= flags), None)


def compiler_flags(isa: str) -> list[str]:
    """-fopenmp: at::parallel_for is inline OpenMP code, serial when compiled without it."""
    return ["-O3", "-fopenmp", *BUILDS[isa][1]]


def build_dir(isa: str) -> Path:
    """$GLMKIT_HOME/kernels/<isa>-<hash of the source, flags and torch version>: rebuilt when any of them changes."""
    home = os.environ.get("GLMKIT_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glmkit"
    flags = " ".join([*compiler_flags(isa), torch.__version__])
    digest = hashlib.sha256(SOURCE.read_bytes() + flags.encode()).hexdigest()[:16]
    return Path(home).expanduser() / "kernels" / f"{isa}-{digest}"


def available() -> bool:
    """Whether the torch.ops.glmkit kernels run here; builds them on first use."""
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _load()
        return _state["ops"]


def fits(device: torch.device, rows: int, columns: int) -> bool:
    """Whether a weight on `device` with `rows` outputs goes into the kernels' tiles (16 rows) with `columns`
    inputs (a scale group's, or the whole row's for int8) in whole activation blocks of 32; and the kernels run."""
    return device.type == "cpu" and rows % 16 == 0 and columns % 32 == 0 and available()


def _load() -> bool:
    isa = instruction_set()
    if isa is None:
        return False
    from torch.utils import cpp_extension

    scripts = Path(sys.executable).parent  # where pip put the ninja package's binary
    if shutil.which("ninja") is None and shutil.which("ninja", path=str(scripts)):  # its environment not on PATH
        os.environ["PATH"] = str(scripts) + os.pathsep + os.environ.get("PATH", "")
    directory = build_dir(isa)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.glob("*.so")):
            print("glmkit: building its CPU kernels once for this machine (~20 s)", file=sys.stderr, flush=True)
        cpp_extension.load(name=f"glmkit_kernels_{isa}", sources=[str(SOURCE)], extra_cflags=compiler_flags(isa),
                           extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                           verbose=False)
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, an unwritable home: torch's kernels remain
        warnings.warn(f"glmkit could not build its CPU kernels ({str(error).splitlines()[0]}); using torch's "
                      "slower ones. They need a C++ compiler, ninja and a writable $GLMKIT_HOME; GLMKIT_KERNELS=0 "
                      "skips the attempt.", stacklevel=3)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Output shapes for torch.export / torch.compile (the ops' data stays opaque to the tracer)."""

    @torch.library.register_fake("glmkit::int4_linear")
    def _(x, packed, sz, expert, group_size):
        return x.new_empty((x.shape[0], packed.shape[1] * 16), dtype=torch.float32)

    @torch.library.register_fake("glmkit::int8_linear")
    def _(x, packed, scales):
        return x.new_empty((x.shape[0], packed.shape[0] * 16), dtype=torch.float32)

    @torch.library.register_fake("glmkit::moe_int4_token")
    def _(x, ids, weights, gate_up, gate_up_sz, down, down_sz, gs_gate_up, gs_down):
        return x.new_empty((1, x.shape[1]), dtype=torch.float32)
