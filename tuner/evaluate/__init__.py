"""`roma-tune eval`: accuracy of base and tuned routers, through vLLM with the plugin
(``backends.vllm``) or through transformers (``backends.hf``, the tuner's own forward).

May import ``tuner.export``, ``tuner.model``, ``tuner.data``.
"""
