"""Loads the compiled library (libtokcore_ops.so), which registers torch.ops.tokcore.*."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
from pathlib import Path

import torch

_LIBRARY_NAME = "libtokcore_ops.so"


def _find_library() -> Path:
    # TOKCORE_LIBRARY names another build of the library to load (the sanitizer
    # build of scripts/sanitize.sh, a debug build); it must exist.
    override = os.environ.get("TOKCORE_LIBRARY")
    if override:
        if not Path(override).is_file():
            raise ImportError(f"tokcore: TOKCORE_LIBRARY={override!r} is not a file")
        return Path(override)
    # A regular install puts the library beside this file; an editable install
    # keeps the Python sources here and the library in site-packages.
    candidates = [Path(__file__).with_name(_LIBRARY_NAME)]
    try:
        for f in importlib.metadata.files("tokcore") or []:
            if f.name == _LIBRARY_NAME:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise ImportError(
        f"tokcore: {_LIBRARY_NAME} not found (looked in {[str(c) for c in candidates]}); "
        "install the package with `pip install --no-build-isolation .`"
    )


LIBRARY_PATH = _find_library()
torch.ops.load_library(str(LIBRARY_PATH))
# The library reads its run-time settings only when told to (tokcore/common/settings.h):
# through PyDLL, which holds the GIL, so no Python thread changes the environment meanwhile.
_reload_library_settings = ctypes.PyDLL(str(LIBRARY_PATH)).tokcore_reload_settings
_reload_library_settings.restype = None
_reload_library_settings.argtypes = []


def has_cuda_kernels() -> bool:
    """Whether this build of tokcore contains CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("tokcore::segment_reduce", "CUDA")


_CPU_ISA_NAMES = {0: "base", 1: "avx2", 2: "avx512"}  # the values TOKCORE_CPU_ISA takes


def cpu_isa() -> str:
    """The instruction set of the CPU kernels built for several ("base": baseline
    x86-64, "avx2" or "avx512"): the one TOKCORE_CPU_ISA=base|avx2|avx512 picks, else
    the best this CPU runs; the CPU's support caps both. With TOKCORE_CPU_ISA unset, a
    reduce whose rows fit a narrower variant's vectors better runs that one (same bits)."""
    return _CPU_ISA_NAMES[int(torch.ops.tokcore._cpu_isa_level())]


# The run-time switches that the C++ side reads (README, "Run-time switches"):
# name -> (what a valid value looks like, check). The library falls back to its
# default on a value it cannot use, so a typo would otherwise pass unnoticed.
def _is_count(value: str) -> bool:  # as the C++ side reads counts (tokcore/common/env.h)
    return all("0" <= c <= "9" for c in value)


_SETTINGS = {
    "TOKCORE_CPU_ISA": ("base, avx2 or avx512", lambda v: v in ("base", "avx2", "avx512")),
    "TOKCORE_CPU_STREAM_MIN_MB": ("a whole number of MB >= 0", _is_count),
    "TOKCORE_CPU_OUTPUT_CACHE_MB": ("a whole number of MB >= 0", _is_count),
    "TOKCORE_CPU_HUGE_PAGES": ("0 or 1", lambda v: v in ("0", "1")),
    "TOKCORE_CUDA_CHECK_OFFSETS": ("0 or 1", lambda v: v in ("0", "1")),
}


def settings(environ=os.environ) -> dict[str, tuple[str, str | None]]:
    """The tokcore environment variables that are set (and not empty): name ->
    (value, None if the library uses it, else what a valid value looks like)."""
    found = {}
    for name, (valid, ok) in _SETTINGS.items():
        value = environ.get(name)
        if value is not None and value != "":
            found[name] = (value, None if ok(value) else valid)
    return found


def check_settings(environ=os.environ) -> list[str]:
    """Warns (RuntimeWarning) about each tokcore environment variable whose value
    the library would ignore, and returns the messages. Run at import and by
    reload_settings()."""
    import warnings

    problems = [f"tokcore: {name}={value!r} is not {valid}; the default is used instead"
                for name, (value, valid) in settings(environ).items() if valid is not None]
    for message in problems:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return problems


def reload_settings() -> None:
    """Makes the library use the tokcore environment variables (README, "Run-time
    switches") as they are now, warning (RuntimeWarning) about a value it cannot use.
    They are read when tokcore is imported and again only here, not by each op call:
    reading the environment in an op, which runs without the GIL, could crash while
    another thread changes it. Call this after changing one in a running process."""
    check_settings()
    _reload_library_settings()


reload_settings()
