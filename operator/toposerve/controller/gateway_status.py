"""`status.gateway` of each LLMDeployment: whether the chart's gateway routes it, under which names,
with how many ready replicas behind it (docs/gateway.md).

Why the operator asks the gateway rather than computing it from the spec: only the gateway knows
whether it has picked the deployment up (its watches), whether a name went to an older
deployment (a conflict), and how many replicas it can reach. The operator reads every ready gateway
pod's `/health` (merged: each replica has the same table but its own loads) every
PERIOD_SECONDS and writes
`status.gateway` only when it changes (no timestamps in it: no write per period). A status write
alone does not trigger a reconcile (operator.trigger).

`gateway_status` is pure (spec and the gateway's answer in, the status out); `run` is the thin
loop, leader only like the autoscaler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from toposerve import API_GROUP, API_VERSION
from toposerve.api.manifest import parse_spec
from toposerve.api.spec import LLMDeploymentSpec
from toposerve.controller.kube import Kube

log = logging.getLogger("toposerve.gateway_status")
API = f"{API_GROUP}/{API_VERSION}"
PERIOD_SECONDS = 10.0
GATEWAY_PORT = 8080
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# the gateway's /health body (router/gateway.py): {"models": {name: ready replicas},
# "deployments": {"ns/name": {"models": [...], "readyReplicas": n}}, "conflicts": [...]}
Health = Mapping[str, Any]


def gateway_status(
    key: str, spec: LLMDeploymentSpec, health: Health | None, installed: bool
) -> dict[str, Any]:
    """What status.gateway says for deployment ``key`` (namespace/name), given a gateway's /health
    answer (None: no gateway answered; ``installed``: gateway pods exist)."""
    mode = spec.routing.effective_mode
    if mode == "none":
        return {"routed": False, "reason": "routing.mode is none: the gateway does not route it"}
    if not installed:
        return {"routed": False, "reason": "no gateway pods found (chart value gateway.enabled)"}
    if health is None:
        return {"routed": False, "reason": "no gateway pod answered /health"}
    deployments = health.get("deployments")
    mine = deployments.get(key) if isinstance(deployments, Mapping) else None
    here = set(mine.get("models") or ()) if isinstance(mine, Mapping) else set()
    names = spec.openai_model_names
    primary = spec.model.served_names[0]
    out: dict[str, Any] = {"routed": primary in here, "models": [n for n in names if n in here]}
    if isinstance(mine, Mapping):
        replicas = mine.get("readyReplicas")
        out["readyReplicas"] = int(replicas) if isinstance(replicas, int | float) else 0
        raw = mine.get("adapters")
        seen: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        adapters = []
        for a in spec.adapters:
            got = seen.get(a.name)
            one: Mapping[str, Any] = got if isinstance(got, Mapping) else {}
            n = one.get("replicas")
            entry: dict[str, Any] = {"name": a.name, "replicas": int(n) if isinstance(n, int | float) else 0}
            if isinstance(one.get("lastError"), str):
                entry["lastError"] = one["lastError"][:1024]
            adapters.append(entry)
        if adapters:
            out["adapters"] = adapters
    missing = [n for n in names if n not in here]
    conflicts = set(health.get("conflicts") or ()) & set(missing)
    if conflicts:
        out["reason"] = "name(s) kept by an older LLMDeployment: " + ", ".join(sorted(conflicts))
    elif missing:
        out["reason"] = "not (yet) in the gateway's table: " + ", ".join(missing)
    return out


def merge(answers: Iterable[Health]) -> Health | None:
    """One view from every gateway replica's /health: each replica has the same table, but its
    own loads (an adapter that failed to load through one replica is an error from that one only):
    names and deployments are united, replica counts the highest seen, an adapter's last error
    any replica's. None without answers."""
    answers = list(answers)
    if not answers:
        return None
    models: dict[str, int] = {}
    deps: dict[str, dict[str, Any]] = {}
    conflicts: set[str] = set()
    for h in answers:
        for m, n in (h.get("models") or {}).items():
            models[m] = max(models.get(m, 0), int(n) if isinstance(n, int | float) else 0)
        conflicts |= set(h.get("conflicts") or ())
        for key, d in (h.get("deployments") or {}).items():
            if not isinstance(d, Mapping):
                continue
            into = deps.setdefault(key, {"models": [], "readyReplicas": 0, "adapters": {}})
            into["models"] += [m for m in d.get("models") or () if m not in into["models"]]
            r = d.get("readyReplicas")
            into["readyReplicas"] = max(into["readyReplicas"], int(r) if isinstance(r, int | float) else 0)
            for name, a in (d.get("adapters") or {}).items():
                if not isinstance(a, Mapping):
                    continue
                was = into["adapters"].setdefault(name, {"replicas": 0, "lastError": None})
                n = a.get("replicas")
                was["replicas"] = max(was["replicas"], int(n) if isinstance(n, int | float) else 0)
                was["lastError"] = was["lastError"] or a.get("lastError")
    return {"models": models, "deployments": deps, "conflicts": sorted(conflicts)}


def fetch_health(pods: Iterable[Mapping[str, Any]], timeout: float = 2.0) -> Health | None:
    """Every ready gateway pod's /health that answers 200, merged (`merge`)."""
    answers: list[Health] = []
    for p in pods:
        ip = (p.get("status") or {}).get("podIP")
        if not ip:
            continue
        try:
            with _NO_PROXY.open(f"http://{ip}:{GATEWAY_PORT}/health", timeout=timeout) as r:
                body = json.loads(r.read(1 << 20))
                if isinstance(body, dict):
                    answers.append(body)
        except Exception:  # refused, timeout, 503 while starting or draining: the others answer
            continue
    return merge(answers)


def _ready(pod: Mapping[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def sync_once(
    kube: Kube,
    bodies: Iterable[Mapping[str, Any]],
    selector: str,
    namespace: str | None,
    fetch: Callable[[list[dict[str, Any]]], Health | None] = fetch_health,
) -> int:
    """One pass: read the gateway once, patch each deployment whose status.gateway changed.
    Returns how many were patched."""
    pods = [p for p in kube.list("v1", "Pod", namespace, selector=selector) if _ready(p)]
    health = fetch(pods) if pods else None
    patched = 0
    for body in bodies:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        try:
            spec = parse_spec(body.get("spec") or {})
        except (ValidationError, ValueError):
            continue  # the reconcile reports an invalid spec
        want = gateway_status(f"{meta.get('namespace')}/{meta.get('name')}", spec, health, bool(pods))
        if ((body.get("status") or {}).get("gateway") or {}) == want:
            continue
        try:
            kube.patch_status(
                API, "LLMDeployment", str(meta["namespace"]), str(meta["name"]), {"gateway": want}
            )
            patched += 1
        except Exception as e:  # gone meanwhile, API away: next pass
            log.debug("status.gateway of %s/%s not written: %s", meta.get("namespace"), meta.get("name"), e)
    return patched


async def run(
    kube: Kube,
    bodies: Callable[[], list[Mapping[str, Any]]],
    selector: str,
    namespace: str | None,
    leading: asyncio.Event,
) -> None:
    """Leader only: keep status.gateway true."""
    while True:
        await leading.wait()
        try:
            await asyncio.to_thread(sync_once, kube, bodies(), selector, namespace)
        except Exception as e:  # listing failed: the API server is away; try again
            log.warning("gateway status pass failed: %s", e)
        await asyncio.sleep(PERIOD_SECONDS)
