"""The local pod runner: really runs the project's own pods on the simulated (kwok) nodes.

kwok only fakes pod status, but the router and autoscaler need engines that answer HTTP on their
pod IPs. This runner watches pods whose container image is the project's own
(``ghcr.io/toposerve/toposerve``), and for each one starts the container's ``command`` + ``args``
as a local process inside the cluster's pod-network namespace, on the pod IP kwok assigned (the
runner adds that address to the namespace). It probes the readiness probe and reports the result
in the ``toposerve.dev/runner-ready`` annotation, which kwok Stages (hack/cluster/stages.yaml)
turn into the pod's Ready condition; a failing liveness probe or an exited process restarts the
process (counted in ``toposerve.dev/runner-restarts``). When the pod goes away the process is stopped and the address removed.

Native sidecars (init containers with ``restartPolicy: Always`` of the project's image, e.g. the
adapter stager) run as the kubelet runs them (kubernetes.io/docs/concepts/workloads/pods/
sidecar-containers, and "Init Containers", "Pod startup"): each starts after the sidecars before
it have *started* (its startupProbe succeeded, or, without one, its process runs), the main
containers only once every sidecar has; a sidecar is restarted when it exits, its readiness
counts towards the pod's (the runner's annotation is the AND over the pod's containers), and on
deletion the main containers stop first, the sidecars after them. Regular (run-to-completion)
init containers are not run.

What a kubelet gives a container, the runner gives the process: the container's ``env``
(``valueFrom.fieldRef`` resolved, ``$(VAR)`` expanded like Kubernetes does), in-cluster config
(``KUBERNETES_SERVICE_HOST``/``PORT``: the API server's address on the pod network) and a real,
short-lived ServiceAccount token from the TokenRequest API, bound to the pod and refreshed, at
``/var/run/secrets/kubernetes.io/serviceaccount`` with ``ca.crt`` and ``namespace``; configMap,
secret, emptyDir and hostPath volumes at their ``mountPath``. Each process gets its own mount namespace
(``unshare --mount``) where those are mounted; a mount point missing on the host appears through
an overlay of its nearest existing parent that only the process sees, so nothing on the host
changes. So a pod's RBAC is its ServiceAccount's: a missing permission is a 403, as in a real
cluster. ``KUBECONFIG`` (admin credentials reaching the API server from the pod network) is still
set for processes that ask for a kubeconfig explicitly; the Kubernetes clients (the official
Python client, kopf) prefer the in-cluster config when both are there.

Everything else stays simulated: no image is pulled (``PATH`` has the project's virtualenv first
and the runner's ``PYTHONPATH`` is passed on, so the code is the checkout's own), no resource
limits, user IDs or read-only root file systems apply.

The runner also serves Prometheus service discovery (``--sd-listen``): Debian's ``prometheus``
is built without ``kubernetes_sd_configs``, so the runner, which already watches every pod
through the API server, answers ``http_sd_configs`` with the scrapable pods and the same
``__meta_kubernetes_pod_*`` labels Kubernetes discovery would give (see ``sd_targets``).

Usage: ``python -m toposerve.dev.podrunner --kubeconfig .cluster/kubeconfig --netns toposerve-pods``
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toposerve.dev import fakenvml

log = logging.getLogger("toposerve.podrunner")

RUNNER_IMAGE = "ghcr.io/toposerve/toposerve"
READY_ANNOTATION = "toposerve.dev/runner-ready"
# How often the runner restarted the pod's process (exited, or failed its liveness probe).
RESTARTS_ANNOTATION = "toposerve.dev/runner-restarts"
DEFAULT_ENTRYPOINT = ["toposerve"]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Like the kubelet's projected token: short-lived, bound to the pod, refreshed at 80 % of its life.
TOKEN_SECONDS = 600
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def image_repository(image: str) -> str:
    """The repository part of an image reference (no tag, no digest)."""
    repo = image.split("@", 1)[0]
    slash = repo.rfind("/")
    colon = repo.rfind(":")
    return repo[:colon] if colon > slash else repo


def is_runner_image(image: str) -> bool:
    return image_repository(image) == RUNNER_IMAGE


_VAR = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, the rest is kept."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, value)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """Resolve a downward-API ``fieldRef.fieldPath`` against a pod (as a plain dict)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    if m := _SUBSCRIPT.match(path):
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ValueError(f"unsupported fieldRef {path!r}")


NVIDIA_RUNTIME_CLASS = "nvidia"


