"""What every rendered object needs to survive a production cluster's ordinary day (issue 24,
docs/production.md): engines told to drain on SIGTERM with a grace period above it, routers that
drain, rollouts that surge, budgets counted in replicas (groups for multi-node), probes that do not
kill a loaded engine, Pod Security. Checked for every example on every fleet profile, and the
budget arithmetic against a model of the disruption controller written from the Kubernetes docs.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.vllm_cli import serve_argvs_in_script
from toposerve.api.config import OperatorConfig
from toposerve.api.manifest import load_manifests
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.dev import fleet
from toposerve.planner.inventory import inventory_from_nodes
from toposerve.planner.plan import plan_deployment
from toposerve.render.disruption import disruption, in_place_outage
from toposerve.render.objects import (
    ENGINE_TEARDOWN_SECONDS,
    MOCK_TEARDOWN_SECONDS,
    render_deployment,
)

from .conftest import make_spec
from .test_placement_profiles import EXAMPLES, EXTRA, FLEET, PROFILES, ROOT

L70 = "meta-llama/Llama-3.1-70B-Instruct"


def rendered(
    example: str, profile: str, config: OperatorConfig
) -> list[tuple[LLMDeploymentSpec, list[dict[str, Any]]]]:
    nodes = fleet.nodes(FLEET, profile)
    inventory = inventory_from_nodes(nodes, config.catalog(), config.label_schemes)
    text = EXTRA[example] if example in EXTRA else (ROOT / "examples" / example).read_text()
    out = []
    for dep in load_manifests(text):
        plan = plan_deployment(dep.name, dep.spec, config, inventory)
        out.append((dep.spec, render_deployment(dep.name, "ns", dep.spec, plan, config)))
    return out


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]["spec"]]
    if obj["kind"] == "LeaderWorkerSet":
        t = obj["spec"]["leaderWorkerTemplate"]
        return [t["leaderTemplate"]["spec"], t["workerTemplate"]["spec"]]
    return []


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


CASES = [
    pytest.param(ex, prof, id=f"{ex.removesuffix('.yaml')}-{prof}") for ex in EXAMPLES for prof in PROFILES
]


@pytest.mark.parametrize(("example", "profile"), CASES)
@pytest.mark.parametrize("engine", ["vllm", "mock"])
def test_every_pod_drains_within_its_grace_period(example: str, profile: str, engine: str) -> None:
    config = OperatorConfig(auto_engine=engine, engine_shutdown_timeout_seconds=90, pre_stop_seconds=7)
    for _spec, objs in rendered(example, profile, config):
        for o in objs:
            for pod in pod_specs(o):
                (c,) = pod["containers"]
                assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
                if c["name"] == "router":
                    drain = float(flag(c["args"], "--drain-timeout") or 0)
                    assert drain == 90 and pod["terminationGracePeriodSeconds"] > 7 + drain
                    assert flag(c["args"], "--host") == "::"  # dual-stack
                    continue
                # vLLM 0.33.0 defaults --shutdown-timeout to 0 = abort: it must be rendered, on
                # multi-node workers too (their vllm serve runs from the leader-wait script).
                wrapped = c["command"][:2] == ["/bin/sh", "-c"]
                (argv,) = serve_argvs_in_script(c["command"][2], {}) if wrapped else [c["args"]]
                assert flag(argv, "--shutdown-timeout") == "90", argv
                vllm = wrapped or c["command"][0] == "vllm"
                teardown = ENGINE_TEARDOWN_SECONDS if vllm else MOCK_TEARDOWN_SECONDS
                assert pod["terminationGracePeriodSeconds"] == 7 + 90 + teardown


@pytest.mark.parametrize(("example", "profile"), CASES)
def test_probes_have_explicit_timeouts_and_liveness_tolerates_a_long_prefill(
    example: str, profile: str
) -> None:
    for _spec, objs in rendered(example, profile, OperatorConfig(auto_engine="vllm")):
        for o in objs:
            for pod in pod_specs(o):
                (c,) = pod["containers"]
                probes = [c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c]
                for p in probes:
                    assert p.get("timeoutSeconds", 1) > 1, (o["metadata"]["name"], p)
                if c["name"] == "engine" and "livenessProbe" in c:
                    lp = c["livenessProbe"]
                    # a restart reloads the model: only after minutes of silence, never one slow answer
                    assert lp["timeoutSeconds"] >= 5 and lp["periodSeconds"] * lp["failureThreshold"] >= 120
                    assert c["readinessProbe"]["timeoutSeconds"] >= 5


RESTRICTED_CAPS_OK = {"NET_BIND_SERVICE"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The `restricted` Pod Security Standard's checks (kubernetes.io/docs/concepts/security/
    pod-security-standards, v1.35), for what our pods can set."""
    out = []
    psc = pod.get("securityContext") or {}
    for c in pod["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot must be true")
        if (sc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
            out.append(f"{c['name']}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{c['name']}: capabilities must drop ALL")
        if set(caps.get("add") or []) - RESTRICTED_CAPS_OK:
            out.append(f"{c['name']}: may add only NET_BIND_SERVICE")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"volume {v['name']}: hostPath")
    return out


