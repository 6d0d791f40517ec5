"""Stand-in for FlashInfer's tests/test_helpers/jit_utils.py (written for attnhub's runs of
FlashInfer's tests, tools/upstream/run.py): FlashInfer lists the JIT modules a test file
warms up; attnhub builds nothing ahead, so every list is empty."""


def gen_prefill_attention_modules(*args, **kwargs) -> list:
    return []


def gen_decode_attention_modules(*args, **kwargs) -> list:
    return []
