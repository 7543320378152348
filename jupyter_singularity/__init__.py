"""jupyter-singularity: a pool of GPUs that Jupyter kernels share in time."""

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_server_extension_points() -> list[dict]:
    """The server extension; imported lazily so that kernels importing this package stay light."""
    from .server.app import SingularityApp

    return [{"module": "jupyter_singularity", "app": SingularityApp}]
