"""Placeholder until the op family is implemented."""


def write_kv(*args, **kwargs):
    raise NotImplementedError("write_kv is not implemented yet")


def copy_blocks(*args, **kwargs):
    raise NotImplementedError("copy_blocks is not implemented yet")
