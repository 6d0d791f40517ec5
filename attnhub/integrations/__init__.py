"""Integrations of attnhub into other libraries' attention entry points.

* :mod:`attnhub.integrations.transformers`: ``attn_implementation="attnhub"`` for Hugging Face
  transformers 5.x.
* :mod:`attnhub.integrations.torch_flash`: attnhub as a PyTorch flash attention implementation
  (``torch.nn.attention.activate_flash_attention_impl("attnhub")``).
"""
