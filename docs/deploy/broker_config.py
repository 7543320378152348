# /etc/jupyter-singularity/broker_config.py: the node broker's settings (SingularityBroker), read by
#   jupyter singularity broker --config=/etc/jupyter-singularity/broker_config.py
c = get_config()  # noqa: F821 (defined by traitlets when it reads this file)

c.SingularityBroker.socket = "/run/jupyter-singularity/broker.sock"
c.SingularityBroker.identity = "unix"  # users are Unix users (LocalProcessSpawner, SystemdSpawner)
c.SingularityBroker.admin_groups = ["gpu-admins"]
c.SingularityBroker.devices = "auto"  # every GPU NVML finds (CUDA_VISIBLE_DEVICES narrows it)
c.SingularityBroker.spill_dir = "/var/lib/jupyter-singularity/spill"
c.SingularityBroker.db_url = "sqlite:////var/lib/jupyter-singularity/ledger.sqlite"
c.SingularityBroker.quota_file = "/etc/jupyter-singularity/quotas.yaml"
c.SingularityBroker.host_memory_limit = "64GiB"
c.SingularityBroker.metrics_address = "127.0.0.1:9767"
