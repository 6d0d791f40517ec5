"""The `sdpa` backend: PyTorch's fused CPU attention kernel (what scaled_dot_product_attention
runs on the CPU), per group of equal-length sequences."""
