"""A simulated node provisioner for the local cluster: GPU node pools that scale from zero.

On a real cluster with ``gpuNodeProvisioning: on-demand`` a GPU type may have no node at all until a
provisioner (Karpenter, GKE node auto-provisioning, the Cluster Autoscaler) sees Pending pods that
need one. This loop plays that part against the local API server, closely enough to catch manifests
that no provisioner would act on:

- It looks only at pods that kube-scheduler has given up on for now (``PodScheduled=False``, reason
  ``Unschedulable``) and that request ``nvidia.com/gpu``.
- Like Karpenter it batches them: a window opens with the first such pod and closes once no new one
  has come for ``batch_idle`` seconds, or after ``batch_max`` seconds (Karpenter's
  ``BATCH_IDLE_DURATION`` 1s and ``BATCH_MAX_DURATION`` 10s defaults,
  https://karpenter.sh/docs/reference/settings/), so a LeaderWorkerSet's leader and workers are
  provisioned for together.
- It launches nodes of one node template: a pool of a hack/cluster/fleet.yaml profile, built by
  ``toposerve.dev.fleet.pool_template`` exactly as ``make cluster-up`` builds that profile's nodes
  (a pool with ``count: 0`` still describes its nodes). Each node gets the labels Karpenter sets on
  every node it launches (https://karpenter.sh/docs/concepts/scheduling/#well-known-labels):
  ``karpenter.sh/nodepool``, ``karpenter.sh/capacity-type``, ``node.kubernetes.io/instance-type``
  and ``topology.kubernetes.io/zone`` (the one zone it picked for the batch), plus
  ``karpenter.sh/registered`` and ``karpenter.sh/initialized``.
- It decides whether a new node would take a pod from what it knows at launch time, as Karpenter
  does: the well-known and NodePool labels, not the labels node daemons add after the node joins
  (GFD's ``nvidia.com/gpu.*``, NFD's ``feature.node.kubernetes.io/*``). A pod whose required pod
  affinity names a topology key only such a daemon sets (``nvidia.com/gpu.clique``) gets no node:
  Karpenter launches nothing for a pod-affinity topologyKey it does not know
  (aws/karpenter-provider-aws#1863). The fit itself is ``toposerve.dev.placeable`` (taints, node
  affinity, pod-affinity keys, resources), the cluster tests' scheduler oracle.
- It packs the batch's pods onto as few new nodes as fit them, after first counting the room left on
  the nodes it launched before (pods still in the scheduler's back-off must not cause a second node,
  as Karpenter counts in-flight nodes), creates them, and waits for the next batch. ``max_nodes``
  caps what it ever creates.

Usage: ``python -m toposerve.dev.provisioner --kubeconfig .cluster/kubeconfig --profile eks-zero
--pool eks-gb200 [--zone us-east-1a]``; nodes it created carry ``toposerve.dev/provisioner=<name>``
(``--delete`` removes them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from toposerve.dev import fleet as fleetmod
from toposerve.dev.placeable import parse_quantity, pod_requests, reasons

log = logging.getLogger("toposerve.dev.provisioner")

GPU_RESOURCE = "nvidia.com/gpu"
ZONE_LABEL = "topology.kubernetes.io/zone"
OWNER_LABEL = "toposerve.dev/provisioner"
# Labels node daemons add after the node has joined: a provisioner cannot promise them at launch.
LATER_PREFIXES = ("nvidia.com/", "feature.node.kubernetes.io/")


@dataclass
class Template:
    """The node a provisioner launches: a fleet pool's node, relabelled as Karpenter labels it."""

    node: dict[str, Any]
    name: str  # provisioner name: node names are <name>-<i>, nodes carry OWNER_LABEL=<name>
    zone: str
    nodepool: str
    capacity_type: str = "on-demand"

    @classmethod
    def from_fleet(
        cls,
        fleet: Mapping[str, Any],
        profile: str,
        pool: str,
        zone: str | None = None,
        name: str | None = None,
    ) -> Template:
        node = fleetmod.pool_template(fleet, profile, pool, "0.0.0.0/24")
        labels = node["metadata"]["labels"]
        picked = zone or labels.get(ZONE_LABEL)
        if not picked:
            raise fleetmod.FleetError(f"profile {profile}, pool {pool}: no zone label; pass a zone")
        return cls(
            node=node,
            name=name or pool,
            zone=picked,
            nodepool=labels.get("karpenter.sh/nodepool", pool),
            capacity_type=labels.get("karpenter.sh/capacity-type", "on-demand"),
        )

    def build(self, index: int, pod_cidr: str) -> dict[str, Any]:
        node = copy.deepcopy(self.node)
        name = f"{self.name}-{index}"
        labels = node["metadata"]["labels"]
        labels |= {
            "kubernetes.io/hostname": name,
            ZONE_LABEL: self.zone,
            "karpenter.sh/nodepool": self.nodepool,
            "karpenter.sh/capacity-type": self.capacity_type,
            "karpenter.sh/registered": "true",
            "karpenter.sh/initialized": "true",
            OWNER_LABEL: self.name,
        }
        labels.setdefault("node.kubernetes.io/instance-type", str(labels.get("toposerve.io/pool", self.name)))
        node["metadata"]["name"] = name
        node["spec"]["podCIDR"] = pod_cidr
        node["spec"]["podCIDRs"] = [pod_cidr]
        return node


