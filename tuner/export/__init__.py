"""Outputs: the delta file and run records; merging deltas into a full checkpoint; LoRA adapters.

May import ``tuner.model`` and ``roma_vllm``; ``lora_check`` (the ``--data`` check of a
truncated LoRA export) also reads rows with ``tuner.data``.
"""
