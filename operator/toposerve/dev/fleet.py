"""Turn hack/cluster/fleet.yaml into kwok Node manifests.

The fleet file stays readable (machine shapes, then pools of identical nodes per profile); this
module only expands it. Everything provider-specific (which labels a GKE, Karpenter or GPU-operator
node carries, its taints, what the kubelet reserves) is written out in the YAML with its source,
never derived here, so the simulated fleet does not inherit the operator's assumptions. Each node
gets its own /24 pod CIDR, which kwok uses to hand out pod IPs.

Pool fields (all but ``pool`` and ``machine`` optional):

- ``pool``: name; nodes are ``<pool>-<i>``. ``count``: nodes (default 1; 0 is a pool scaled to zero).
- ``machine``: a key of ``machines``: ``capacity``, ``allocatable`` (what the kubelet reports after
  kube/system reservations and the eviction threshold; resources it omits are allocatable in
  full), ``arch`` and machine ``labels``.
- ``labels``: extra node labels (strings), over the machine's. ``taints``: ``{key, value, effect}``.
- ``gpu`` + ``gpus`` (+ ``clique``): the labels NVIDIA GPU Feature Discovery writes, from
  ``gpuTypes``; only for fleets that run the GPU operator. No clique label unless given.
- ``zone``, ``capacityType``: shorthands for ``topology.kubernetes.io/zone`` and
  ``toposerve.io/capacity-type`` (the ``gpu`` profile's own convention).
- ``unschedulable``: a cordoned node.

Usage: ``python -m toposerve.dev.fleet hack/cluster/fleet.yaml --profile gpu > nodes.yaml``
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from toposerve.dev.placeable import parse_quantity

CAPACITY_TYPE_LABEL = "toposerve.io/capacity-type"
GPU_RESOURCE = "nvidia.com/gpu"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
POOL_FIELDS = {
    "pool", "count", "machine", "labels", "taints", "gpu", "gpus", "clique", "zone", "capacityType",
    "unschedulable",
}  # fmt: skip


class FleetError(ValueError):
    """A fleet file that cannot be expanded; the message names the profile, pool and field."""


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "profiles" not in data:
        raise FleetError(f"{path}: expected a mapping with 'profiles'")
    return data


def node_cidrs(pod_network: str) -> Iterator[str]:
    """The /24s of the pod network, skipping the first (reserved for the network itself)."""
    subnets = ipaddress.ip_network(pod_network).subnets(new_prefix=24)
    next(subnets)
    return (str(s) for s in subnets)


def _strings(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise FleetError(f"{where}: expected a mapping, got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FleetError(f"{where}: {k!r}: {v!r} must be a string (quote YAML values like true, 8, 1.0)")
    return dict(value)


def _resources(where: str, value: Any) -> dict[str, str]:
    out = {str(k): str(v) for k, v in _strings(where, value).items()}
    for k, v in out.items():
        try:
            parse_quantity(v)
        except ValueError:
            raise FleetError(f"{where}.{k}: {v!r} is not a Kubernetes quantity") from None
    return out


def _machine(name: str, m: Any) -> dict[str, Any]:
    where = f"machines.{name}"
    if not isinstance(m, Mapping):
        raise FleetError(f"{where}: expected a mapping")
    unknown = set(m) - {"capacity", "allocatable", "arch", "labels"}
    if unknown:
        raise FleetError(f"{where}: unknown fields {sorted(unknown)}")
    cap = _resources(f"{where}.capacity", m.get("capacity"))
    alloc = _resources(f"{where}.allocatable", m.get("allocatable"))
    for res in ("cpu", "memory"):
        if res not in cap or res not in alloc:
            raise FleetError(f"{where}: capacity and allocatable both need {res}")
    if set(alloc) - set(cap):
        raise FleetError(f"{where}.allocatable: {sorted(set(alloc) - set(cap))} not in capacity")
    for res, q in alloc.items():
        if parse_quantity(q) > parse_quantity(cap[res]):
            raise FleetError(f"{where}.allocatable.{res}: {q} is more than capacity {cap[res]}")
    return {
        "capacity": cap,
        "allocatable": alloc,
        "arch": str(m.get("arch", "amd64")),
        "labels": _strings(f"{where}.labels", m.get("labels")),
    }


def _taints(where: str, value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FleetError(f"{where}: expected a list")
    out = []
    for i, t in enumerate(value):
        t = _strings(f"{where}[{i}]", t)
        if not t.get("key") or t.get("effect") not in TAINT_EFFECTS:
            raise FleetError(f"{where}[{i}]: needs a key and an effect in {TAINT_EFFECTS}, got {t}")
        out.append(t)
    return out


def _pools(fleet: Mapping[str, Any], profile: str) -> list[Mapping[str, Any]]:
    if profile not in fleet["profiles"]:
        raise FleetError(f"unknown profile {profile!r}; have {sorted(fleet['profiles'])}")
    return list(fleet["profiles"][profile] or [])


def _pool_nodes(
    fleet: Mapping[str, Any], profile: str, j: int, pool: Any, cidrs: Iterator[str], count: int | None = None
) -> list[dict[str, Any]]:
    """The nodes of the ``j``-th pool of a profile (``count`` of them: the pool's own by default)."""
    gpu_types: Mapping[str, Mapping[str, Any]] = fleet.get("gpuTypes") or {}
    machines = {name: _machine(name, m) for name, m in (fleet.get("machines") or {}).items()}
    if not isinstance(pool, Mapping) or not isinstance(pool.get("pool"), str):
        raise FleetError(f"profiles.{profile}[{j}]: each pool needs a 'pool' name")
    where = f"profile {profile}, pool {pool['pool']}"
    if unknown := set(pool) - POOL_FIELDS:
        raise FleetError(f"{where}: unknown fields {sorted(unknown)}")
    if pool.get("machine") not in machines:
        raise FleetError(f"{where}: machine {pool.get('machine')!r} is not in machines")
    machine = machines[pool["machine"]]
    pool_count = pool.get("count", 1)
    if not isinstance(pool_count, int) or isinstance(pool_count, bool) or pool_count < 0:
        raise FleetError(f"{where}: count must be a whole number >= 0, got {pool_count!r}")
    count = pool_count if count is None else count
    labels: dict[str, str] = {
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": machine["arch"],
        "type": "kwok",
        "toposerve.io/pool": pool["pool"],
    }
    if "zone" in pool:
        labels["topology.kubernetes.io/zone"] = str(pool["zone"])
    if "capacityType" in pool:
        if pool["capacityType"] not in ("spot", "on-demand"):
            raise FleetError(f"{where}: capacityType must be spot or on-demand")
        labels[CAPACITY_TYPE_LABEL] = pool["capacityType"]
    capacity = dict(machine["capacity"])
    allocatable = dict(machine["allocatable"])
    if product := pool.get("gpu"):
        if product not in gpu_types:
            raise FleetError(f"{where}: gpu {product!r} is not in gpuTypes")
        gpus = pool.get("gpus")
        if not isinstance(gpus, int) or gpus < 1:
            raise FleetError(f"{where}: gpus must be a whole number >= 1 with gpu, got {gpus!r}")
        if capacity.get(GPU_RESOURCE, str(gpus)) != str(gpus):
            raise FleetError(f"{where}: gpus {gpus} but machine capacity has {capacity[GPU_RESOURCE]}")
        # Labels as GFD writes them (NVIDIA/k8s-device-plugin docs/gpu-feature-discovery/README.md).
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(gpu_types[product]["memoryMiB"]),
            "nvidia.com/gpu.family": str(gpu_types[product]["family"]),
        }
        if "clique" in pool:
            labels["nvidia.com/gpu.clique"] = str(pool["clique"])
        capacity[GPU_RESOURCE] = allocatable[GPU_RESOURCE] = str(gpus)
    elif "clique" in pool or "gpus" in pool:
        raise FleetError(f"{where}: clique/gpus need gpu (the GFD product)")
    labels |= machine["labels"] | _strings(f"{where}: labels", pool.get("labels"))
    taints = _taints(f"{where}: taints", pool.get("taints"))
    capacity.setdefault("pods", "110")
    capacity.setdefault("ephemeral-storage", "100Gi")
    # The kubelet reserves only cpu, memory, ephemeral-storage and pids; extended resources
    # (nvidia.com/gpu) and pods are allocatable in full.
    allocatable = {res: allocatable.get(res, q) for res, q in capacity.items()}
    out: list[dict[str, Any]] = []
    for i in range(count):
        name = f"{pool['pool']}-{i}"
        try:
            cidr = next(cidrs)
        except StopIteration:
            raise FleetError(f"{where}: podNetwork has no /24 left for node {name}") from None
        spec: dict[str, Any] = {"podCIDR": cidr, "podCIDRs": [cidr]}
        if taints:
            spec["taints"] = [dict(t) for t in taints]
        if pool.get("unschedulable"):
            spec["unschedulable"] = True
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, **labels},
                    # kwokctl's kwok manages nodes carrying this annotation.
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": spec,
                "status": {"capacity": dict(capacity), "allocatable": dict(allocatable)},
            }
        )
    return out


