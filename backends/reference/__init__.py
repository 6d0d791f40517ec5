"""The reference backend: pure PyTorch, every feature of docs/semantics.md.

``kernel.forward`` / ``kernel.backward`` take a ``compute_dtype`` (torch.float64 for the
conformance oracle).
"""

from .backend import ReferenceBackend

__all__ = ["ReferenceBackend"]
