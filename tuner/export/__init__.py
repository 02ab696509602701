"""Outputs: the delta file and run records; merging deltas into a full checkpoint.

May import ``tuner.model`` and ``roma_vllm``.
"""
