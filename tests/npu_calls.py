"""Recording the calls the npu adapter makes to torch_npu (the simulator standing in)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from attnhub.backends.npu import simulation

OPERATORS = ("npu_fusion_attention", "npu_fusion_attention_grad", "npu_fusion_attention_v2",
             "npu_fusion_attention_grad_v2", "npu_fusion_attention_v3",
             "npu_fusion_attention_grad_v3", "npu_fused_infer_attention_score")


SHORT = {"npu_fusion_attention": "fwd", "npu_fusion_attention_grad": "bwd",
         "npu_fusion_attention_v2": "fwd_v2", "npu_fusion_attention_grad_v2": "bwd_v2",
         "npu_fusion_attention_v3": "fwd_v3", "npu_fusion_attention_grad_v3": "bwd_v3",
         "npu_fused_infer_attention_score": "infer"}


@contextlib.contextmanager
def recorded_calls(short: bool = False) -> Iterator[list[tuple]]:
    """Within the block torch_npu is the simulator; every operator call is appended as
    (operator name, positional args, keyword args), or with ``short`` as (SHORT name,
    keyword args)."""
    with simulation.simulated() as module:
        calls: list[tuple[str, tuple, dict]] = []
        real = {name: getattr(module, name) for name in OPERATORS}

        def recording(name):
            def call(*args, **kwargs):
                calls.append((SHORT[name], kwargs) if short else (name, args, kwargs))
                return real[name](*args, **kwargs)
            return call

        for name in OPERATORS:
            setattr(module, name, recording(name))
        try:
            yield calls
        finally:
            for name, fn in real.items():
                setattr(module, name, fn)
