"""Checkpoint loaders (HF directory, GGUF, dummy); `adrenaline_py.loader` picks one by the model spec.

Submodules are imported where they are used, so a machine without the `gguf` package can still
load HF and dummy checkpoints.
"""