def wants_nvml(pod: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    """Whether the NVIDIA container runtime would inject the driver's libraries (libnvidia-ml.so.1)
    into this container: the pod runs under its RuntimeClass (``runtimeClassName: nvidia``, which
    the GPU operator installs), or the container sets ``NVIDIA_VISIBLE_DEVICES`` (the toolkit's
    environment trigger). Source: NVIDIA Container Toolkit docs, "Specialized Configurations with
    Docker: Environment variables (OCI spec)" and the GPU operator's RuntimeClass."""
    if (pod.get("spec") or {}).get("runtimeClassName") == NVIDIA_RUNTIME_CLASS:
        return True
    return any(e.get("name") == "NVIDIA_VISIBLE_DEVICES" and e.get("value") not in (None, "", "void", "none")
               for e in container.get("env") or [])  # fmt: skip


def node_gpu_state(node: Mapping[str, Any]) -> list[dict[str, object]]:
    """Healthy GPUs as a simulated node's NVML reports them: as many as it has ``nvidia.com/gpu``,
    named and sized from its labels (GFD's product and memory in MiB, else GKE's or Karpenter's
    accelerator name). Idle: 35 C, 1% of the memory in use, no errors."""
    status = node.get("status") or {}
    count = int(str((status.get("capacity") or status.get("allocatable") or {}).get("nvidia.com/gpu", 0)))
    labels = (node.get("metadata") or {}).get("labels") or {}
    product = (
        labels.get("nvidia.com/gpu.product")
        or labels.get("cloud.google.com/gke-accelerator")
        or labels.get("karpenter.k8s.aws/instance-gpu-name")
        or "NVIDIA GPU"
    )
    name = product.replace("-", " ")
    mib = int(
        labels.get("nvidia.com/gpu.memory") or labels.get("karpenter.k8s.aws/instance-gpu-memory") or 81559
    )
    total = mib << 20
    node_name = (node.get("metadata") or {}).get("name", "node")
    return [
        {
            "name": name,
            "uuid": f"GPU-{node_name}-{i}",
            "temp": 35,
            "mem.total": total,
            "mem.used": total // 100,
        }
        for i in range(count)
    ]


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Any = None) -> dict[str, str]:
    """The container's environment as the kubelet would build it (fieldRef, config maps, expansion).

    ``lookup(kind, namespace, name, key)`` resolves configMapKeyRef/secretKeyRef (``kind`` is
    ``configMap`` or ``secret``, ``key`` None for a whole envFrom source) and may be None.
    """
    ns = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        for kind in ("configMap", "secret"):
            ref = src.get(f"{kind}Ref")
            if ref and lookup:
                data = lookup(kind, ns, ref["name"], None) or {}
                env |= {src.get("prefix", "") + k: v for k, v in data.items()}
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            res = vf["resourceFieldRef"]["resource"]
            kind, _, rname = res.partition(".")
            env[name] = str(((container.get("resources") or {}).get(kind) or {}).get(rname, "0"))
        else:
            for kind in ("configMap", "secret"):
                ref = vf.get(f"{kind}KeyRef")
                if ref and lookup:
                    value = lookup(kind, ns, ref["name"], ref["key"])
                    if value is not None:
                        env[name] = value
    return env


@dataclass(frozen=True)
class Mount:
    """One mount in a pod process's mount namespace: ``source`` (a host dir) or a tmpfs at ``target``."""

    target: str
    source: str | None = None  # None: a fresh tmpfs
    read_only: bool = False
    size: str | None = None  # tmpfs size (emptyDir sizeLimit)


def volume_files(volume: Mapping[str, Any], data: Mapping[str, str]) -> dict[str, str]:
    """The files a configMap or secret volume shows: every key, or the listed ``items`` at their paths."""
    src = volume.get("configMap") or volume.get("secret") or {}
    items = src.get("items")
    if not items:
        return dict(data)
    return {i["path"]: data[i["key"]] for i in items if i["key"] in data}


def container_mounts(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_dir: Path,
    token_dir: Path | None,
    keep_visible: Iterable[str] = (),
) -> list[Mount]:
    """The mounts of one container: its volumeMounts (configMap, secret, emptyDir, hostPath: a bind
    mount of the host's directory, created first for type DirectoryOrCreate) and the token.

    Volume contents live in ``pod_dir/volumes/<name>`` (written by the runner). Other volume types
    are not simulated and are left out, and so is a volume that would hide ``keep_visible`` (the
    checkout, its venv, the runner's files: an emptyDir on /tmp when the checkout is under /tmp);
    the host's directory stays there instead.
    """
    keep = [os.path.realpath(k) for k in keep_visible]
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounts: list[Mount] = []
    for vm in container.get("volumeMounts") or []:
        v = volumes.get(vm["name"])
        if v is None or vm.get("subPath"):
            continue
        ro = bool(vm.get("readOnly"))
        if any(_under(k, os.path.realpath(vm["mountPath"])) for k in keep):
            log.info("not mounting %s at %s: it would hide %s", vm["name"], vm["mountPath"], keep)
            continue
        if "emptyDir" in v:
            ed = v["emptyDir"] or {}
            if ed.get("medium") == "Memory":
                mounts.append(Mount(vm["mountPath"], None, ro, ed.get("sizeLimit")))
            else:
                mounts.append(Mount(vm["mountPath"], str(pod_dir / "volumes" / vm["name"]), ro))
        elif "configMap" in v or "secret" in v:
            mounts.append(Mount(vm["mountPath"], str(pod_dir / "volumes" / vm["name"]), True))
        elif "hostPath" in v:  # the node's directory, bind-mounted as the kubelet does
            hp = v["hostPath"] or {}
            path = str(hp.get("path") or "")
            if hp.get("type") == "DirectoryOrCreate":
                os.makedirs(path, mode=0o755, exist_ok=True)
            if path and os.path.isdir(path):
                mounts.append(Mount(vm["mountPath"], path, ro))
            else:  # a kubelet fails such a pod (type Directory) or mounts what is there
                log.info("not mounting hostPath %s at %s: no such directory", path, vm["mountPath"])
    if token_dir is not None and not any(m.target.rstrip("/") == SA_DIR for m in mounts):
        mounts.append(Mount(SA_DIR, str(token_dir), True))
    return mounts


def _nearest_existing(path: str, exists: Any) -> str:
    p = os.path.realpath(path)
    while not exists(p):
        p = os.path.dirname(p)
    return p


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _mount_order(mounts: list[Mount]) -> list[Mount]:
    """Parents before children; but a target that would hide another mount's source (an emptyDir
    on /tmp when the checkout lives under /tmp) goes after the mounts whose sources it covers."""
    real = {m.target: os.path.realpath(m.target) for m in mounts}

    def hides(m: Mount) -> bool:
        return any(o.source and o is not m and _under(o.source, real[m.target]) for o in mounts)

    depth = lambda m: real[m.target].count("/")  # noqa: E731
    return sorted((m for m in mounts if not hides(m)), key=depth) + sorted(filter(hides, mounts), key=depth)


