"""``flashinfer.prefill`` -> attnhub.compat.flashinfer (import shim)."""

from attnhub.compat.flashinfer import (  # noqa: F401
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    single_prefill_with_kv_cache,
)
