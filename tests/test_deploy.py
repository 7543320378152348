"""The cluster deployment files: the Kubernetes manifests validate against the API schemas of a
pinned Kubernetes version, the Zero to JupyterHub values against the chart's own schema, their
wiring matches the broker's and the extension's settings (read from the code, so a renamed
setting fails here), and every metric the Grafana dashboard queries is one a real broker exports.

None of this runs a cluster: docs/deploy/kubernetes.md says what was only validated."""

from __future__ import annotations

import copy
import json
import re
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers import node_broker

from jupyter_singularity.broker.app import SingularityBroker
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.server.app import BROKER_URL_ENV
from jupyter_singularity.usage import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted((KUBERNETES / "manifests").glob("*.yaml"))
VALUES = KUBERNETES / "z2jh-values.yaml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))
CHART = Path(__file__).resolve().parent / "data" / "z2jh-4.3.2"
#: The Kubernetes API the manifests are checked against (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.34.0"
#: What the DaemonSet's $(VAR) references stand for in the wiring test.
POD_ENV = {"NODE_NAME": "gpu-node-7", "POD_IP": "10.1.2.3"}


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[str, dict]:
    """Every object of deploy/kubernetes/manifests by kind."""
    objects = [doc for path in MANIFESTS for doc in documents(path)]
    by_kind = {doc["kind"]: doc for doc in objects}
    assert len(by_kind) == len(objects), "one object of each kind"
    return by_kind


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def merged(defaults: dict, overrides: dict) -> dict:
    """Helm's merge of values files: mappings merge, everything else (lists too) is replaced."""
    out = dict(defaults)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def container() -> dict:
    (broker,) = manifests()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return broker


def pod_spec() -> dict:
    return manifests()["DaemonSet"]["spec"]["template"]["spec"]


def mount_of(volumes: list[dict], mounts: list[dict], path: str) -> dict:
    """The volume (of ``volumes``) that ``mounts`` mount at ``path`` exactly."""
    (mount,) = [m for m in mounts if m["mountPath"] == path] or [None]
    assert mount is not None, f"nothing is mounted at {path}"
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    return volume


def expanded(text: str) -> str:
    """Kubernetes' $(VAR) expansion of container args from the pod's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m.group(1)], text)


@pytest.fixture
def broker_settings(tmp_path: Path) -> SingularityBroker:
    """The broker as the DaemonSet starts it: its args (env references expanded) and the
    configuration file from the ConfigMap, through the broker's own command line parser."""
    config_map = manifests()["ConfigMap"]
    broker = container()
    args = [expanded(arg) for arg in broker["args"]]
    (config_arg,) = [a for a in args if a.startswith("--config=")]
    config_path = Path(config_arg.split("=", 1)[1])
    # Where `jupyter singularity usage` looks for the ledger's URL (kubectl exec into a broker).
    assert str(config_path) == DEFAULT_CONFIG
    volume = mount_of(pod_spec()["volumes"], broker["volumeMounts"], str(config_path.parent))
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    local = tmp_path / config_path.name
    local.write_text(config_map["data"][config_path.name])
    app = SingularityBroker()
    app.initialize([f"--config={local}" if a == config_arg else a for a in args])
    # The quota file comes from the same ConfigMap, and it is one the broker accepts.
    quota_path = Path(app.quota_file)
    assert quota_path.parent == config_path.parent
    Quotas.parse(yaml.safe_load(config_map["data"][quota_path.name]))
    return app


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_api(path: Path) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validation_catches_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(manifests()["DaemonSet"])
    spec = daemonset["spec"]["template"]["spec"]
    spec["hostPid"] = spec.pop("hostPID")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_values_validate_against_the_charts_schema() -> None:
    schema = yaml.safe_load((CHART / "values.schema.yaml").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{list(e.path)}: {e.message}" for e in validator.iter_errors(merged(defaults, values()))
    ]
    assert not errors
    misspelt = merged(defaults, {"singleuser": {"storage": {"extraVolumeMount": []}}})
    assert list(validator.iter_errors(misspelt))


# ----------------------------------------------------------------------------------- wiring


def test_every_setting_of_the_config_and_args_is_one_of_the_broker() -> None:
    """traitlets only warns about an unknown setting: a renamed one would be ignored silently."""
    settings = set(SingularityBroker.class_trait_names(config=True))
    text = manifests()["ConfigMap"]["data"]["broker_config.py"]
    text += "\n".join(container()["args"])
    named = set(re.findall(r"SingularityBroker\.(\w+)", text))
    assert named and named <= settings, sorted(named - settings)


def test_the_socket_is_where_the_broker_makes_it_and_the_servers_look(broker_settings) -> None:
    socket_dir = str(Path(broker_settings.socket).parent)
    host = mount_of(pod_spec()["volumes"], container()["volumeMounts"], socket_dir)["hostPath"]
    single_user = values()["singleuser"]
    storage = single_user["storage"]
    user_volume = mount_of(
        storage["extraVolumes"],
        storage["extraVolumeMounts"],
        socket_dir,  # the kernels are told the kernel socket's path as the broker sees it
    )
    assert user_volume["hostPath"]["path"] == host["path"]
    assert single_user["extraEnv"][BROKER_URL_ENV] == f"unix://{broker_settings.socket}"


