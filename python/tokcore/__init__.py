"""tokcore: fast token-level kernels for PyTorch.

Importing tokcore loads the compiled library, which registers the ops under
``torch.ops.tokcore``; each family's Python wrappers, fake kernels and autograd
live in ``tokcore.<family>.ops``.
"""

from tokcore._library import LIBRARY_PATH, cpu_isa, has_cuda_kernels, reload_settings
from tokcore import pooling

__version__ = "0.1.0"

__all__ = ["pooling", "has_cuda_kernels", "cpu_isa", "reload_settings", "LIBRARY_PATH", "__version__"]
