"""The npu backend: Ascend's torch_npu.npu_fusion_attention (layout TND), and a CPU simulator
of that operator (``simulator``) that tests and ``ATTNHUB_NPU_SIMULATOR=1`` put in place of
torch_npu (``simulation``). See docs/npu.md.
"""

from .backend import NpuBackend

__all__ = ["NpuBackend"]
