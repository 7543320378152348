"""The kernel runtime: an IPython extension loaded in every pooled kernel.

The provisioner starts IPython kernels with ``--IPKernelApp.extra_extensions=jupyter_singularity.kernel``;
loading it connects the kernel to its broker and adds the ``%singularity`` magic.
"""

from __future__ import annotations

from typing import Any

from .runtime import Runtime

__all__ = ["Runtime", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    Runtime.attach(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    Runtime.detach(ipython)
