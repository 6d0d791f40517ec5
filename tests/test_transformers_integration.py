"""attn_implementation="attnhub" in transformers 5.x: tiny random-initialised Llama, Qwen2,
Mistral, Gemma 2 and gpt-oss models (built from their config classes, nothing downloaded)
match the model's own sdpa / eager attention under the conformance rule, padded and packed, for the
logits and for a training step's gradients."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    masking_utils,
)

import attnhub
from attnhub.conformance.tolerance import check
from attnhub.integrations import transformers as integration

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, attention_dropout=0.0)
LENGTHS = (19, 12, 5)  # one padded batch of three rows, or one packed row of 36 tokens
# Padded rows stay within a window (6) of the longest: a padding query whose window holds no
# token is a fully masked row, NaN in transformers' float64 eager attention (its softmax
# runs in float32, where float64's most negative number is -inf), which the oracle needs.
PADDED_LENGTHS = (19, 14, 16)

# (name, model class, config, the implementation the model ships that attnhub must match)
MODELS = [
    ("llama", LlamaForCausalLM, lambda: LlamaConfig(**TINY), "sdpa"),
    ("qwen2", Qwen2ForCausalLM,  # layer 1 slides over 6 tokens, layer 0 is full
     lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=6,
                         max_window_layers=1), "sdpa"),
    ("mistral", MistralForCausalLM, lambda: MistralConfig(**TINY, sliding_window=7), "sdpa"),
    ("gemma2", Gemma2ForCausalLM,  # per-layer windows, logit softcap, query_pre_attn_scalar
     lambda: Gemma2Config(**TINY, sliding_window=6, attn_logit_softcapping=3.0,
                          final_logit_softcapping=None, query_pre_attn_scalar=24), "eager"),
    ("gpt-oss", GptOssForCausalLM,  # learned attention sinks (s_aux), sliding / full layers;
     # the experts' loop in eager (grouped_mm takes no float64, which the oracle needs)
     lambda: GptOssConfig(**TINY, sliding_window=6, num_local_experts=4,
                          num_experts_per_tok=2, experts_implementation="eager"), "eager"),
]


def _build(cls, config, impl: str, state: dict, dtype: torch.dtype):
    model = cls._from_config(config, attn_implementation=impl).to(dtype)
    model.load_state_dict(state)
    model.train()  # training mode; attention_dropout is 0 so the outputs are deterministic
    return model


def _padded_batch(lengths=PADDED_LENGTHS):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels), mask.bool()


def _packed_batch(with_cu_seqlens: bool):
    batch, mask = _padded_batch(LENGTHS)
    ids = batch["input_ids"][mask][None]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *LENGTHS[:-1]]).cumsum(0)
    labels[0, starts] = -100  # no label crosses from one packed sequence into the next
    inputs = dict(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    extra = {}
    if with_cu_seqlens:  # what DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS),
                     max_length_k=max(LENGTHS))
    return inputs, extra, torch.ones_like(ids, dtype=torch.bool)


def _step(model, inputs: dict, extra: dict):
    out = model(**inputs, **extra)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.logits, grads


@pytest.mark.parametrize("layout", ["padded", "packed", "packed-cu_seqlens"])
@pytest.mark.parametrize(("name", "cls", "make_config", "ref_impl"), MODELS,
                         ids=[m[0] for m in MODELS])
def test_matches_model_attention(name, cls, make_config, ref_impl, layout):
    if name == "gpt-oss" and layout != "padded":
        pytest.skip("transformers' gpt-oss builds its masks without position_ids, so its own "
                    "attention (the oracle) does not see packed sequences")
    config = make_config()
    torch.manual_seed(0)
    state = cls(config).state_dict()
    if layout == "padded":
        inputs, valid = _padded_batch()
        extra = {}
    else:
        inputs, extra, valid = _packed_batch(with_cu_seqlens=layout == "packed-cu_seqlens")
    oracle_logits, oracle_grads = _step(_build(cls, config, ref_impl, state, torch.float64),
                                        inputs, {})
    ref_logits, ref_grads = _step(_build(cls, config, ref_impl, state, torch.float32),
                                  inputs, {})
    got_logits, got_grads = _step(_build(cls, config, "attnhub", state, torch.float32),
                                  inputs, extra)
    checks = [check("logits", got_logits[valid], oracle_logits[valid], ref_logits[valid],
                    torch.float32)]
    assert got_grads.keys() == oracle_grads.keys()
    checks += [check(f"grad {p}", got_grads[p], oracle_grads[p], ref_grads[p], torch.float32)
               for p in oracle_grads]
    failures = [f"{c.output}: {c.failure}" for c in checks if not c.ok]
    assert not failures, "\n".join(failures)


def test_windows_and_softcap_are_passed_per_layer(monkeypatch):
    """Gemma 2's sliding layer gets window (w - 1, 0), its full layer none, both the softcap
    and the config's scaling; dropout reaches attnhub in training and is 0 in eval."""
    calls = []

    def spy(q, k, v, info_q, info_k, **kw):
        calls.append(kw)
        return attnhub.attention_forward_varlen(q, k, v, info_q, info_k, **kw)

    monkeypatch.setattr(integration, "attention_forward_varlen", spy)
    config = Gemma2Config(**{**TINY, "attention_dropout": 0.25}, sliding_window=6,
                          attn_logit_softcapping=3.0, query_pre_attn_scalar=24)
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="attnhub")
    inputs, _ = _padded_batch()
    model.train()(**inputs)
    model.eval()(**inputs)
    assert [c["window_size"] for c in calls] == [(5, 0), None] * 2
    assert all(c["softcap"] == 3.0 and c["causal"] for c in calls)
    assert all(c["softmax_scale"] == pytest.approx(24 ** -0.5) for c in calls)
    assert [c["dropout_p"] for c in calls] == [0.25, 0.25, 0.0, 0.0]


