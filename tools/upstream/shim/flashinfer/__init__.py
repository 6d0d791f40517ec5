"""Import shim: ``import flashinfer`` resolves to attnhub.compat.flashinfer.

Only for running FlashInfer's own prefill tests against attnhub (tools/upstream/run.py puts
this folder first on sys.path); user code imports ``attnhub.compat.flashinfer`` instead.
The submodules hold the names those tests touch: ``prefill`` (the wrappers and
single_prefill_with_kv_cache), ``quantization`` (packbits), ``utils`` and ``jit`` (FlashInfer's
JIT machinery: attnhub compiles nothing ahead, so the JIT cache always counts as present).
"""

from attnhub.compat.flashinfer import *  # noqa: F403
from attnhub.compat.flashinfer import __all__ as _attnhub_all

from . import jit, prefill, quantization, utils  # noqa: F401

__version__ = "0.0.0+attnhub"
__all__ = list(_attnhub_all)