def at_launch(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node as the provisioner knows it before it exists: without labels daemons add later."""
    out = copy.deepcopy(dict(node))
    labels = out["metadata"]["labels"]
    out["metadata"]["labels"] = {k: v for k, v in labels.items() if not k.startswith(LATER_PREFIXES)}
    return out


def needs_gpu(pod: Mapping[str, Any]) -> bool:
    return pod_requests(pod.get("spec") or {}).get(GPU_RESOURCE, Decimal(0)) > 0


def unschedulable(pod: Mapping[str, Any]) -> bool:
    """Pending, unbound, and given up on by kube-scheduler for now (what Karpenter reacts to)."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending" or (pod.get("spec") or {}).get("nodeName"):
        return False
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in status.get("conditions") or []
    )


@dataclass
class _Room:
    """A node with what is left of its allocatable."""

    node: dict[str, Any]
    free: dict[str, Decimal] = field(default_factory=dict)

    @classmethod
    def of(cls, node: Mapping[str, Any], used: Iterable[Mapping[str, Any]] = ()) -> _Room:
        free = {
            k: parse_quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
        }
        room = cls(dict(node), free)
        for pod in used:
            room.take(pod)
        return room

    def view(self) -> dict[str, Any]:
        out = at_launch(self.node)
        out["status"] = {
            **(out.get("status") or {}),
            "allocatable": {k: str(v) for k, v in self.free.items()},
        }
        return out

    def take(self, pod: Mapping[str, Any]) -> None:
        for res, q in pod_requests(pod.get("spec") or {}).items():
            self.free[res] = self.free.get(res, Decimal(0)) - q
        if "pods" in self.free:
            self.free["pods"] -= 1

    def fits(self, pod: Mapping[str, Any]) -> bool:
        return not reasons(pod.get("spec") or {}, self.view())


def plan_nodes(
    template: Template,
    pending: Sequence[Mapping[str, Any]],
    launched: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]],
    start_index: int,
    cidrs: Iterable[str],
    max_new: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(nodes to create, why pods were left out) for a batch of pending GPU pods: first fit onto the
    room left on nodes launched before (``launched``: node, pods bound to it), then onto new nodes.
    Pure: the loop below does the I/O."""
    rooms = [_Room.of(n, used) for n, used in launched]
    new: list[_Room] = []
    skipped: list[str] = []
    cidr_iter = iter(cidrs)
    probe = _Room.of(template.build(start_index, "0.0.0.0/24"))
    for pod in pending:
        pod_name = f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"
        if not probe.fits(pod):
            why = reasons(pod.get("spec") or {}, probe.view())
            skipped.append(f"{pod_name}: a new {template.name} node would not take it: {'; '.join(why)}")
            continue
        room = next((r for r in [*rooms, *new] if r.fits(pod)), None)
        if room is None:
            if len(new) >= max_new:
                skipped.append(f"{pod_name}: node limit reached")
                continue
            room = _Room.of(template.build(start_index + len(new), next(cidr_iter)))
            new.append(room)
        room.take(pod)
    return [r.node for r in new], skipped


def free_cidrs(pod_network: str, nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The node /24s of the pod network (``fleet.node_cidrs``) that no node holds yet."""
    taken = {str((n.get("spec") or {}).get("podCIDR")) for n in nodes}
    out = []
    for c in fleetmod.node_cidrs(pod_network):
        if c not in taken:
            out.append(c)
        if len(out) >= 64:
            break
    ipaddress.ip_network(pod_network)  # a bad network fails here rather than in the loop
    return out