def test_layout_read_back_once_per_forward(monkeypatch):
    """The padding layout is computed once per forward pass, not once per layer."""
    builds = []
    original = integration._from_padding
    monkeypatch.setattr(integration, "_from_padding",
                        lambda *a: builds.append(1) or original(*a))
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY), attn_implementation="attnhub")
    inputs, _ = _padded_batch()
    model(**inputs)
    assert len(builds) == 1


def test_register_under_another_name():
    assert integration.register("attnhub-varlen") == "attnhub-varlen"
    assert "attnhub-varlen" in transformers.AttentionInterface()
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY),
                                          attn_implementation="attnhub-varlen")
    assert model.config._attn_implementation == "attnhub-varlen"


class _Module(torch.nn.Module):
    is_causal = True


def _qkv(batch=2, length=5):
    return (torch.randn(batch, 4, length, 16), torch.randn(batch, 2, length, 16),
            torch.randn(batch, 2, length, 16))


@pytest.mark.parametrize(("kwargs", "argument"), [
    (dict(output_attentions=True), "output_attentions"),
    (dict(s_aux=torch.zeros(3)), "sinks"),
    (dict(attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool)), "attention_mask"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(cu_seq_lens_q=torch.tensor([0, 10], dtype=torch.int32)), "cu_seq_lens_q"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4], dtype=torch.int32),
          cu_seq_lens_k=torch.tensor([0, 4], dtype=torch.int32)), "cu_seq_lens_q"),
])
def test_what_attnhub_cannot_do_raises_with_the_reason(kwargs, argument):
    kwargs = {"attention_mask": None, **kwargs}
    with pytest.raises(attnhub.InvalidArgumentError, match=argument):
        integration.attention_forward(_Module(), *_qkv(), **kwargs)


@pytest.mark.parametrize(("mask_function", "piece"), [
    (masking_utils.or_masks(masking_utils.causal_mask_function,
                            masking_utils.blockwise_overlay(torch.zeros(1, 4, dtype=torch.long))),
     "or_masks"),
    (masking_utils.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)),
     "chunked_overlay"),
    (lambda b, h, q, kv: q >= kv, "<lambda>"),
])
def test_mask_patterns_attnhub_cannot_express_raise(mask_function, piece):
    """Image-token blocks (or_masks), chunked attention, custom functions: raised, never
    dropped; the patterns attnhub recomputes pass."""
    with pytest.raises(attnhub.InvalidArgumentError, match=piece):
        integration.padding_mask(1, 4, 4, mask_function=mask_function)
    ids = torch.zeros(1, 4, dtype=torch.long)
    for known in (masking_utils.causal_mask_function,
                  masking_utils.sliding_window_causal_mask_function(3),
                  masking_utils.and_masks(
                      masking_utils.remap_positions_for_packed_sequence(
                          masking_utils.causal_mask_function, ids),
                      masking_utils.packed_sequence_mask_function(ids))):
        assert integration.padding_mask(1, 4, 4, mask_function=known) is None


def test_decode_step_is_bottom_right_aligned():
    """q_len 1 against a longer cache: the query sees every key, as sdpa computes it."""
    q, k, v = _qkv(length=6)
    q = q[:, :, -1:]
    out, _ = integration.attention_forward(_Module(), q, k, v, None)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_left_padded_generation_with_a_kv_cache_matches_sdpa():
    """Prefill of a left-padded batch, then decode steps against the KV cache (q_len 1, the
    mask's last column for the queries, bottom-right causal): the step logits match sdpa."""
    config = MistralConfig(**TINY, sliding_window=7)
    torch.manual_seed(0)
    state = MistralForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, TINY["vocab_size"], (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    steps = {}
    for impl in ("sdpa", "attnhub"):
        model = _build(MistralForCausalLM, config, impl, state, torch.float32).eval()
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
        steps[impl] = (result.sequences, torch.stack(result.logits))
    assert torch.equal(steps["sdpa"][0], steps["attnhub"][0])
    torch.testing.assert_close(steps["attnhub"][1], steps["sdpa"][1], atol=1e-4, rtol=1e-4)
