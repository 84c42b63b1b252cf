"""Backend addresses and the pure "endpoint set update" logic behind EndpointSlice discovery.

Kept free of aiohttp and the Kubernetes client so that the rules (what is a backend, which ones
drain, how slices merge) are unit-tested on plain dicts shaped like the API's JSON. The watch
itself lives in `discovery.py`.

Labels read from each EndpointSlice (Kubernetes copies them from the owning Service, so the
operator labels one Service per GPU pool):

- ``toposerve.io/pool``: the pool name (e.g. ``h100``, ``long``);
- ``toposerve.io/gpu-type``: catalog GPU name (``H100``), which gives the throughput weight;
- ``toposerve.io/long-context``: ``"true"`` for the pool planned for long prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from toposerve.api.gpus import throughput_weight

POOL_LABEL = "toposerve.io/pool"
GPU_LABEL = "toposerve.io/gpu-type"
LONG_CONTEXT_LABEL = "toposerve.io/long-context"
DEPLOYMENT_LABEL = "toposerve.io/deployment"  # what the renderer puts on every child object
COMPONENT_LABEL = "app.kubernetes.io/component"


def engine_selector(deployment: str) -> str:
    """Slices of the deployment's engine Services only: never the router's own Service."""
    return f"{DEPLOYMENT_LABEL}={deployment},{COMPONENT_LABEL}=engine"


@dataclass(frozen=True)
class BackendSpec:
    """A backend address plus what the router needs to know about its hardware."""

    url: str
    gpu_type: str = ""
    pool: str = ""
    long_context: bool = False
    # KV-event endpoints when not the convention ports on the host (router/kvindex.py)
    kv_events: str = ""
    kv_replay: str = ""

    @property
    def weight(self) -> float:
        return throughput_weight(self.gpu_type) if self.gpu_type else 1.0

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        """`http://host:port[#gpu=H100&pool=fast&long-context=true&kv-events=tcp://host:5557&kv-replay=tcp://host:5558]`
        (tags ride in the URL fragment)."""
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"backend {text!r}: expected http(s)://host:port")
        tags = {k: v[-1] for k, v in parse_qs(parts.fragment, keep_blank_values=True).items()}
        unknown = set(tags) - {"gpu", "pool", "long-context", "kv-events", "kv-replay"}
        if unknown:
            raise ValueError(f"backend {text!r}: unknown tag(s) {', '.join(sorted(unknown))}")
        url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        gpu = tags.get("gpu", "")
        long_ctx = tags.get("long-context", "false").lower() in ("", "1", "true", "yes")
        kv = {k: tags.get(k, "") for k in ("kv-events", "kv-replay")}
        for k, v in kv.items():
            if v and not v.startswith(("tcp://", "ipc://")):
                raise ValueError(f"backend {text!r}: {k} must be a tcp:// or ipc:// ZeroMQ endpoint")
        return cls(
            url=url,
            gpu_type=gpu,
            pool=tags.get("pool", gpu.lower()),
            long_context=long_ctx,
            kv_events=kv["kv-events"],
            kv_replay=kv["kv-replay"],
        )


def parse_backends(text: str) -> list[BackendSpec]:
    """Comma- or space-separated list of `BackendSpec.parse` strings."""
    return [BackendSpec.parse(p) for p in text.replace(" ", ",").split(",") if p.strip()]


@dataclass(frozen=True)
class Endpoint:
    spec: BackendSpec
    ready: bool
    terminating: bool

    @property
    def draining(self) -> bool:
        """Not ready or terminating: no new requests, in-flight ones finish."""
        return self.terminating or not self.ready


Slices = Mapping[str, tuple[Endpoint, ...]]


def _port(ports: Sequence[Mapping[str, Any]] | None, port_name: str | None) -> int | None:
    for p in ports or ():
        if (port_name is None or p.get("name") == port_name) and p.get("port"):
            return int(p["port"])
    return None


def endpoints_from_slice(obj: Mapping[str, Any], port_name: str | None = "http") -> tuple[Endpoint, ...]:
    """The endpoints of one EndpointSlice (API JSON, camelCase), tagged from its labels."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    port = _port(obj.get("ports"), port_name)
    if port is None and port_name is not None:
        port = _port(obj.get("ports"), None)  # an unnamed single port is fine too
    if port is None:
        return ()
    family = obj.get("addressType", "IPv4")
    gpu = labels.get(GPU_LABEL, "")
    pool = labels.get(POOL_LABEL, gpu.lower())
    long_ctx = str(labels.get(LONG_CONTEXT_LABEL, "")).lower() == "true"
    out: list[Endpoint] = []
    for ep in obj.get("endpoints") or ():
        cond = ep.get("conditions") or {}
        # API semantics: a nil `ready` means ready; `terminating` nil means not terminating.
        ready = cond.get("ready") is not False
        terminating = cond.get("terminating") is True
        for addr in ep.get("addresses") or ():
            host = f"[{addr}]" if family == "IPv6" else addr
            spec = BackendSpec(url=f"http://{host}:{port}", gpu_type=gpu, pool=pool, long_context=long_ctx)
            out.append(Endpoint(spec, ready, terminating))
    return tuple(out)


