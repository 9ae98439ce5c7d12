"""Loads the compiled library (libtokcore_ops.so), which registers torch.ops.tokcore.*."""

from __future__ import annotations

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


def has_cuda_kernels() -> bool:
    """Whether this build of tokcore contains CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("tokcore::segment_reduce", "CUDA")


_CPU_ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}


def cpu_isa() -> str:
    """The instruction set of the CPU kernels built for several ("baseline", "avx2" or
    "avx512"): the best this CPU runs, capped by TOKCORE_CPU_ISA=base|avx2."""
    return _CPU_ISA_NAMES[int(torch.ops.tokcore._cpu_isa_level())]
