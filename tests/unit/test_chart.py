"""The Helm chart: lint, render with default and non-default values, Kubernetes schema, PodSecurity
`restricted`, values.schema.json, the operator config it hands over, versions."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit.chart_helpers import CHART, ROOT, by_kind, helm, template, template_error
from toposerve import __version__
from toposerve.api.config import OperatorConfig

K8S = "1.35"  # the local cluster's minor version (hack/cluster/versions.sh)
MONITORING = "monitoring.coreos.com/v1"

NON_DEFAULT: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.com/mirror/toposerve", "digest": "sha256:" + "a" * 64},
    "watchNamespaces": ["team-a", "team-b"],
    "operatorConfig": {"autoEngine": "mock", "hourlyPerGPU": {"H100": 2.5}, "spotHourlyPerGPU": {"L4": 0.3}},
    "operator": {"workers": 8, "fallbackAfterSeconds": 30, "logLevel": "debug", "extraArgs": ["--resync=120"]},
    "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
    "metrics": {"port": 9090, "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                "podMonitor": {"enabled": True}},
    "health": {"port": 9091},
    "serviceAccount": {"name": "custom-sa", "annotations": {"a": "b"}},
    "podDisruptionBudget": {"maxUnavailable": "50%"},
    "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]},
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    "priorityClass": {"create": True, "name": "toposerve-critical", "value": 100000},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "control-plane", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"team": "ml"},
    "healthAgent": {"enabled": True, "thresholds": {"maxTemperatureC": 83}, "runtimeClassName": "nvidia"},
}  # fmt: skip


def _is_gateway(o: dict[str, Any]) -> bool:
    return (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "gateway"


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    """The operator's objects with default values (the gateway's: `gateway`, test_chart_gateway.py)."""
    return [o for o in template() if not _is_gateway(o)]


@pytest.fixture(scope="module")
def custom() -> list[dict[str, Any]]:
    return [o for o in template(NON_DEFAULT, api_versions=[MONITORING]) if not _is_gateway(o)]


@pytest.fixture(scope="module")
def gateway() -> list[dict[str, Any]]:
    """The gateway's objects (on by default)."""
    return [o for o in template() if _is_gateway(o)]


def test_helm_lint_passes_with_default_and_non_default_values(tmp_path: Any) -> None:
    helm("lint", "--strict", str(CHART))
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT))
    helm("lint", "--strict", str(CHART), "--values", str(values))


def test_chart_version_is_the_operator_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__


def test_the_crd_ships_in_crds_identical_to_the_generated_one(default: list[dict[str, Any]]) -> None:
    assert (CHART / "crds/toposerve.io_llmdeployments.yaml").read_text() == (
        ROOT / "crds/toposerve.io_llmdeployments.yaml"
    ).read_text()
    assert [c["metadata"]["name"] for c in by_kind(default, "CustomResourceDefinition")] == [
        "llmdeployments.toposerve.io"
    ]
    assert not list((CHART / "templates").glob("*crd*")), "the CRD belongs in crds/ only"


@pytest.mark.parametrize("which", ["default", "custom", "gateway"])
def test_every_rendered_object_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    objs: list[dict[str, Any]] = request.getfixturevalue(which)
    checked = 0
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD's kind, not in the Kubernetes schema; checked below
        kubernetes_validate.validate(obj, K8S, strict=True)
        checked += 1
    assert checked >= (6 if which == "gateway" else 8)


