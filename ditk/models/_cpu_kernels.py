"""Small C++ kernels for the CPU, compiled on first use with the system's C++ compiler and called through ctypes.

Why: the selective scan and the Bi-WKV are recurrences whose arithmetic is a few FLOPs per element; written
as PyTorch calls every FLOP becomes a pass over memory (see docs/backbones.md). A plain loop compiled with
-O3 keeps the running state in cache/registers and does all of them in one pass. The sources are tiny and
include only <cmath>/<cstdint>, so compiling takes about a second, not the minute of a torch C++ extension,
and the library does not depend on torch's ABI (tensors are passed as data pointers).

Nothing requires them: `load` returns None when there is no compiler (CI installs only Python packages),
when compilation fails, or when DITK_CPU_KERNELS=0, and callers then use their PyTorch form. Libraries are
cached under $DITK_CACHE_DIR/kernels (default ~/.cache/ditk/kernels), keyed by the source, the compiler, its
flags and the CPU's instruction-set flags (the code is built with -march=native), written to a temporary
name and renamed, so concurrent processes never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# e^x for float (vectorisable polynomial) and double (the C library's), shared by the kernels' sources.
EXP_SOURCE = r"""
#include <cmath>
#include <cstdint>

namespace {
// e^x, vectorisable: x = k ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (error < 6e-9
// relative), 2^k through the exponent bits. x is clamped to [-87, 88]: below, the true value (< 2e-38) is
// returned as 1.6e-38. Above 88 it acts only in SiLU's e^-a for a < -88, where a / (1 + e^88) is within
// 1e-36 of the true value; the other exponents are <= 0 (decays, or shifted by a running maximum).
inline float exp_f(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = std::floor(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693145751953125f - k * 1.42860682030941723e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
              + r * (1.0f / 5040)))))));
    int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);
}
inline double exp_f(double x) { return std::exp(x); }

}  // namespace
"""

FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-fPIC", "-shared"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("DITK_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else g++, c++ or clang++ on PATH), or None."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for p in map(shutil.which, ("g++", "c++", "clang++")) if p), None)


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and the CPU's feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("DITK_CACHE_DIR", Path.home() / ".cache" / "ditk")) / "kernels"


def _build(name: str, source: str, cxx: str) -> Path:
    """Compile `source` into the cache (once) and return the library's path; raises on failure."""
    # 512-bit vectors where the CPU has them; some compilers (or CPUs they do not know) reject these flags
    for arch in (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []):
        flags = FLAGS + arch
        key = hashlib.sha256("\0".join([source, cxx, *flags, _cpu_signature()]).encode()).hexdigest()[:20]
        path = cache_dir() / f"{name}-{key}.so"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src = Path(tmp) / f"{name}.cpp"
            src.write_text(source)
            out = Path(tmp) / "lib.so"
            proc = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(out, path)  # atomic: other processes see no file or the whole library
                return path
            error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    raise RuntimeError(f"{cxx} failed: {error}")


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (C++ with extern "C" functions), or None where it cannot be built.
    The first failure of a process is reported once on stderr; callers fall back to PyTorch."""
    if not enabled():
        return None
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        cxx = compiler()
        if cxx is None:
            _errors[name] = "no C++ compiler on PATH (g++, c++ or clang++; or set CXX)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(name, source, cxx)))
            except Exception as err:  # compiler error, read-only cache, timeout, a library that does not load
                _errors[name] = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if lib is None:
            print(f"[ditk] CPU kernel '{name}' unavailable ({_errors[name]}): using the slower PyTorch form",
                  file=sys.stderr)
        _loaded[name] = lib
        return lib


def error(name: str) -> str | None:
    """Why `load(name, ...)` returned None (None if it loaded, or was never tried, or is disabled)."""
    return _errors.get(name)


def ptr(t) -> ctypes.c_void_p:
    """A contiguous tensor's data pointer for a ctypes call (None -> NULL)."""
    return ctypes.c_void_p(0 if t is None else t.data_ptr())
