"""``flashinfer.quantization`` -> attnhub.compat.flashinfer's mask packing (import shim)."""

from attnhub.compat.flashinfer import packbits, segment_packbits  # noqa: F401
