"""Placeholder until the op family is implemented."""


def decode_attention(*args, **kwargs):
    raise NotImplementedError("decode_attention is not implemented yet")
