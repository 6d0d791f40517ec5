"""attnhub-example-backend: a small out-of-tree attnhub backend, ``example-sdpa``.

It computes varlen attention on the CPU one sequence at a time with
``torch.nn.functional.scaled_dot_product_attention`` and an explicit boolean mask, and is
registered with attnhub through the entry-point group ``attnhub`` (see ``plugin.py``).
"""

from .backend import ExampleSDPABackend

__version__ = "0.1.0"
__all__ = ["ExampleSDPABackend"]
