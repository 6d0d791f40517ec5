"""The one window FlashAttention-2's varlen kernels cannot express.

FA2 (torch's bundled build and the flash_attn package alike) turns a window side of -1 into
max_seqlen_k when the other side is bounded (flash_api.cpp). For a window bounded on the left
only, a row i of a sequence with sq queries and sk keys then sees keys up to
i + sk - sq + max_seqlen_k instead of all of them: the first rows lose keys whenever
sq > max_seqlen_k + 1. Found by the conformance suite (window-sq>sk, H200, 2026-11-21).
"""

from __future__ import annotations

from attnhub.problem import VarlenProblem


def left_only_window_reasons(problem: VarlenProblem) -> list[str]:
    """A reason when the call has a left-only window and a sequence may have sq > sk."""
    left, right = problem.window
    if left < 0 or right >= 0 or problem.length_facts()[0] is True:
        return []
    return [f"window {problem.window} (bounded on the left only) with sequences that may have "
            "more queries than keys: FlashAttention-2 bounds the right side at max_seqlen_k, "
            "hiding keys from the first rows"]
