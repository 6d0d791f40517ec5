"""``flash_attn.layers`` (import shim): only ``rotary``."""
