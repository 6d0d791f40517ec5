"""attnhub.compat.flashinfer's keyword handling against FlashInfer's current signatures
(flashinfer/prefill.py): tuning hints accepted, features it lacks refused by name (never
silently ignored), unknown keywords a TypeError, scalars through attnhub's converter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnhub.compat.flashinfer as flashinfer
from attnhub import InvalidArgumentError

I32 = torch.int32


def _ragged():
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(8, dtype=torch.uint8))
    return w, torch.tensor([0, 3, 7], dtype=I32), torch.tensor([0, 5, 9], dtype=I32)


def test_hints_are_accepted():
    w, qo, kv = _ragged()
    w.plan(qo, kv, 2, 1, 16, q_data_type=torch.float32, fixed_split_size=64,
           disable_split_kv=True, max_token_per_sequence=8, o_data_type=torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 16, generator=gen) for n, h in ((7, 2), (9, 1), (9, 1)))
    assert w.run(q, k, v).shape == (7, 2, 16)


@pytest.mark.parametrize("kw", [{"prefix_len_ptr": torch.zeros(2, dtype=I32)},
                                {"token_pos_in_items_len": 3},
                                {"v_indptr": torch.tensor([0, 5, 9], dtype=I32)},
                                {"o_data_type": torch.float16}])
def test_semantic_keywords_refused_by_name(kw):
    w, qo, kv = _ragged()
    with pytest.raises(InvalidArgumentError) as exc:
        w.plan(qo, kv, 2, 1, 16, q_data_type=torch.float32, **kw)
    assert exc.value.argument == next(iter(kw))


def test_unknown_keyword_is_a_type_error():
    w, qo, kv = _ragged()
    with pytest.raises(TypeError, match="no_such_option"):
        w.plan(qo, kv, 2, 1, 16, no_such_option=1)


def test_scalar_conversion_and_junk():
    w, qo, kv = _ragged()
    w.plan(qo, kv, 2, 1, 16, q_data_type=torch.float32, causal=np.bool_(True),
           window_left=np.int64(2), logits_soft_cap=np.float32(5.0))
    assert w._plan.problem.window == (2, 0) and w._plan.problem.softcap == 5.0
    for kw, name in (({"window_left": 2.5}, "window_left"), ({"causal": "yes"}, "causal"),
                     ({"logits_soft_cap": "30"}, "logits_soft_cap")):
        with pytest.raises(InvalidArgumentError) as exc:
            w.plan(qo, kv, 2, 1, 16, q_data_type=torch.float32, **kw)
        assert exc.value.argument == name


def test_single_prefill_current_signature():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 2, 16, generator=gen) for _ in range(3))
    a = flashinfer.single_prefill_with_kv_cache(q, k, v, None, None, None, None, None, None,
                                                True, backend="fa2")
    b = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert torch.equal(a, b)
    with pytest.raises(InvalidArgumentError, match="'scale_q'"):
        flashinfer.single_prefill_with_kv_cache(q, k, v, torch.ones(1))
    with pytest.raises(InvalidArgumentError, match="'o_dtype'"):
        flashinfer.single_prefill_with_kv_cache(q, k, v, o_dtype=torch.float16)
