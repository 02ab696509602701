"""`roma-tune run`: the stages in order, their cache and the run directory.

May import everything below it (train, roma, export, model, data).
"""
