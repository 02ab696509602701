"""Diagnostics: does RoMA's premise hold on a model and data set?

``report`` (neighbour agreement, expert purity, routing plots) and ``transplant`` (route a
wrong sample like its successful neighbours: does that fix it?).
May import ``tuner.roma``, ``tuner.model``, ``tuner.data``.
"""
