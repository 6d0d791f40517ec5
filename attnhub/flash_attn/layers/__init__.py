"""``flash_attn.layers``' public helpers that attnhub provides (``rotary.apply_rotary_emb``)."""