def mount_script(mounts: list[Mount], scratch: Path, exists: Any = os.path.exists) -> str:
    """A ``sh`` script that mounts ``mounts`` in the current (private) mount namespace, then execs "$@".

    A target missing on the host gets an overlay on its nearest existing parent (upper layer in a
    tmpfs on ``scratch``), visible only in this namespace, so the host's file system never changes.
    Mounts below that parent are not visible through the overlay; pod processes need none of them.
    """
    q = shlex.quote
    lines = ["set -e"]
    parents = sorted({_nearest_existing(m.target, exists) for m in mounts if not exists(m.target)}, key=len)
    if parents:
        lines.append(f"mount -t tmpfs -o mode=0700 toposerve-overlays {q(str(scratch))}")
    for i, parent in enumerate(parents):
        up, work = q(str(scratch / f"{i}u")), q(str(scratch / f"{i}w"))
        lines.append(f"mkdir -p {up} {work}")
        lines.append(
            f"mount -t overlay overlay -o lowerdir={q(parent)},upperdir={up},workdir={work} {q(parent)}"
        )
    for m in _mount_order(mounts):
        t = q(os.path.realpath(m.target))
        lines.append(f"mkdir -p {t}")
        if m.source is None:
            size = f",size={tmpfs_size(m.size)}" if m.size else ""
            lines.append(f"mount -t tmpfs -o mode=1777{size} tmpfs {t}")
        else:
            lines.append(f"mount --bind {q(m.source)} {t}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {t}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def tmpfs_size(quantity: str) -> str:
    """A Kubernetes quantity (``64Mi``, ``1G``, ``1000``) as tmpfs's size option (``64m``, bytes)."""
    binary = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t"}
    decimal = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if quantity[-2:] in binary:
        return quantity[:-2] + binary[quantity[-2:]]
    if quantity[-1:] in decimal:
        return str(int(float(quantity[:-1]) * decimal[quantity[-1]]))
    return str(int(float(quantity)))


def in_cluster_env(host: str, port: int) -> dict[str, str]:
    """The variables the kubelet sets for the ``kubernetes`` Service, pointing at the reachable address."""
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}",
        "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
        "KUBERNETES_PORT_443_TCP_ADDR": host,
        "KUBERNETES_PORT_443_TCP_PORT": str(port),
    }


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def probe_ok(ip: str, probe: Mapping[str, Any] | None, ports: Mapping[str, int]) -> bool:
    """One readiness/liveness probe attempt against the pod IP; no probe counts as success."""
    if not probe:
        return True
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        hg = probe["httpGet"]
        port = hg["port"] if isinstance(hg["port"], int) else ports.get(hg["port"], hg["port"])
        path = hg.get("path", "/")
        try:
            with _NO_PROXY.open(f"http://{ip}:{port}{path}", timeout=timeout) as r:
                return 200 <= int(r.status) < 400
        except (OSError, urllib.error.URLError, ValueError):
            return False
    if "tcpSocket" in probe:
        ts = probe["tcpSocket"]
        port = ts["port"] if isinstance(ts["port"], int) else ports.get(ts["port"], ts["port"])
        try:
            with socket.create_connection((ip, int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            return False
    return True  # exec and grpc probes are not simulated: treat as passing


def is_sidecar(container: Mapping[str, Any]) -> bool:
    """An init container that runs for the pod's life (``restartPolicy: Always``)."""
    return container.get("restartPolicy") == "Always"


def runner_containers(spec: Mapping[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    """(container, is a sidecar) the runner runs for a pod, in the kubelet's start order: the
    native sidecars of the project's image in their init-container order, then the main ones."""
    side = [
        (c, True)
        for c in spec.get("initContainers") or []
        if is_sidecar(c) and is_runner_image(c.get("image", ""))
    ]
    main = [(c, False) for c in spec.get("containers") or [] if is_runner_image(c.get("image", ""))]
    return side + main


def startable(
    order: list[tuple[str, bool]], started: Mapping[str, bool], running: Iterable[str]
) -> list[str]:
    """The containers to start now, by the kubelet's rule for native sidecars: a sidecar once every
    sidecar before it has started, every main container once all sidecars have. `order` is
    (name, is a sidecar) in start order, `started` whether a sidecar has started, `running` the
    containers already launched (not started again here)."""
    up = set(running)
    out: list[str] = []
    for name, sidecar in order:
        if sidecar:
            if name not in up:
                return [*out, name]  # the next sidecar; what follows waits for it to start
            if not started.get(name, False):
                return out
        elif name not in up:
            out.append(name)
    return out


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def sd_targets(pods: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus http_sd groups for live pods with an IP, labelled like kubernetes_sd role=pod.

    Filtering on ``prometheus.io/*`` annotations is left to the scrape config's relabelling, as
    with real Kubernetes discovery.
    """
    groups: list[dict[str, Any]] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        labels = {
            "__meta_kubernetes_namespace": meta.get("namespace", ""),
            "__meta_kubernetes_pod_name": meta.get("name", ""),
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_node_name": (pod.get("spec") or {}).get("nodeName", ""),
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_ready": "true" if ready else "false",
        }
        for k, v in (meta.get("labels") or {}).items():
            labels[f"__meta_kubernetes_pod_label_{_label_name(k)}"] = v
        for k, v in (meta.get("annotations") or {}).items():
            labels[f"__meta_kubernetes_pod_annotation_{_label_name(k)}"] = v
        groups.append({"targets": [ip], "labels": labels})
    return groups


def serve_sd(runner: PodRunner, listen: str) -> None:
    """Serve ``GET /targets`` (Prometheus http_sd) from the runner's view of all pods."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with runner.lock:
                body = json.dumps(sd_targets(list(runner.all_pods.values()))).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host, _, port = listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="sd").start()


@dataclass
class Managed:
    """One running container process of one pod."""

    uid: str
    namespace: str
    name: str
    container: str
    ip: str
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0  # process group of the latest start, for a last-resort kill
    started: float = 0.0
    ready: bool | None = None
    next_probe: float = 0.0
    live_failures: int = 0
    ready_failures: int = 0
    restarts: int = 0
    grace: float = 5.0
    log_path: Path = field(default_factory=Path)
    sidecar: bool = False  # a native sidecar (restartPolicy: Always init container)
    started_ok: bool = False  # a sidecar's startupProbe passed (or it has none and runs)
    waiting: bool = False  # not launched yet: sidecars before it have not started


class PodRunner:
    """Keeps one local process per project-image container of every live pod."""

    def __init__(
        self,
        api: Any,
        netns: str | None,
        workdir: Path,
        bin_dir: Path,
        pod_kubeconfig: Path | None,
        api_server: tuple[str, int] | None = None,
        ca_data: bytes | None = None,
        nvml_dir: Path | None = None,
    ) -> None:
        self.api = api
        # Simulated NVIDIA runtime: the fake libnvidia-ml.so.1 and one GPU state file per node.
        self.nvml_dir = nvml_dir
        self.nvml_lib: Path | None = None
        self.netns = netns
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.pod_kubeconfig = pod_kubeconfig
        # In-cluster config for pods: the API server's address on the pod network and its CA.
        self.api_server = api_server
        self.ca_data = ca_data
        self.token_refresh: dict[str, float] = {}  # pod uid -> when to renew its token
        self.procs: dict[tuple[str, str], Managed] = {}
        self.order: dict[str, list[tuple[str, bool]]] = {}  # pod uid -> (container, sidecar) start order
        self.ip_users: dict[str, int] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self.all_pods: dict[str, dict[str, Any]] = {}
        # Pods being deleted: their processes get their grace period in a thread each.
        self.dying: dict[str, list[Managed]] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()

    # -- addresses -------------------------------------------------------------------------
    # Each pod gets a network namespace of its own, wired to the cluster's pod-network namespace
    # the way a point-to-point CNI plugin (the reference "ptp" plugin, Calico) wires it: a veth
    # pair, the pod IP as a /32 on the pod's end with a default route out of it, a /32 route to
    # the pod on the cluster end, which answers the pod's ARP (proxy_arp) and forwards. So a pod
    # may listen on 0.0.0.0 like in a real cluster (two routers, each on :8080) and still be
    # reached only at its pod IP.
    @staticmethod
    def pod_netns(ip: str) -> str:
        return "tsp-" + ip.replace(".", "-")

    @staticmethod
    def _veths(ip: str) -> tuple[str, str]:
        tag = "".join(f"{int(o):02x}" for o in ip.split("."))
        return f"vh{tag}", f"vp{tag}"

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        if r.returncode and "File exists" not in r.stderr and "Cannot assign" not in r.stderr:
            log.warning("%s: %s", " ".join(cmd), r.stderr.strip())

    def _ip(self, action: str, ip: str) -> None:
        if not self.netns:
            return
        ns, pod_ns = self.netns, self.pod_netns(ip)
        host_end, pod_end = self._veths(ip)
        if action == "del":
            self._run("ip", "netns", "delete", pod_ns)  # takes the veth pair and its route along
            return
        self._run("ip", "netns", "add", pod_ns)
        self._run("ip", "-n", ns, "link", "add", host_end, "type", "veth", "peer", "name", pod_end,
                  "netns", pod_ns)  # fmt: skip
        self._run("ip", "-n", pod_ns, "link", "set", "lo", "up")
        self._run("ip", "-n", pod_ns, "addr", "add", f"{ip}/32", "dev", pod_end)
        self._run("ip", "-n", pod_ns, "link", "set", pod_end, "up")
        self._run("ip", "-n", pod_ns, "route", "add", "default", "dev", pod_end)
        self._run("ip", "-n", ns, "link", "set", host_end, "up")
        for key in (f"net.ipv4.conf.{host_end}.proxy_arp=1", f"net.ipv4.conf.{host_end}.rp_filter=0",
                    "net.ipv4.ip_forward=1"):  # fmt: skip
            self._run("ip", "netns", "exec", ns, "sysctl", "-qw", key)
        self._run("ip", "-n", ns, "route", "replace", f"{ip}/32", "dev", host_end)

    def _acquire_ip(self, ip: str) -> None:
        if self.ip_users.get(ip, 0) == 0:
            self._ip("add", ip)
        self.ip_users[ip] = self.ip_users.get(ip, 0) + 1

    def _release_ip(self, ip: str) -> None:
        self.ip_users[ip] -= 1
        if self.ip_users[ip] <= 0:
            del self.ip_users[ip]
            self._ip("del", ip)

    # -- API helpers -----------------------------------------------------------------------
    def _lookup(self, kind: str, ns: str, name: str, key: str | None) -> Any:
        import base64

        try:
            if kind == "configMap":
                data = self.api.read_namespaced_config_map(name, ns).data or {}
            else:
                raw = self.api.read_namespaced_secret(name, ns).data or {}
                data = {k: base64.b64decode(v).decode() for k, v in raw.items()}
        except Exception as e:
            log.warning("%s %s/%s: %s", kind, ns, name, e)
            return None
        return data if key is None else data.get(key)

    def _annotate(self, m: Managed, ready: bool) -> None:
        """The pod's readiness (every container of it the runner runs is ready, sidecars
        included) and restarts (summed), after `m` became `ready` or not."""
        with self.lock:
            mine = [x for k, x in self.procs.items() if k[0] == m.uid] or [m]
        pod_ready = ready and all(x.ready is True for x in mine)
        restarts = sum(x.restarts for x in mine)
        notes = {READY_ANNOTATION: "true" if pod_ready else "false", RESTARTS_ANNOTATION: str(restarts)}
        body = {"metadata": {"annotations": notes}}
        try:
            self.api.patch_namespaced_pod(m.name, m.namespace, body)
        except Exception as e:  # the pod may be gone already
            log.info("annotate %s/%s: %s", m.namespace, m.name, e)

    # -- what the kubelet mounts ------------------------------------------------------------
    def _pod_dir(self, uid: str) -> Path:
        return self.workdir / ".pods" / uid

    def _automount(self, pod: Mapping[str, Any]) -> bool:
        """The pod's automountServiceAccountToken, else its ServiceAccount's, else true."""
        spec = pod.get("spec") or {}
        if spec.get("automountServiceAccountToken") is not None:
            return bool(spec["automountServiceAccountToken"])
        meta = pod.get("metadata") or {}
        try:
            sa = self.api.read_namespaced_service_account(
                spec.get("serviceAccountName") or "default", meta["namespace"]
            )
        except Exception as e:  # the token request below reports a missing ServiceAccount
            log.debug("service account of %s/%s: %s", meta.get("namespace"), meta.get("name"), e)
            return True
        return sa.automount_service_account_token is not False

    def _write_token(self, pod: Mapping[str, Any]) -> Path:
        """A TokenRequest bound to the pod, written with ca.crt and namespace (atomically: renewals too)."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        sa = spec.get("serviceAccountName") or "default"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [],
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            tr = self.api.create_namespaced_service_account_token(sa, meta["namespace"], body)
        except Exception as e:
            raise OSError(f"token for service account {meta['namespace']}/{sa}: {e}") from e
        d = self._pod_dir(meta["uid"]) / "serviceaccount"
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / "token", tr.status.token)
        _write_atomic(d / "ca.crt", self.ca_data or b"")
        _write_atomic(d / "namespace", meta["namespace"])
        self.token_refresh[meta["uid"]] = time.monotonic() + 0.8 * TOKEN_SECONDS
        return d

    def _write_volumes(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        root = self._pod_dir(meta["uid"]) / "volumes"
        for v in (pod.get("spec") or {}).get("volumes") or []:
            d = root / v["name"]
            d.mkdir(parents=True, exist_ok=True)
            for kind in ("configMap", "secret"):
                if kind in v:
                    ref = v[kind].get("name") or v[kind].get("secretName")
                    data = self._lookup(kind, meta["namespace"], ref, None)
                    if data is None and not v[kind].get("optional"):
                        raise OSError(f"volume {v['name']}: {kind} {ref} not found")
                    for rel, content in volume_files(v, data or {}).items():
                        f = d / rel
                        f.parent.mkdir(parents=True, exist_ok=True)
                        _write_atomic(f, content)

    def _forget_pod(self, uid: str) -> None:
        self.token_refresh.pop(uid, None)
        self.order.pop(uid, None)
        if self._pod_dir(uid).exists():
            shutil.rmtree(self._pod_dir(uid), ignore_errors=True)

    def _refresh_tokens(self) -> None:
        now = time.monotonic()
        for uid, due in list(self.token_refresh.items()):
            pod = self._pods.get(uid)
            if pod is None or now < due:
                continue
            try:
                self._write_token(pod)
            except OSError as e:
                log.warning("renew token %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], e)
                self.token_refresh[uid] = now + 5

    # -- processes -------------------------------------------------------------------------
    def _start(self, m: Managed, pod: Mapping[str, Any]) -> None:
        c = m.spec
        env = container_env(pod, c, self._lookup)
        argv = [expand(a, env) for a in (c.get("command") or DEFAULT_ENTRYPOINT)]
        argv += [expand(a, env) for a in c.get("args") or []]
        base = {
            "PATH": f"{self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": m.name,
            "PYTHONUNBUFFERED": "1",
            "TOPOSERVE_POD_RUNNER": "1",
        }
        if os.environ.get("PYTHONPATH"):  # a worktree sharing a venv: its own code, as the runner's
            base["PYTHONPATH"] = os.environ["PYTHONPATH"]
        if self.pod_kubeconfig:
            base["KUBECONFIG"] = str(self.pod_kubeconfig)
        base |= self._nvml_env(pod, c)
        mount_prefix: list[str] = []
        if self.api_server:
            base |= in_cluster_env(*self.api_server)
            pod_dir = self._pod_dir(m.uid)
            token_dir = self._write_token(pod) if self._automount(pod) else None
            self._write_volumes(pod)
            scratch = pod_dir / f"overlay-{m.container}"
            scratch.mkdir(parents=True, exist_ok=True)
            keep = [str(self.bin_dir), str(self.workdir), *os.environ.get("PYTHONPATH", "").split(":")]
            mounts = container_mounts(pod, c, pod_dir, token_dir, [k for k in keep if k])
            script = mount_script(mounts, scratch)
            mount_prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, m.container]
        full_env = base | env
        cwd = Path(c.get("workingDir") or self.workdir)
        if not cwd.is_dir():
            cwd = self.workdir
        prefix = (["ip", "netns", "exec", self.pod_netns(m.ip)] if self.netns else []) + mount_prefix
        m.log_path = self.workdir / f"{m.namespace}_{m.name}_{m.container}.log"
        with open(m.log_path, "ab") as out:
            out.write(f"--- start {argv!r} on {m.ip} (restart {m.restarts})\n".encode())
            out.flush()
            m.proc = subprocess.Popen(
                prefix + argv,
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        m.pid = m.proc.pid
        m.started = time.monotonic()
        m.next_probe = m.started + float((c.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
        m.live_failures = m.ready_failures = 0
        log.info(
            "started %s/%s[%s] pid %d on %s: %s", m.namespace, m.name, m.container, m.proc.pid, m.ip, argv
        )

    def nvml_state_path(self, node: str) -> Path:
        assert self.nvml_dir is not None
        return self.nvml_dir / f"{node}.state"

    def _nvml_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        """What the NVIDIA runtime gives a container on a GPU node: the (fake) NVML library, here
        with the GPU state file of the pod's node (created healthy on first use; tests edit it)."""
        node = (pod.get("spec") or {}).get("nodeName")
        if self.nvml_dir is None or not node or not wants_nvml(pod, container):
            return {}
        state = self.nvml_state_path(node)
        if not state.exists():
            try:
                gpus = node_gpu_state(self.api.read_node(node).to_dict())
            except Exception as e:  # no node, no GPUs: NVML then reports the driver missing
                log.warning("nvml state for %s: %s", node, e)
                gpus = []
            self.nvml_dir.mkdir(parents=True, exist_ok=True)
            fakenvml.write_state(state, gpus, driver="loaded" if gpus else "not_loaded")
        if self.nvml_lib is None:
            self.nvml_lib = fakenvml.build()
        return {"LD_LIBRARY_PATH": str(self.nvml_lib), fakenvml.STATE_ENV: str(state)}

    def _kill(self, m: Managed) -> None:
        p = m.proc
        m.proc = None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=m.grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def _stop(self, key: tuple[str, str]) -> None:
        m = self.procs.pop(key)
        self._kill(m)
        self._release_ip(m.ip)
        log.info("stopped %s/%s[%s]", m.namespace, m.name, m.container)

    def _finish_pod(self, uid: str, namespace: str, name: str) -> None:
        """Like the kubelet: the preStop hooks, then SIGTERM, both within the grace period, which
        counts from the deletion (kubernetes.io/docs "Pod Lifecycle", "Termination of Pods": the
        hook runs first, SIGTERM follows when it returns, SIGKILL when the grace period is over);
        then delete the pod for good."""
        managed = self.dying.get(uid, [])
        start = time.monotonic()
        hooks = [threading.Thread(target=self._pre_stop, args=(m, start)) for m in managed]
        for t in hooks:  # each container's hook at once, as the kubelet runs them
            t.start()
        for t in hooks:
            t.join()
        for m in managed:
            m.grace = max(0.0, m.grace - (time.monotonic() - start))
            self._kill(m)
            log.info("stopped %s/%s[%s] (pod deleted)", m.namespace, m.name, m.container)
        with self.lock:
            for m in managed:
                self._release_ip(m.ip)
            self.dying.pop(uid, None)
            self._forget_pod(uid)
        try:
            # In the body: with a DeleteOptions body the API server ignores the
            # gracePeriodSeconds query parameter (seen on 1.35), and the pod would stay
            # Terminating for its whole grace period.
            self.api.delete_namespaced_pod(
                name, namespace, body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
            )
        except Exception as e:
            if getattr(e, "status", None) == 404:  # already gone
                log.debug("final delete %s/%s: %s", namespace, name, e)
            else:  # the pod would stay Terminating until the kwok fallback stage: say why
                log.warning("final delete %s/%s failed: %s", namespace, name, e)

    def _pre_stop(self, m: Managed, start: float) -> None:
        """A container's preStop hook, cut at its grace period: the ``sleep`` action (beta and on
        by default since Kubernetes 1.30) and ``httpGet`` are run; ``exec`` needs the image's
        binaries, which the runner does not have, so it is skipped with a warning."""
        hook = ((m.spec.get("lifecycle") or {}).get("preStop")) or {}
        left = m.grace - (time.monotonic() - start)
        if "sleep" in hook:
            seconds = min(float(hook["sleep"].get("seconds", 0)), max(0.0, left))
            log.info("%s/%s[%s] preStop: sleep %.0fs", m.namespace, m.name, m.container, seconds)
            self.stopping.wait(seconds)
        elif "httpGet" in hook:
            ports = {p["name"]: p["containerPort"] for p in m.spec.get("ports") or [] if p.get("name")}
            probe_ok(m.ip, {"httpGet": hook["httpGet"], "timeoutSeconds": max(1.0, left)}, ports)
        elif hook:
            log.warning("%s/%s[%s] preStop %s: not simulated", m.namespace, m.name, m.container, sorted(hook))

    def _begin_termination(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
        managed = [self.procs.pop(k) for k in [k for k in self.procs if k[0] == uid]]
        managed.sort(key=lambda m: m.sidecar)  # main containers stop first, sidecars after them
        for m in managed:
            m.grace = float(30 if grace is None else grace)
        self.dying[uid] = managed
        self._pods.pop(uid, None)
        threading.Thread(
            target=self._finish_pod, args=(uid, meta["namespace"], meta["name"]), daemon=True
        ).start()

    # -- reconcile -------------------------------------------------------------------------
    def handle(self, event: str, pod: dict[str, Any]) -> None:
        """Bring the local processes of one pod in line with its latest state."""
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        ip = status.get("podIP")
        gone = (
            event == "DELETED"
            or meta.get("deletionTimestamp")
            or status.get("phase") in ("Succeeded", "Failed")
        )
        with self.lock:
            if gone:
                self.all_pods.pop(uid, None)
            else:
                self.all_pods[uid] = pod
            runs_here = bool(runner_containers(spec))
            if event != "DELETED" and meta.get("deletionTimestamp") and runs_here:
                if uid not in self.dying:
                    self._begin_termination(pod)
                return
            order = runner_containers(spec)
            wanted = (
                {} if gone or not ip or not spec.get("nodeName") else {c["name"]: (c, sc) for c, sc in order}
            )
            for key in [k for k in self.procs if k[0] == uid and k[1] not in wanted]:
                self._stop(key)
            if not wanted and uid not in self.dying:
                self._forget_pod(uid)
            for cname, (c, sidecar) in wanted.items():
                key = (uid, cname)
                if key in self.procs:
                    continue
                m = Managed(
                    uid=uid,
                    namespace=meta["namespace"],
                    name=meta["name"],
                    container=cname,
                    ip=str(ip),
                    spec=c,
                    grace=min(float(spec.get("terminationGracePeriodSeconds") or 5), 10.0),
                    sidecar=sidecar,
                    waiting=True,
                )
                self.procs[key] = m
                self._pods[uid] = pod
                self._acquire_ip(m.ip)
            if wanted:
                self._pods[uid] = pod
                self.order[uid] = [(c["name"], sc) for c, sc in order]
                self._launch(uid, pod)
            else:
                self._pods.pop(uid, None)

    def _launch(self, uid: str, pod: Mapping[str, Any]) -> None:
        """Start the pod's containers that may start now (``startable``: sidecars in order, each
        once the one before has started; then the main containers)."""
        with self.lock:
            mine = {k[1]: m for k, m in self.procs.items() if k[0] == uid}
            started = {n: m.started_ok for n, m in mine.items()}
            running = [n for n, m in mine.items() if not m.waiting]
            for cname in startable(self.order.get(uid, []), started, running):
                m = mine.get(cname)
                if m is None:
                    continue
                m.waiting = False
                try:
                    self._start(m, pod)
                except OSError as e:
                    log.error("cannot start %s/%s[%s]: %s", m.namespace, m.name, cname, e)
                    m.proc = None
                    self._annotate(m, False)
                    continue
                if m.sidecar and not m.spec.get("startupProbe"):  # started once its process runs
                    m.started_ok = True
                    self._launch(uid, pod)
                    return

    def tick(self) -> None:
        """Renew tokens; probe readiness and liveness; restart exited or unhealthy processes."""
        self._refresh_tokens()
        now = time.monotonic()
        with self.lock:
            items = list(self.procs.values())
        launch: set[str] = set()
        for m in items:
            if m.waiting:  # launched by _launch once the sidecars before it have started
                continue
            if m.proc is not None and m.proc.poll() is not None:
                log.warning("%s/%s[%s] exited with %s", m.namespace, m.name, m.container, m.proc.returncode)
                m.proc = None
            if m.proc is None:
                if m.ready is not False:
                    m.ready = False
                    self._annotate(m, False)
                backoff = min(2.0 ** min(m.restarts, 5), 30.0)
                if now - m.started >= backoff and (pod := self._pods.get(m.uid)):
                    m.restarts += 1
                    with self.lock:
                        if (m.uid, m.container) in self.procs:
                            try:
                                self._start(m, pod)
                            except OSError as e:
                                log.error("restart %s/%s: %s", m.namespace, m.name, e)
                                m.started = now
                continue
            if now < m.next_probe:
                continue
            ports = {p["name"]: p["containerPort"] for p in m.spec.get("ports") or [] if p.get("name")}
            if m.sidecar and not m.started_ok:  # its startupProbe gates what starts after it
                sp = m.spec.get("startupProbe")
                if not probe_ok(m.ip, sp, ports):
                    m.next_probe = now + min(float((sp or {}).get("periodSeconds", 10)), 1.0)
                    continue
                m.started_ok = True
                launch.add(m.uid)
                log.info("%s/%s[%s] started", m.namespace, m.name, m.container)
            rp = m.spec.get("readinessProbe")
            ok = probe_ok(m.ip, rp, ports)
            period = float((rp or {}).get("periodSeconds", 10))
            if ok:
                m.ready_failures = 0
                if m.ready is not True:
                    m.ready = True
                    log.info("%s/%s ready", m.namespace, m.name)
                    self._annotate(m, True)
            else:
                m.ready_failures += 1
                if m.ready is True and m.ready_failures >= int((rp or {}).get("failureThreshold", 3)):
                    m.ready = False
                    self._annotate(m, False)
            lp = m.spec.get("livenessProbe")
            if lp and now - m.started >= float(lp.get("initialDelaySeconds", 0)):
                if probe_ok(m.ip, lp, ports):
                    m.live_failures = 0
                else:
                    m.live_failures += 1
                    if m.live_failures >= int(lp.get("failureThreshold", 3)) and m.ready is not None:
                        log.warning("%s/%s failed liveness; restarting", m.namespace, m.name)
                        self._kill(m)
                        continue
            # Poll fast until first ready so tests and the demo do not wait a whole period.
            m.next_probe = now + (min(period, 1.0) if m.ready is not True else min(period, 5.0))
        for uid in launch:
            with self.lock:
                pod = self._pods.get(uid)
                if pod is not None:
                    self._launch(uid, pod)

    def stop_all(self) -> None:
        with self.lock:
            for key in list(self.procs):
                self._stop(key)
            for managed in list(self.dying.values()):
                for m in managed:
                    if m.pid:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(m.pid, signal.SIGKILL)


class _Pair:
    """The two sockets of one relayed connection, closed only once both pumps are done.

    Why not close them in whichever pump ends first: the other pump's thread may be about to
    enter ``recv``/``send`` on the same file descriptor, and a closed descriptor's number is
    reused by the next ``accept``. That thread then reads or writes *another* connection's bytes:
    seen through dev/serviceproxy.py as a client's next request reset, or answered with the tail
    of an earlier answer ("server disconnected without sending a response"), in about one
    rollout test in three. ``shutdown`` ends both directions (the other pump's ``recv`` returns)
    without giving the descriptors up."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self.left = 2
        self.lock = threading.Lock()

    def done(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.close()


def _pump(src: socket.socket, dst: socket.socket, pair: _Pair) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:  # either side done: end the connection (TLS and HTTP need no half-close here)
        pair.done()


def forward(
    listen: tuple[str, int], target: tuple[str, int] | Callable[[], tuple[str, int] | None]
) -> socket.socket:
    """Relay TCP from ``listen`` to ``target`` in threads: the API server listens on loopback only,
    and pods reach it at the pod network's bridge address through this relay. ``target`` may be a
    function choosing one per connection (None: refuse it), as dev/serviceproxy.py does."""
    server = socket.create_server(listen)
    choose = target if callable(target) else lambda: target

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed
            to = choose()
            if to is None:
                client.close()
                continue
            try:
                upstream = socket.create_connection(to, timeout=10)
                upstream.settimeout(None)
            except OSError as e:
                log.warning("forward %s -> %s: %s", listen, to, e)
                client.close()
                continue
            pair = _Pair(client, upstream)
            threading.Thread(target=_pump, args=(client, upstream, pair), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, pair), daemon=True).start()

    threading.Thread(target=serve, daemon=True, name="forward").start()
    return server


def in_cluster_from_kubeconfig(path: str) -> tuple[tuple[str, int] | None, bytes | None]:
    """The API server (host, port) and CA of the kubeconfig that pods use to reach it."""
    import base64
    from urllib.parse import urlsplit

    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    cluster = cfg["clusters"][0]["cluster"]
    url = urlsplit(cluster["server"])
    ca: bytes | None = None
    if cluster.get("certificate-authority-data"):
        ca = base64.b64decode(cluster["certificate-authority-data"])
    elif cluster.get("certificate-authority"):
        ca_path = Path(cluster["certificate-authority"])
        ca = (ca_path if ca_path.is_absolute() else Path(path).parent / ca_path).read_bytes()
    if not url.hostname:
        return None, ca
    return (url.hostname, url.port or 443), ca


def _kube() -> Any:
    """The kubernetes client package, imported lazily and typed loosely (it ships no types)."""
    import importlib

    return importlib.import_module("kubernetes")


def _watch(runner: PodRunner, api: Any) -> None:
    watch = _kube().watch

    while not runner.stopping.is_set():
        try:
            pods = api.list_pod_for_all_namespaces()
            rv = pods.metadata.resource_version
            live = set()
            for p in pods.items:
                d = api.api_client.sanitize_for_serialization(p)
                live.add(d["metadata"]["uid"])
                runner.handle("ADDED", d)
            with runner.lock:
                for key in [k for k in runner.procs if k[0] not in live]:
                    runner._stop(key)
                for uid in [u for u in runner.all_pods if u not in live]:
                    del runner.all_pods[uid]
            w = watch.Watch()
            for ev in w.stream(
                api.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=60, _request_timeout=90
            ):
                if runner.stopping.is_set():
                    w.stop()
                    break
                runner.handle(ev["type"], api.api_client.sanitize_for_serialization(ev["object"]))
        except Exception as e:
            if runner.stopping.is_set():
                break
            log.warning("watch: %s; relisting", e)
            runner.stopping.wait(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--netns", default=None, help="pod-network namespace (none: run on the host)")
    p.add_argument("--pod-kubeconfig", default=None, help="kubeconfig handed to pods (KUBECONFIG)")
    p.add_argument("--workdir", default=".cluster/pods", help="working dir and per-container logs")
    p.add_argument("--bin-dir", default=str(Path(sys.executable).parent), help="put first on PATH")
    p.add_argument("--sd-listen", default=None, help="serve Prometheus http_sd on HOST:PORT")
    p.add_argument(
        "--nvml-dir",
        default=None,
        help="simulate the NVIDIA runtime: give NVML-wanting containers the fake libnvidia-ml.so.1 and "
        "this directory's <node>.state",
    )
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="LISTEN=TARGET",
        help="relay TCP HOST:PORT=HOST:PORT (the API server on loopback, reached from the pod network)",
    )
    p.add_argument(
        "--in-cluster",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give pods in-cluster config and ServiceAccount tokens (API server from --pod-kubeconfig)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    for spec in args.forward:
        src, _, dst = spec.partition("=")
        (lh, _, lp), (th, _, tp) = src.rpartition(":"), dst.rpartition(":")
        forward((lh, int(lp)), (th, int(tp)))
    kube = _kube()
    kube.config.load_kube_config(config_file=args.kubeconfig)
    api = kube.client.CoreV1Api()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    api_server, ca_data = (
        in_cluster_from_kubeconfig(args.pod_kubeconfig) if args.pod_kubeconfig else (None, None)
    )
    runner = PodRunner(
        api,
        args.netns,
        workdir,
        Path(args.bin_dir).absolute(),
        Path(args.pod_kubeconfig).resolve() if args.pod_kubeconfig else None,
        api_server=api_server if args.in_cluster else None,
        ca_data=ca_data,
        nvml_dir=Path(args.nvml_dir).resolve() if args.nvml_dir else None,
    )

    def on_signal(signum: int, _frame: object) -> None:
        runner.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_watch, args=(runner, api), daemon=True, name="watch").start()
    if args.sd_listen:
        serve_sd(runner, args.sd_listen)
    log.info("pod runner up (netns=%s, bin=%s)", args.netns, args.bin_dir)
    while not runner.stopping.wait(0.25):
        try:
            runner.tick()
        except Exception:
            log.exception("tick")
    runner.stop_all()
    log.info("pod runner stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
