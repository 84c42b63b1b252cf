"""Turn hack/cluster/fleet.yaml into kwok Node manifests.

The fleet file stays short and readable (pools of identical nodes); this module expands it into
Nodes labelled exactly like NVIDIA GPU Feature Discovery labels real ones, so the operator reads
the same inventory here as on a real cluster. Each node gets its own /24 pod CIDR, which kwok
uses to hand out pod IPs.

Usage: ``python -m toposerve.dev.fleet hack/cluster/fleet.yaml --profile gpu > nodes.yaml``
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CAPACITY_TYPE_LABEL = "toposerve.io/capacity-type"
GPU_RESOURCE = "nvidia.com/gpu"


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "profiles" not in data:
        raise ValueError(f"{path}: expected a mapping with 'profiles'")
    return data


def node_cidrs(pod_network: str) -> list[str]:
    """The /24s of the pod network, skipping the first (reserved for the network itself)."""
    net = ipaddress.ip_network(pod_network)
    return [str(s) for s in net.subnets(new_prefix=24)][1:]


def nodes(fleet: Mapping[str, Any], profile: str) -> list[dict[str, Any]]:
    """Node manifests for one profile of the fleet, in file order."""
    if profile not in fleet["profiles"]:
        raise ValueError(f"unknown profile {profile!r}; have {sorted(fleet['profiles'])}")
    gpu_types: Mapping[str, Mapping[str, Any]] = fleet.get("gpuTypes", {})
    defaults: Mapping[str, Any] = fleet.get("defaults", {})
    cidrs = iter(node_cidrs(fleet.get("podNetwork", "10.244.0.0/16")))
    out: list[dict[str, Any]] = []
    for pool in fleet["profiles"][profile]:
        for i in range(int(pool.get("count", 1))):
            name = f"{pool['pool']}-{i}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "toposerve.io/pool": pool["pool"],
                "topology.kubernetes.io/zone": pool.get("zone", "zone-a"),
                CAPACITY_TYPE_LABEL: pool.get("capacityType", "on-demand"),
            }
            resources = {
                "cpu": str(pool.get("cpu", defaults.get("cpu", "64"))),
                "memory": str(pool.get("memory", defaults.get("memory", "512Gi"))),
                "pods": str(pool.get("pods", defaults.get("pods", "110"))),
                "ephemeral-storage": "1Ti",
            }
            if product := pool.get("gpu"):
                if product not in gpu_types:
                    raise ValueError(f"pool {pool['pool']}: gpu {product!r} not in gpuTypes")
                gpus = int(pool["gpus"])
                labels |= {
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": product,
                    "nvidia.com/gpu.count": str(gpus),
                    "nvidia.com/gpu.memory": str(gpu_types[product]["memoryMiB"]),
                    "nvidia.com/gpu.family": gpu_types[product]["family"],
                    "nvidia.com/gpu.clique": pool.get("clique", pool["pool"]),
                }
                resources[GPU_RESOURCE] = str(gpus)
            cidr = next(cidrs)
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        # kwokctl's kwok manages nodes carrying this annotation.
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    },
                    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                    "status": {"capacity": resources, "allocatable": dict(resources)},
                }
            )
    return out


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
