"""``jupyter singularity simulate``: how many users a pool of GPUs serves, and how long they wait.

A trace of notebook activity (a file, the site's ledger, or generated) is replayed through the
pool's real decision core on a virtual clock, on pools of several sizes, beside three baselines
(a whole GPU per user, time-slicing, the idle culler). One concern per module: ``trace`` (the
format), ``generator``, ``ledger_trace``, ``site`` (pools and settings), ``transfers`` (the
bandwidth model), ``replay`` (the driver around the core), ``baselines``, ``outcome``
(waits and totals), ``sweep`` (all of it, and the answer), ``report`` and ``plot`` (output),
``command`` (the command line).
"""
