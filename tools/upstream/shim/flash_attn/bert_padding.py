"""``flash_attn.bert_padding`` -> attnhub.flash_attn.bert_padding (import shim)."""

from attnhub.flash_attn.bert_padding import (  # noqa: F401
    index_first_axis,
    index_put_first_axis,
    pad_input,
    unpad_input,
)
