"""Synthetic task data and a small pretrained MoE for benchmarks and the demo."""