def nodes(fleet: Mapping[str, Any], profile: str) -> list[dict[str, Any]]:
    """Node manifests for one profile of the fleet, in file order."""
    cidrs = node_cidrs(fleet.get("podNetwork", "10.244.0.0/16"))
    out: list[dict[str, Any]] = []
    for j, pool in enumerate(_pools(fleet, profile)):
        out += _pool_nodes(fleet, profile, j, pool, cidrs)
    names = [n["metadata"]["name"] for n in out]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise FleetError(f"profile {profile}: duplicate node names {dups} (pool names must be unique)")
    return out


def pool_template(fleet: Mapping[str, Any], profile: str, pool: str, pod_cidr: str) -> dict[str, Any]:
    """One node of a profile's pool, built as ``nodes`` builds them, whatever the pool's count (a pool
    scaled to zero still says what its nodes look like): what a provisioner launches
    (``toposerve.dev.provisioner``). Named ``<pool>-0``; the caller renames it."""
    for j, p in enumerate(_pools(fleet, profile)):
        if isinstance(p, Mapping) and p.get("pool") == pool:
            return _pool_nodes(fleet, profile, j, p, iter([pod_cidr]), count=1)[0]
    raise FleetError(f"profile {profile}: no pool {pool!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("fleet", help="fleet YAML (hack/cluster/fleet.yaml)")
    p.add_argument("--profile", default="gpu")
    args = p.parse_args(argv)
    try:
        docs = nodes(load(args.fleet), args.profile)
    except (OSError, ValueError, KeyError) as e:
        print(f"fleet: {e}", file=sys.stderr)
        return 2
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
