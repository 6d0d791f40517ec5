"""FlashInfer's prefill API on attnhub: ``BatchPrefillWithRaggedKVCacheWrapper``,
``BatchPrefillWithPagedKVCacheWrapper`` and ``single_prefill_with_kv_cache``, each a
translation into ``attnhub.plan`` (docs/migrate-flashinfer.md). Also ``packbits`` and
``segment_packbits`` (FlashInfer's mask packing, little bit order)."""

from .packing import packbits, segment_packbits
from .single import single_prefill_with_kv_cache
from .wrappers import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper

__all__ = [
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "packbits",
    "segment_packbits",
    "single_prefill_with_kv_cache",
]