class Provisioner:
    """The loop: poll pods, batch the unschedulable GPU pods, create nodes, repeat until stopped."""

    def __init__(
        self,
        core: Any,  # kubernetes.client.CoreV1Api
        template: Template,
        pod_network: str = "10.244.0.0/16",
        max_nodes: int = 8,
        batch_idle: float = 1.0,
        batch_max: float = 10.0,
        poll: float = 0.5,
        namespace: str | None = None,
    ) -> None:
        self.core, self.template, self.pod_network = core, template, pod_network
        self.max_nodes, self.batch_idle, self.batch_max, self.poll = max_nodes, batch_idle, batch_max, poll
        self.namespace = namespace
        self.created: list[str] = []
        self.skipped: list[str] = []
        self._stop = threading.Event()

    def _dicts(self, items: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.core.api_client.sanitize_for_serialization(items)
        return out

    def _pods(self) -> list[dict[str, Any]]:
        if self.namespace:
            res = self.core.list_namespaced_pod(self.namespace)
        else:
            res = self.core.list_pod_for_all_namespaces()
        return self._dicts(res.items)

    def pending(self) -> list[dict[str, Any]]:
        return [p for p in self._pods() if unschedulable(p) and needs_gpu(p)]

    def provision(self, pending: list[dict[str, Any]]) -> list[str]:
        nodes = self._dicts(self.core.list_node().items)
        mine = [
            n for n in nodes if (n["metadata"].get("labels") or {}).get(OWNER_LABEL) == self.template.name
        ]
        pods = self._pods()
        launched = [
            (n, [p for p in pods if (p.get("spec") or {}).get("nodeName") == n["metadata"]["name"]])
            for n in mine
        ]
        names = {n["metadata"]["name"] for n in nodes}
        start = 0
        while f"{self.template.name}-{start}" in names:
            start += 1
        new, skipped = plan_nodes(
            self.template, pending, launched, start, free_cidrs(self.pod_network, nodes),
            self.max_nodes - len(self.created),
        )  # fmt: skip
        for why in skipped:
            if why not in self.skipped:
                log.warning("not provisioning for %s", why)
                self.skipped.append(why)
        for node in new:
            self.core.create_node(node)
            self.created.append(node["metadata"]["name"])
            log.info(
                "created node %s in %s for %d pending pod(s)",
                node["metadata"]["name"],
                self.template.zone,
                len(pending),
            )
        return [n["metadata"]["name"] for n in new]

    def step(self) -> list[str]:
        """Wait for one batch (or until stopped) and provision for it."""
        first = self.pending()
        if not first:
            return []
        seen = {p["metadata"]["uid"] for p in first}
        opened = last_new = time.monotonic()
        batch = first
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_new >= self.batch_idle or now - opened >= self.batch_max:
                break
            time.sleep(min(self.poll, self.batch_idle))
            batch = self.pending()
            if any(p["metadata"]["uid"] not in seen for p in batch):
                seen |= {p["metadata"]["uid"] for p in batch}
                last_new = time.monotonic()
        return self.provision(batch) if batch else []

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a transient API error must not end the loop
                log.exception("provisioner step failed")
            self._stop.wait(self.poll)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="provisioner", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def delete_nodes(self) -> None:
        self.core.delete_collection_node(label_selector=f"{OWNER_LABEL}={self.template.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument(
        "--fleet", default=str(Path(__file__).resolve().parents[3] / "hack" / "cluster" / "fleet.yaml")
    )
    p.add_argument("--profile", required=True, help="fleet profile holding the node template")
    p.add_argument("--pool", required=True, help="pool of that profile whose nodes are launched")
    p.add_argument("--zone", help="zone for the nodes (default: the template's)")
    p.add_argument("--name", help="node name prefix and owner label (default: the pool)")
    p.add_argument("--max-nodes", type=int, default=8)
    p.add_argument("--namespace", help="only pods of this namespace (default: all)")
    p.add_argument(
        "--delete", action="store_true", help="delete the nodes this provisioner created, then exit"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kubernetes

    fleet = fleetmod.load(args.fleet)
    template = Template.from_fleet(fleet, args.profile, args.pool, args.zone, args.name)
    api = kubernetes.config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    prov = Provisioner(
        kubernetes.client.CoreV1Api(api), template, fleet.get("podNetwork", "10.244.0.0/16"),
        max_nodes=args.max_nodes, namespace=args.namespace,
    )  # fmt: skip
    if args.delete:
        prov.delete_nodes()
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        prov.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
