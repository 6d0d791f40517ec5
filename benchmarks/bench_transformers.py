"""transformers training throughput: forward + backward tokens per second of a 1B-class
random-initialised Llama-style model (bf16; hidden 2048, 16 layers, 32 query / 8 key-value
heads of 64, MLP 8192, vocab 32000: 1.1 B parameters) with attn_implementation "attnhub"
(auto dispatch, and forced to PyTorch's bundled FlashAttention-2, the flash_attention_2-style
varlen path: the flash_attn package is not needed), "sdpa" and "eager", on one set of mixed
sequence lengths laid out two ways:

* padded: a (batch, max_len) batch with an attention_mask;
* packed: the same tokens in one row, position_ids restarting per sequence (what
  DataCollatorWithFlattening produces; sdpa/eager then build a 4-D block-diagonal mask).

tokens/s counts real tokens only (no padding). An implementation that runs out of memory is
reported as such. Runs in about a minute on an H200 (model init, 2 warm-up and 5 timed steps
per row).

Run on a GPU: python benchmarks/bench_transformers.py [--out docs/benchmarks/FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import attnhub
from attnhub.integrations.transformers import register


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, max_position_embeddings=8192, attention_dropout=0.0)


def _lengths(seed: int, count: int, low: int, high: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


def _batches(lengths: list[int], vocab: int, device: str) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    packed = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    padded_labels = ids.masked_fill(mask == 0, -100)
    return {
        "padded": dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                       labels=padded_labels.to(device)),
        "packed": dict(input_ids=packed.to(device), position_ids=position_ids.to(device),
                       labels=packed.to(device), use_cache=False),
    }


def _tokens_per_s(model, batch: dict, tokens: int, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch).loss.backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return tokens * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = "cuda"
    name = register()
    config = _config()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    lengths = _lengths(0, args.sequences, args.min_len, args.max_len)
    tokens = sum(lengths)
    batches = _batches(lengths, config.vocab_size, device)
    rows = [(name, None), (name, "torch-flash"), ("sdpa", None), ("eager", None)]
    results: dict[tuple[str, str], str] = {}
    for impl, backend in rows:
        model.set_attn_implementation(impl)
        label = impl if backend is None else f"{impl} (backend {backend})"
        for layout, batch in batches.items():
            try:
                with attnhub.use_backend(backend):
                    value = _tokens_per_s(model, batch, tokens, args.warmup, args.steps)
                results[label, layout] = f"{value:,.0f}"
            except torch.cuda.OutOfMemoryError:
                results[label, layout] = "out of memory"
            except Exception as exc:  # reported in the table, the other rows still run
                results[label, layout] = f"{type(exc).__name__}: {str(exc)[:80]}"
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"{label:32s} {layout:7s} {results[label, layout]}", flush=True)
    chosen = attnhub.explain(
        torch.empty(tokens, 32, 64, device=device, dtype=torch.bfloat16),
        torch.empty(tokens, 8, 64, device=device, dtype=torch.bfloat16),
        torch.empty(tokens, 8, 64, device=device, dtype=torch.bfloat16),
        attnhub.VarlenInfo.from_lengths(lengths, device),
        attnhub.VarlenInfo.from_lengths(lengths, device), causal=True).selected
    lines = [
        f"# transformers forward + backward throughput ({datetime.date.today()})",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, attnhub {attnhub.__version__} (auto dispatch selects "
        f"`{chosen}` for these calls). Llama-style model, {params / 1e9:.2f} B parameters, "
        "bf16, random init; one training step = forward + loss + backward (no optimizer). "
        f"{len(lengths)} sequences of {min(lengths)}-{max(lengths)} tokens ({tokens} tokens; "
        f"lengths {lengths}); padded: ({len(lengths)}, {max(lengths)}) with attention_mask; "
        f"packed: (1, {tokens}) with restarting position_ids. {args.warmup} warm-up and "
        f"{args.steps} timed steps. Real tokens per second (higher is better).",
        "",
        "| attn_implementation | padded | packed |",
        "|---|---:|---:|",
    ]
    for impl, backend in rows:
        label = impl if backend is None else f"{impl} (backend {backend})"
        lines.append(f"| {label} | {results[label, 'padded']} | {results[label, 'packed']} |")
    lines += ["", "`attnhub (backend torch-flash)` runs PyTorch's bundled FlashAttention-2 "
              "through the same varlen integration: the flash_attention_2-style path "
              "(transformers' own `flash_attention_2` needs the flash_attn package, absent "
              "here)."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