@pytest.mark.parametrize(("example", "profile"), CASES)
def test_routers_and_mock_engines_meet_restricted_and_vllm_engines_baseline_plus(
    example: str, profile: str
) -> None:
    for engine in ("mock", "vllm"):
        for _spec, objs in rendered(example, profile, OperatorConfig(auto_engine=engine)):
            for o in objs:
                for pod in pod_specs(o):
                    (c,) = pod["containers"]
                    if c["name"] == "router" or engine == "mock":
                        assert restricted_violations(pod) == [], o["metadata"]["name"]
                    else:
                        # vLLM images run as root and write caches to volumes owned by others:
                        # no privilege escalation, the runtime's seccomp profile, nothing added.
                        assert c["securityContext"]["allowPrivilegeEscalation"] is False
                        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
                        assert not (c["securityContext"].get("capabilities") or {}).get("add")


@pytest.mark.parametrize(("example", "profile"), CASES)
def test_rollouts_surge_by_default_and_budgets_count_replicas(example: str, profile: str) -> None:
    for _spec, objs in rendered(example, profile, OperatorConfig(auto_engine="vllm")):
        budgets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodDisruptionBudget"}
        for o in objs:
            if (
                o["kind"] == "Deployment"
                and o["metadata"]["labels"].get("app.kubernetes.io/component") != "router"
            ):
                assert o["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
            if o["kind"] == "LeaderWorkerSet":
                assert o["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {
                    "maxSurge": 1,
                    "maxUnavailable": 0,
                }
        for name, b in budgets.items():
            assert b["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", name
            if not name.endswith("-router"):  # routers: a Deployment of 2, one at a time
                assert "maxUnavailable" not in b["spec"] and isinstance(b["spec"]["minAvailable"], int), name


def test_in_place_strategy_frees_gpus_first() -> None:
    spec = make_spec(L70, 8192, ["H100"], replicas=3, disruption={"strategy": "InPlace"})
    config = OperatorConfig()
    objs = render_deployment("llm", "ns", spec, plan_deployment("llm", spec, config), config)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-default-h100")
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    pdb = next(
        o for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "llm-default-h100"
    )
    assert pdb["spec"]["minAvailable"] == 2


def test_shutdown_timeout_in_extra_args_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="shutdownTimeoutSeconds"):
        make_spec(L70, 8192, ["H100"], serving={"extraArgs": ["--shutdown-timeout=5"]})
    spec = make_spec(L70, 8192, ["H100"], serving={"shutdownTimeoutSeconds": 0})
    config = OperatorConfig()
    objs = render_deployment("llm", "ns", spec, plan_deployment("llm", spec, config), config)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "llm-default-h100")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert flag(c["args"], "--shutdown-timeout") == "0"  # abort, as asked: the spec wins


# -- the budgets against the disruption controller ---------------------------------------------------


