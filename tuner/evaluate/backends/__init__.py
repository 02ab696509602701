"""Scoring backends: each turns encoded rows into per-sample results (``..results``)."""
