"""A drop-in for flash_attn 2.8's public functions: ``import attnhub.flash_attn as flash_attn``.

Same signatures, defaults, shapes and return conventions as flash_attn 2.8; every call is a
translation into attention_forward_varlen, so it runs on every device attnhub supports (the
CPU included, through the reference) with attnhub's dispatch. ``attnhub.flash_attn.bert_padding``
holds the padding helpers. See docs/migrate-flash-attn.md.
"""

from . import bert_padding
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = ["bert_padding", "flash_attn_func", "flash_attn_kvpacked_func",
           "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache"]
