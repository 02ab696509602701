"""Data: rows from sources, the row schema, prompts and token ids.

Imports nothing from the rest of ``tuner`` except ``tuner.config``.
"""
