"""Server configuration for the browser tests (Galata/Playwright).

!! Never use this configuration in production: it opens the server without a token and exposes
JupyterLab's JavaScript objects to the page.

The pool runs on one simulated 2 GiB device, with its ledger in a fresh temporary file, so the tests
neither need a GPU nor touch the user's history. The kernels get SINGULARITY_SIMULATED=1: their first
`import torch` takes a lease, and their large CPU tensors are the "GPU" state that is offloaded and
restored. The tests' tensors (1 GiB, then 1.5 GiB) cannot both be resident on it.
"""

import os
import tempfile
from pathlib import Path

from jupyterlab.galata import configure_jupyter_server

configure_jupyter_server(c)  # noqa: F821

# CI and containers run as root.
c.ServerApp.allow_root = os.geteuid() == 0  # noqa: F821
c.ServerApp.port = int(os.environ.get("SINGULARITY_UI_PORT", "18888"))  # noqa: F821
c.SingularityApp.devices = "simulated:1x2GiB"  # noqa: F821
_state = Path(tempfile.mkdtemp(prefix="singularity-ui-"))
c.SingularityApp.db_url = f"sqlite:///{_state / 'ledger.sqlite'}"  # noqa: F821
c.SingularityApp.spill_dir = str(_state / "spill")  # noqa: F821
# An admin-editable quota file, so the quota editor can be exercised (and refused) for real.
_quota_file = _state / "quotas.yaml"
_quota_file.write_text("default:\n  gpu_hours_per_day: 8\n")
c.SingularityApp.quota_file = str(_quota_file)  # noqa: F821

# Uncomment to see the server's debug log
# c.ServerApp.log_level = "DEBUG"
