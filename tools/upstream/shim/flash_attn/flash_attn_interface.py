"""``flash_attn.flash_attn_interface`` -> attnhub's surface (import shim).

Besides the public functions, flash-attention's tests import two private names:
``USE_TRITON_ROCM`` (False: no ROCm Triton path here) and ``_get_block_size_n``, the key
block size of flash_attn's kernel, which its tests use to undo the per-block normalization of
S_dmask. attnhub's S_dmask is exp(s - row max) over one key block
(attnhub/flash_attn/returns.py), so the block size here covers every key.
"""

from attnhub.flash_attn.flash_attn_interface import *  # noqa: F403

USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal) -> int:
    """One key block spans every key (attnhub's S_dmask convention)."""
    return 1 << 30
