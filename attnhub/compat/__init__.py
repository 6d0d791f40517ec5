"""Drop-in surfaces for code written against other attention packages, each a translation into
attention_forward_varlen: ``attnhub.compat.paddle`` (Paddle's flash_attn_varlen_qkvpacked on
torch tensors) and ``attnhub.compat.flashattention_plus`` (FlashAttention-Plus's modules).
flash_attn's functions live in ``attnhub.flash_attn``."""
