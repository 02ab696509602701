"""RoMA itself: task embeddings, the routing snapshot (successful set, routing vectors),
neighbours in embedding space and the objective.

May import ``tuner.model`` and ``tuner.data``.
"""
