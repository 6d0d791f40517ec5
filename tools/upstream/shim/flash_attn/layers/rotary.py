"""``flash_attn.layers.rotary`` -> attnhub.flash_attn.layers.rotary (import shim)."""

from attnhub.flash_attn.layers.rotary import apply_rotary_emb

apply_rotary_emb_func = apply_rotary_emb  # flash_attn's backward-compatible alias
