"""``flashinfer.jit`` (import shim): FlashInfer's ahead-of-time kernel builds. attnhub has
nothing to build (its Triton kernels compile on first use), so a spec list builds to nothing."""

from __future__ import annotations


class JitSpec:
    """A FlashInfer JIT build target; attnhub never creates one."""


class MissingJITCacheError(RuntimeError):
    """FlashInfer's error for a kernel missing from its JIT cache; never raised here."""


def build_jit_specs(specs, verbose: bool = False, skip_prebuilt: bool = True) -> None:
    """Nothing to build: attnhub's kernels compile on first use."""
