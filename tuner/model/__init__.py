"""The frozen model with trainable float32 routers: loading, the batched forward,
routing capture, per-choice scores and the frozen-layer cache.

May import ``tuner.data``; nothing above it.
"""