def test_kernels_spill_where_the_broker_tells_them(broker_settings) -> None:
    storage = values()["singleuser"]["storage"]
    volume = mount_of(
        storage["extraVolumes"], storage["extraVolumeMounts"], broker_settings.spill_dir
    )
    assert volume == {"name": volume["name"], "emptyDir": {}}


def test_the_ledger_lives_on_the_node(broker_settings) -> None:
    assert broker_settings.db_url.startswith("sqlite:////")
    ledger_dir = Path(broker_settings.db_url.removeprefix("sqlite:///")).parent
    assert "hostPath" in mount_of(
        pod_spec()["volumes"], container()["volumeMounts"], str(ledger_dir)
    )


def test_the_broker_is_a_hub_service_in_token_mode(broker_settings, monkeypatch) -> None:
    from jupyterhub.services.auth import HubAuth

    assert broker_settings.identity == "jupyterhub"
    hub = values()["hub"]
    (service,) = hub["services"]
    roles = [r for r in hub["loadRoles"].values() if service in r.get("services", [])]
    assert roles and "read:users" in roles[0]["scopes"]
    env = {e["name"]: e for e in container()["env"]}
    secret = {"name": "hub", "key": f"hub.services.{service}.apiToken"}
    token_env = [n for n, e in env.items() if e.get("valueFrom", {}).get("secretKeyRef") == secret]
    assert len(token_env) == 1
    # The names HubAuth, which resolves the tokens in the broker, reads its settings from.
    monkeypatch.setenv(token_env[0], "the-service-token")
    for name, entry in env.items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    auth = HubAuth()
    assert auth.api_token == "the-service-token"
    assert auth.api_url == env["JUPYTERHUB_API_URL"]["value"] == "http://hub:8081/hub/api"


def test_the_node_name_comes_from_the_pod(broker_settings) -> None:
    assert broker_settings.node_name == POD_ENV["NODE_NAME"]
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_metrics_port_probes_service_and_scrape_agree(broker_settings) -> None:
    host, _, port = broker_settings.metrics_address.rpartition(":")
    assert host == POD_ENV["POD_IP"]
    broker = container()
    (named,) = [p for p in broker["ports"] if p["name"] == "metrics"]
    assert named["containerPort"] == int(port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert broker[probe]["httpGet"] == {"path": "/health", "port": "metrics"}
    service = manifests()["Service"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "metrics" and service_port["port"] == int(port)
    template = manifests()["DaemonSet"]["spec"]["template"]
    assert service["spec"]["selector"] == template["metadata"]["labels"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_every_gpu_of_the_node_and_none_claimed() -> None:
    single_user = values()["singleuser"]
    broker_env = {e["name"]: e.get("value") for e in container()["env"]}
    for env in (broker_env, single_user["extraEnv"]):
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert "nvidia.com/gpu" not in json.dumps(container()["resources"])
    assert "extraResource" not in single_user
    assert single_user["nodeSelector"] == pod_spec()["nodeSelector"]


def test_the_broker_runs_with_the_rights_the_driver_tier_needs_and_no_more() -> None:
    spec, security = pod_spec(), container()["securityContext"]
    assert spec["hostPID"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert container()["resources"]["requests"]


def test_the_image_starts_the_broker() -> None:
    text = (KUBERNETES / "Dockerfile").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, flags=re.M)
    jupyter, command, subcommand = json.loads(entrypoint)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert f"{jupyter}-{command}" in scripts  # `jupyter singularity` runs jupyter-singularity
    assert subcommand == "broker"


# -------------------------------------------------------------------------------- dashboard

#: PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects: strings, label matchers, ranges, grouping
    clauses and function calls taken out, what is left that is a name is a metric."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name.lower() not in _KEYWORDS}


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_promql_metric_names_are_found() -> None:
    assert promql_metrics(
        'histogram_quantile(0.95, sum by (le, node) (rate(a_bucket{node=~"$node"}[5m])))'
    ) == {"a_bucket"}
    assert promql_metrics('sum by (group) (b * on (node, user) group_right c{x="y"}) / 3600') == {
        "b",
        "c",
    }
    assert promql_metrics("label_values(d, node)") == {"d", "node"}  # the label: see below


@pytest.fixture
def exported(tmp_path: Path) -> tuple[set[str], list]:
    """The sample names a real ``jupyter singularity broker`` exports (every type's suffixes,
    also of families without samples yet), and its samples."""
    with node_broker(tmp_path, f"--SingularityBroker.node_name={POD_ENV['NODE_NAME']}") as broker:
        base = f"http://127.0.0.1:{broker.metrics_port}"
        with urllib.request.urlopen(f"{base}/health") as response:
            assert json.load(response) == {"status": "ok", "devices": 1}
        with urllib.request.urlopen(f"{base}/metrics") as response:
            text = response.read().decode()
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}
    names, samples = set(), []
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        samples.extend(family.samples)
    return names, samples


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_queries_only_metrics_the_broker_exports(path: Path, exported) -> None:
    names, samples = exported
    queried: set[str] = set()
    for expr in dashboard_queries(json.loads(path.read_text())):
        queried |= promql_metrics(expr)
    queried.discard("node")  # label_values(metric, node): a label
    assert queried, "the dashboard queries something"
    assert queried <= names, sorted(queried - names)
    # Every sample names its node, as the dashboard's node variable and sums expect.
    assert samples and {s.labels.get("node") for s in samples} == {POD_ENV["NODE_NAME"]}
