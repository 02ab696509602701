"""roma-vllm: serve RoMA-tuned MoE routers in vLLM.

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process.
It must stay cheap and re-entrant; the heavy imports happen in :mod:`roma_vllm.loader`.
"""

from roma_vllm._version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """Register the ``roma`` load format with vLLM (idempotent)."""
    from roma_vllm.loader import register_loader

    register_loader()
