"""attnhub: one variable-length (packed, cu_seqlens) attention API for every accelerator.

A call is normalized into one VarlenProblem, routed by a plugin registry to the fastest
backend on the tensors' device that computes it exactly, and run through torch.library
custom ops (autograd, torch.compile). See README.md and docs/.
"""

from .api import attention_forward_varlen, explain
from .backend import Backend, ForwardResult, Gradients
from .batch_plan import BatchPlan, plan
from .capabilities import Capabilities
from .custom_mask import PackedMask
from .dispatch import Explanation, Verdict, select, use_backend
from .errors import (
    AttnhubError,
    BackendResultError,
    BackendUnavailableError,
    CapacityError,
    InvalidArgumentError,
    UnknownBackendError,
)
from .flash_attn.varlen import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .hookspecs import hookimpl
from .inputs import VarlenInputs
from .normalize import normalize
from .problem import PagedLayout, VarlenProblem
from .registry import get_registry
from .varlen_info import VarlenInfo

__version__ = "0.1.0"

__all__ = [
    "AttnhubError",
    "Backend",
    "BackendResultError",
    "BackendUnavailableError",
    "BatchPlan",
    "Capabilities",
    "CapacityError",
    "Explanation",
    "ForwardResult",
    "Gradients",
    "InvalidArgumentError",
    "PackedMask",
    "PagedLayout",
    "UnknownBackendError",
    "VarlenInfo",
    "VarlenInputs",
    "VarlenProblem",
    "Verdict",
    "__version__",
    "attention_forward_varlen",
    "explain",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "get_registry",
    "hookimpl",
    "normalize",
    "plan",
    "select",
    "use_backend",
]
