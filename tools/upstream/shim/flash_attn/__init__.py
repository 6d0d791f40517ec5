"""Import shim: ``import flash_attn`` resolves to attnhub's flash_attn 2.8 surface.

Only for running flash-attention's own tests against attnhub (tools/upstream/run.py puts
this folder first on sys.path); user code imports ``attnhub.flash_attn`` instead.
"""

from attnhub.flash_attn import *  # noqa: F403
from attnhub.flash_attn import __all__ as _attnhub_all
from attnhub.flash_attn import bert_padding  # noqa: F401

__version__ = "2.8.4+attnhub"
__all__ = list(_attnhub_all)
