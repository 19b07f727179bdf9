"""Placeholder until the op family is implemented."""


def prefill_attention(*args, **kwargs):
    raise NotImplementedError("prefill_attention is not implemented yet")