def test_default_render_has_the_operator_objects(default: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in default)
    assert kinds == sorted([
        "CustomResourceDefinition", "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding", "Service", "Deployment", "PodDisruptionBudget",
    ])  # fmt: skip
    (dep,) = by_kind(default, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == f"ghcr.io/toposerve/toposerve:{__version__}"
    assert c["command"] == ["toposerve"] and c["args"][0] == "run"
    assert "--leader-elect" in c["args"]
    assert not [a for a in c["args"] if a.startswith("--namespace")], "default: all namespaces"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert "--metrics-port=8080" in c["args"] and "--liveness=http://$(POD_IP):8081/healthz" in c["args"]
    # Bound to the pod IP, which the env provides (the local cluster's pods share one netns).
    assert "--metrics-address=$(POD_IP)" in c["args"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    assert c["livenessProbe"]["httpGet"]["port"] == "health" == c["readinessProbe"]["httpGet"]["port"]
    assert dep["spec"]["replicas"] == 2
    assert pod["serviceAccountName"] == "toposerve"
    assert {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in c[
        "env"
    ]
    (pdb,) = by_kind(default, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_non_default_values_reach_the_objects(custom: list[dict[str, Any]]) -> None:
    (dep,) = by_kind(custom, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 3
    assert c["image"] == "registry.example.com/mirror/toposerve@sha256:" + "a" * 64
    assert [a for a in c["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert {
        "--workers=8",
        "--fallback-after=30",
        "--metrics-port=9090",
        "--resync=120",
        "--log-level=debug",
    } <= set(c["args"])
    assert "--liveness=http://$(POD_IP):9091/healthz" in c["args"]
    assert c["resources"]["limits"] == {"cpu": 1, "memory": "1Gi"}
    assert pod["serviceAccountName"] == "custom-sa"
    assert pod["priorityClassName"] == "toposerve-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert dep["spec"]["template"]["metadata"]["annotations"]["team"] == "ml"
    (pc,) = by_kind(custom, "PriorityClass")
    assert pc["metadata"]["name"] == "toposerve-critical" and pc["value"] == 100000
    (np,) = by_kind(custom, "NetworkPolicy")
    assert np["spec"]["egress"][0] == {"ports": [{"port": 6443, "protocol": "TCP"}],
                                       "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}  # fmt: skip
    (sm,) = by_kind(custom, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps" and sm["spec"]["endpoints"][0]["port"] == "metrics"
    (svc,) = by_kind(custom, "Service")
    assert svc["spec"]["selector"] == sm["spec"]["selector"]["matchLabels"]
    assert len(by_kind(custom, "PodMonitor")) == 1  # the gateway's: test_chart_gateway.py
    assert {r["metadata"]["namespace"] for r in by_kind(custom, "Role")} == {
        "team-a", "team-b", "toposerve-system"
    }  # fmt: skip


def test_monitors_need_the_prometheus_operator_api() -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}
    assert not [o for o in template(values) if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    kinds = [o["kind"] for o in template(values, api_versions=[MONITORING])]
    assert "ServiceMonitor" in kinds and "PodMonitor" in kinds


def test_config_change_rolls_the_operator() -> None:
    a = by_kind(template(), "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
    b = by_kind(template({"operatorConfig": {"autoEngine": "mock"}}), "Deployment")[0]
    assert a["checksum/config"] != b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


# ---- the operator config -----------------------------------------------------------------------


def _config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if "config.yaml" in c["data"]]  # not the health agent's
    data: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return data


def test_operator_config_is_rendered_verbatim_and_accepted_by_the_operator(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    cfg = _config(default)
    # the chart's gateway (on by default) is where the operator looks for it (autoscaler reads,
    # gateway-mode InferencePools' endpoint picker): its namespace and Service
    assert cfg == {
        "toposerveImage": f"ghcr.io/toposerve/toposerve:{__version__}",
        "gatewayNamespace": "toposerve-system",
        "gatewayService": "toposerve-gateway",
    }
    OperatorConfig.model_validate(cfg)
    other = _config(template({"gateway": {"enabled": True}}, namespace="platform", release="llm"))
    assert (other["gatewayNamespace"], other["gatewayService"]) == ("platform", "llm-toposerve-gateway")
    assert "gatewayNamespace" not in _config(template({"gateway": {"enabled": False}}))
    mine = {"gatewayNamespace": "gw", "gatewayService": "edge"}
    got = _config(template({"operatorConfig": mine}))
    assert (got["gatewayNamespace"], got["gatewayService"]) == ("gw", "edge")  # what the user set wins
    cfg = _config(custom)
    assert cfg == {**NON_DEFAULT["operatorConfig"], "toposerveImage": by_kind(custom, "Deployment")[0]["spec"]
                   ["template"]["spec"]["containers"][0]["image"],
                   "gatewayNamespace": "toposerve-system", "gatewayService": "toposerve-gateway"}  # fmt: skip
    loaded = OperatorConfig.model_validate(cfg)
    assert loaded.auto_engine == "mock" and loaded.hourly_per_gpu == {"H100": 2.5}
    # An unknown (say, newer) field passes through untouched: the operator, not the chart, decides.
    assert _config(template({"operatorConfig": {"someFutureField": {"a": [1, 2]}}}))["someFutureField"] == {
        "a": [1, 2]
    }
    assert _config(template({"operatorConfig": {"toposerveImage": "x/y:z"}}))["toposerveImage"] == "x/y:z"
    (dep,) = by_kind(default, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "--config=/etc/toposerve/config.yaml" in c["args"] and mounts["/etc/toposerve"] == "config"


# ---- PodSecurity restricted ----------------------------------------------------------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def pss_restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standards `restricted` profile (v1.35), checked on a pod spec."""
    bad: list[str] = []
    psc = pod.get("securityContext") or {}
    bad += [host for host in ("hostNetwork", "hostPID", "hostIPC") if pod.get(host)]
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {kinds}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    for c in (pod.get("initContainers") or []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            bad.append(f"{name}: must drop ALL capabilities")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if not (seccomp in ("RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp)):
            bad.append(f"{name}: seccompProfile RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:  # beyond `restricted`: the issue asks for it
            bad.append(f"{name}: readOnlyRootFilesystem")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                bad.append(f"{name}: hostPort")
    return bad


def pod_specs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append(o["spec"]["template"]["spec"])
        elif o["kind"] == "Pod":
            out.append(o["spec"])
    return out


@pytest.mark.parametrize("which", ["default", "custom", "gateway"])
def test_every_pod_template_is_pss_restricted(which: str, request: pytest.FixtureRequest) -> None:
    pods = pod_specs(request.getfixturevalue(which))
    assert pods
    for pod in pods:
        assert pss_restricted_violations(pod) == []


def test_the_pss_check_catches_violations(default: list[dict[str, Any]]) -> None:
    """The checker itself fails on what it must fail on (a check that passes everything proves nothing)."""
    pod = pod_specs(default)[0]
    for mutate, expected in [
        (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilege"),
        (
            lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
            "drop ALL",
        ),
        (lambda p: p["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False), "readOnly"),
        (lambda p: p.update(hostNetwork=True), "hostNetwork"),
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "volume h"),
        (lambda p: p["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
    ]:
        broken = yaml.safe_load(yaml.safe_dump(pod))
        mutate(broken)
        assert any(expected in v for v in pss_restricted_violations(broken)), expected
    broken = yaml.safe_load(yaml.safe_dump(pod))
    broken["securityContext"].pop("seccompProfile")
    broken["containers"][0]["securityContext"].pop("seccompProfile")
    assert any("seccomp" in v for v in pss_restricted_violations(broken))


# ---- values.schema.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"replicaCount": -1}, "replicaCount"),
        ({"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"image": {"repository": "x", "digest": "latest"}}, "digest"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"replicas": 2}, "replicas"),  # unknown key (a typo of replicaCount)
        ({"operatorConfig": "autoEngine: mock"}, "operatorConfig"),
        ({"resources": {"requests": {"memory": "lots"}}}, "memory"),
        ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "enabled"),
        ({"operator": {"logLevel": "loud"}}, "logLevel"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_field(values: dict[str, Any], needle: str) -> None:
    err = template_error(values)
    assert "values don't meet the specifications of the schema" in err, err
    assert needle in err, err


def test_priority_class_create_needs_a_name() -> None:
    assert "priorityClass.name is required" in template_error({"priorityClass": {"create": True}})
