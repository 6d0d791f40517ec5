"""The triton backend: attnhub's own varlen FlashAttention kernels (forward + backward).

Kernels live in ``forward.py`` / ``backward.py``; ``tiles.py`` plans the flat tile lists;
``configs.py`` holds block sizes. Importing this package does not import triton.
"""
