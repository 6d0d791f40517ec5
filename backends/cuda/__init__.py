"""CUDA adapters: PyTorch's bundled FlashAttention-2 (``torch-flash``) and, when installed,
the flash_attn (FA2), flash_attn_interface (FA3) and flash_attn.cute (FA4) extensions.

Nothing here imports a CUDA-only package at import time: each adapter imports its kernel
inside ``unavailable_reasons`` / ``forward`` / ``backward``. The adapters share one skeleton
(base.CudaAdapter) and hold only their capabilities and kernel calls.
"""
