"""jupyter-singularity: a pool of GPUs that Jupyter kernels share in time."""

from ._version import __version__

__all__ = ["__version__"]