def apply_event(
    slices: Slices, event: str, obj: Mapping[str, Any], port_name: str | None = "http"
) -> dict[str, tuple[Endpoint, ...]]:
    """New slice map after one watch event (ADDED, MODIFIED, DELETED); input is not modified."""
    name = (obj.get("metadata") or {}).get("name", "")
    new = dict(slices)
    if event == "DELETED":
        new.pop(name, None)
    elif event in ("ADDED", "MODIFIED"):
        new[name] = endpoints_from_slice(obj, port_name)
    return new


def from_list(
    items: Sequence[Mapping[str, Any]], port_name: str | None = "http"
) -> dict[str, tuple[Endpoint, ...]]:
    """Slice map from a full list (initial sync and every re-list after a watch expires)."""
    return {(o.get("metadata") or {}).get("name", ""): endpoints_from_slice(o, port_name) for o in items}


def desired_backends(slices: Slices) -> dict[str, tuple[BackendSpec, bool]]:
    """url -> (spec, draining) over all slices.

    An address can sit in several slices: a slice split, or a pod behind both the all-engines
    Service and its pool's Service. It is ready if any slice says so, and it keeps the GPU/pool
    tags of whichever slice has them (the all-engines Service carries no pool labels).
    """
    out: dict[str, tuple[BackendSpec, bool]] = {}
    for name in sorted(slices):
        for ep in slices[name]:
            prev = out.get(ep.spec.url)
            if prev is None:
                out[ep.spec.url] = (ep.spec, ep.draining)
                continue
            spec = prev[0] if prev[0].gpu_type or not ep.spec.gpu_type else ep.spec
            out[ep.spec.url] = (spec, prev[1] and ep.draining)
    return out


@dataclass(frozen=True)
class Update:
    added: tuple[str, ...]
    drained: tuple[str, ...]  # still known, now draining
    restored: tuple[str, ...]  # was draining, ready again
    removed: tuple[str, ...]  # gone from discovery (the router drops them once idle)


def diff(current: Mapping[str, bool], desired: Mapping[str, tuple[BackendSpec, bool]]) -> Update:
    """What changes between the router's backends (url -> draining) and discovery's view (for logs)."""
    added = tuple(sorted(u for u in desired if u not in current))
    removed = tuple(sorted(u for u in current if u not in desired))
    drained = tuple(sorted(u for u, (_, d) in desired.items() if u in current and d and not current[u]))
    restored = tuple(sorted(u for u, (_, d) in desired.items() if u in current and not d and current[u]))
    return Update(added, drained, restored, removed)
