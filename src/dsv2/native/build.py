"""Building and loading the fused decode step's operators (torch.ops.dsv2.*), once per machine.

torch.utils.cpp_extension compiles op.cpp, decode.cpp, attention.cpp, experts.cpp and layers.cpp
with the system C++ compiler (and ninja) into ~/.cache/dsv2 (or $DSV2_CACHE_DIR), in a folder keyed
by the sources, the compiler, the flags, torch's version and this CPU's flags. Each build happens in a
private temporary folder renamed into place when complete, so an interrupted or concurrent build
never leaves a half-written library or a stale lock behind. The OpenMP runtime is the one
torch already loaded, so the step and torch share one thread pool.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "op.cpp", HERE / "decode.cpp", HERE / "attention.cpp", HERE / "experts.cpp",
           HERE / "layers.cpp"]
HEADERS = [HERE / "decode.h", HERE / "attention.h", HERE / "simd.h"]
def flags() -> list[str]:
    """-march=native, or $DSV2_NATIVE_MARCH: build for another x86 level, e.g. x86-64-v3 (AVX2,
    no AVX-512) to run, on this machine, the kernels an AVX2-only CPU gets (the tests do)."""
    return ["-O3", f"-march={os.environ.get('DSV2_NATIVE_MARCH') or 'native'}", "-fopenmp"]
NAME = "dsv2_decode"


class Unsupported(RuntimeError):
    """This model, device or machine cannot use the fused decode step."""


_loaded = False
_error: str | None = None


def cache_dir() -> Path:
    if os.environ.get("DSV2_CACHE_DIR"):
        return Path(os.environ["DSV2_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "dsv2"
    except RuntimeError:   # no home directory (some service accounts)
        return Path(tempfile.gettempdir()) / "dsv2-cache"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    """The C++ compiler cpp_extension will use ($CXX, else c++ / g++ on PATH)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("c++") or shutil.which("g++")


def error() -> str | None:
    """Why the operators could not be built or loaded here (None: not tried yet, or loaded)."""
    return _error


def load() -> None:
    """Make torch.ops.dsv2.* available (building them first if this machine has no copy). Raises
    Unsupported, with the same reason every time, when they cannot be built or loaded here."""
    global _loaded, _error
    if not _loaded and _error is None:
        try:
            _build_and_load()
            _loaded = True
        except Unsupported as e:
            _error = str(e)
        except (OSError, subprocess.SubprocessError) as e:   # unwritable cache, a library that will not load
            _error = f"the fused decode step could not be built or loaded ({type(e).__name__}: {e})"
    if not _loaded:
        raise Unsupported(_error)


def _build_and_load() -> None:
    cxx = compiler()
    if cxx is None:
        raise Unsupported(f"no C++ compiler found ({os.environ.get('CXX') or 'c++'}; install g++, or set CXX)")
    if shutil.which("ninja") is None:
        raise Unsupported("ninja, which torch uses to build extensions, is not installed (pip install ninja)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [p.read_bytes() for p in SOURCES + HEADERS] + [s.encode() for s in (
        version, " ".join(flags()), torch.__version__, _cpu_flags(), platform.machine())]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = cache_dir() / f"decode-{key}"
    lib = out / f"{NAME}.so"
    if lib.exists():
        torch.ops.load_library(str(lib))
    else:
        _build(cxx, out)
    _register_fake()


def _build(cxx: str, out: Path) -> None:
    from torch.utils import cpp_extension   # imported only to build: it is slow to import

    print(f"dsv2: building the fused CPU decode step with {cxx} (once per machine, a few seconds)...",
          file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        try:
            # Loads the library from tmp as a side effect: loaded once, whatever the rename does.
            cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=flags(),
                               extra_ldflags=["-fopenmp"], build_directory=str(tmp), is_python_module=False,
                               verbose=False)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            lines = str(e).strip().splitlines()
            first = next((line for line in lines if "error:" in line), lines[0] if lines else "no output")
            raise Unsupported(f"{cxx} could not build the fused decode step: {first.strip()}") from e
        try:
            os.rename(tmp, out)   # atomic; a concurrent build that got there first keeps its folder
        except OSError:
            if not (out / f"{NAME}.so").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _register_fake() -> None:
    """Shapes for torch.compile's tracing: decode_step returns float32 [B, vocab], int8_mm [M, N], attention
    [B, T, H, V]; layers.cpp's operators return their inputs' shapes (contiguous)."""
    vocab = torch.ops.dsv2.layout()[2].index("vocab")

    @torch.library.register_fake("dsv2::decode_step")
    def _(weights, ints, floats, tokens, positions, kv_len, cache, cache_format, cache_scale, work, slots=None):
        return positions.new_empty((positions.numel(), ints[vocab]), dtype=torch.float32)

    @torch.library.register_fake("dsv2::int8_mm")
    def _(x, q, scale):
        return x.new_empty((x.shape[0], q.shape[0]))

    @torch.library.register_fake("dsv2::attention")
    def _(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
        return q_nope.new_empty((*q_nope.shape[:3], v.shape[-1]))

    @torch.library.register_fake("dsv2::attention_lse")
    def _(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
        return q_nope.new_empty((*q_nope.shape[:3], v.shape[-1])), q_nope.new_empty(q_nope.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("dsv2::experts_forward")
    def _(x, w13, w2, ends, keep):
        return x.new_empty(x.shape), x.new_empty((x.shape[0], w13.shape[1]) if keep else (0,))

    @torch.library.register_fake("dsv2::experts_int8")
    def _(x, q13, s13, q2, s2, ends):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsv2::experts_backward")
    def _(dy, x, w13, w2, h, ends, need_dx):
        return x.new_empty(x.shape if need_dx else (0,)), w13.new_empty(w13.shape), w2.new_empty(w2.shape)

    @torch.library.register_fake("dsv2::attention_backward")
    def _(dout, q_nope, q_pe, k_nope, k_pe, v, mask, lse, delta, scale):
        return (q_nope.new_empty(q_nope.shape), q_pe.new_empty(q_pe.shape), k_nope.new_empty(k_nope.shape),
                k_pe.new_empty((*k_nope.shape[:3], k_pe.shape[-1])), v.new_empty(v.shape))

    @torch.library.register_fake("dsv2::rms_norm")
    def _(x, weight, eps):
        return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("dsv2::rms_norm_backward")
    def _(dy, x, weight, rstd):
        return x.new_empty(x.shape), weight.new_empty(weight.shape, dtype=torch.float32)

    @torch.library.register_fake("dsv2::rope")
    def _(x, cos, sin, inverse=False):
        return x.new_empty(x.shape)

    @torch.library.register_fake("dsv2::moe_combine")
    def _(y, order, weight):
        return y.new_empty((weight.shape[0], y.shape[1]))

    @torch.library.register_fake("dsv2::moe_combine_backward")
    def _(dout, y, order, weight):
        return y.new_empty(y.shape), weight.new_empty(weight.shape, dtype=torch.float32)
