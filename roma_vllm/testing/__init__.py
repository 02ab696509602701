"""Test and benchmark helpers: tiny MoE checkpoints built in code, handmade deltas, a
vLLM server in a subprocess. The plugin never imports this package.
"""

from roma_vllm.testing.helpers import (
    VllmServer,
    free_port,
    handmade_deltas,
    vllm_command,
    write_handmade_deltas,
    write_merged_checkpoint,
)

__all__ = [
    "VllmServer",
    "free_port",
    "handmade_deltas",
    "vllm_command",
    "write_handmade_deltas",
    "write_merged_checkpoint",
]
