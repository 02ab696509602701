"""Training: the loop over epochs, checkpoints, data-parallel helpers.

May import ``tuner.roma``, ``tuner.model``, ``tuner.data``.
"""