def evict_until_blocked(min_available: int, healthy: int, size: int, rnd: random.Random) -> set[int]:
    """The eviction API against one budget (Kubernetes docs, "API-initiated eviction" and the
    disruption controller): an eviction is allowed while healthy - disrupted > minAvailable - 1,
    i.e. disruptionsAllowed = healthy - minAvailable > 0; each allowed eviction is recorded in
    disruptedPods at once. Pods are `size` per group; evicting one pod of a group takes the group
    (RecreateGroupOnPodRestart), which the controller sees later. Several drains race: they pick
    pods at random until the budget refuses. Returns the groups hit."""
    groups = healthy // size
    pods = [(g, i) for g in range(groups) for i in range(size)]
    rnd.shuffle(pods)
    hit: set[int] = set()
    for disrupted, (g, _) in enumerate(pods):
        if healthy - disrupted - min_available <= 0:
            break
        hit.add(g)
    return hit


@pytest.mark.parametrize("seed", range(20))
def test_budgets_disrupt_at_most_one_replica_or_group_and_surge_none_without_a_spare(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(50):
        replicas, size = rnd.randint(0, 8), rnd.choice([1, 1, 2, 4])
        for strategy in ("Surge", "InPlace"):
            d = disruption(strategy, replicas, size)  # type: ignore[arg-type]
            hit = evict_until_blocked(d.min_available, replicas * size, size, rnd)
            assert len(hit) <= 1, (strategy, replicas, size, hit)
            if strategy == "Surge" and size == 1:
                assert hit == set()  # only a surged replacement makes room
                # with one spare replica up, exactly one may go
                assert len(evict_until_blocked(d.min_available, (replicas + 1), 1, rnd)) == 1
            elif replicas > 0:
                assert len(hit) == 1  # drains progress, one replica (group) at a time
            assert in_place_outage(strategy, replicas, size) == (
                replicas == 1 and (strategy == "InPlace" or size > 1)
            )


# -- the consequence of the strategy, in status and Events ----------------------------------------


def _llmd(replicas: int, strategy: str) -> dict[str, Any]:
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "maxContextLength": 4096},
            "engine": "mock",
            "replicas": replicas,
            "disruption": {"strategy": strategy},
        },
    }


@pytest.mark.parametrize(
    ("replicas", "strategy", "outage"),
    [(1, "InPlace", True), (2, "InPlace", False), (1, "Surge", False), (3, "Surge", False)],
)
def test_status_states_what_a_drain_costs_and_an_outage_is_an_event_once(
    replicas: int, strategy: str, outage: bool
) -> None:
    from tests.unit.controller.test_pool_scaling import FakeKube
    from toposerve.controller.reconcile import Context, reconcile

    kube = FakeKube(_llmd(replicas, strategy), fleet.nodes(FLEET, "onprem"))
    ctx = Context(kube=kube, config=OperatorConfig())  # type: ignore[arg-type]
    reconcile(ctx, "ns", "m")
    (pool,) = kube.body["status"]["pools"]
    assert pool["disruption"].startswith(strategy)
    assert ("down" in pool["disruption"]) == outage, pool["disruption"]
    said = [m for r, m, warn in kube.events if r == "DisruptionOutage" and warn]
    assert len(said) == (1 if outage else 0), kube.events
    reconcile(ctx, "ns", "m")  # the status already says so: no second Event
    assert len([r for r, _, _ in kube.events if r == "DisruptionOutage"]) == len(said)


@pytest.mark.parametrize("strategy", ["Surge", "InPlace"])
@pytest.mark.parametrize("replicas", [0, 1, 2, 5])
@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_the_note_names_an_outage_exactly_when_there_is_one(strategy: str, replicas: int, nodes: int) -> None:
    from toposerve.render.disruption import disruption_note

    note = disruption_note(strategy, replicas, nodes)  # type: ignore[arg-type]
    assert ("down" in note) == in_place_outage(strategy, replicas, nodes)  # type: ignore[arg-type]
    assert note.startswith(strategy)
