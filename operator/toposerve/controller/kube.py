"""A thin Kubernetes client for the operator: server-side apply, list, delete, status, events.

Built on the official client's ``ApiClient.call_api`` so one code path serves every kind by URL
(no per-kind API classes), and server-side apply is a plain PATCH with
``application/apply-patch+yaml``, one field manager, forced: the operator owns the fields it sets
and nobody else's. The client is synchronous; callers run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import builtins
import json
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from toposerve import API_GROUP, API_VERSION
from toposerve.controller import metrics

FIELD_MANAGER = "toposerve"
LLMD_PLURAL = "llmdeployments"

# (apiVersion, kind) -> plural, for every kind the operator writes or reads.
PLURALS: dict[tuple[str, str], str] = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "Event"): "events",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkersets",
    (f"{API_GROUP}/{API_VERSION}", "LLMDeployment"): LLMD_PLURAL,
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("resource.nvidia.com/v1beta1", "ComputeDomain"): "computedomains",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepools",
    ("apps/v1", "DaemonSet"): "daemonsets",
}
CHILD_KINDS: list[tuple[str, str]] = [
    ("apps/v1", "Deployment"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),  # autoscaling.mode hpa
    ("keda.sh/v1alpha1", "ScaledObject"),  # autoscaling.mode keda (lists as empty without KEDA)
    ("monitoring.coreos.com/v1", "PodMonitor"),  # with the Prometheus Operator (render/monitoring.py)
    # GB200 IMEX with NVIDIA's DRA driver (render/fabric.py: COMPUTE_DOMAIN_API); lists as empty without it
    ("resource.nvidia.com/v1beta1", "ComputeDomain"),
    # Gateway API Inference Extension (render/inferencepool.py); lists as empty without its CRD
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("apps/v1", "DaemonSet"),  # model.cache.prefetch (render/prefetch.py)
]
LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
    plural = PLURALS[(api_version, kind)]
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = f"{root}/namespaces/{namespace}/{plural}" if namespace else f"{root}/{plural}"
    if name:
        p += f"/{name}"
    if sub:
        p += f"/{sub}"
    return p


def load_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        return api


class Kube:
    """Generic verbs over the REST paths above."""

    def __init__(self, api: client.ApiClient, timeout: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout
        self.identity = socket.gethostname()

    def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, Any]] | None = None,
    ) -> Any:
        """One REST call; the JSON answer as plain data, or ApiException for a non-2xx status."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if body is not None and content_type.endswith("+yaml"):
            body = json.dumps(body)  # JSON is YAML: the client then sends the text as is
        method, full_url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=url,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        start = time.perf_counter()
        resp = self.api.call_api(
            method, full_url, header_params=headers, body=body, _request_timeout=self.timeout
        )
        data = resp.read()  # type: ignore[no-untyped-call]
        metrics.API_SECONDS.labels(method).observe(time.perf_counter() - start)
        text = data.decode() if isinstance(data, bytes) else (data or "")
        if not 200 <= resp.status < 300:
            raise ApiException.from_response(http_resp=resp, body=text, data=None)
        return json.loads(text) if text else {}

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", path(api_version, kind, namespace, name)))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
        fields: str | None = None,
    ) -> list[dict[str, Any]]:
        query: list[tuple[str, Any]] = []
        if selector:
            query.append(("labelSelector", selector))
        if fields:
            query.append(("fieldSelector", fields))
        try:
            out = self.request("GET", path(api_version, kind, namespace), query=query)
        except ApiException as e:
            if e.status == 404:  # kind not served (e.g. LeaderWorkerSet CRD absent)
                return []
            raise
        return list(out.get("items") or [])

    def list_all(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
        fields: str | None = None,
        chunk: int = 500,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """Every matching object, fetched in chunks, and the list's resourceVersion to watch from."""
        items: builtins.list[dict[str, Any]] = []
        cont = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", chunk)]
            if selector:
                query.append(("labelSelector", selector))
            if fields:
                query.append(("fieldSelector", fields))
            if cont:
                query.append(("continue", cont))
            out = self.request("GET", path(api_version, kind, namespace), query=query)
            items += out.get("items") or []
            meta = out.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        resource_version: str,
        selector: str | None = None,
        fields: str | None = None,
        server_timeout: int = 60,
    ) -> Iterator[dict[str, Any]]:
        """Watch events ({type, object}) from ``resource_version``, bookmarks included, until the
        server ends the stream (after ``server_timeout``); the read timeout is a little longer, so a
        silent, dead connection ends too instead of stalling forever."""
        query: list[tuple[str, Any]] = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", server_timeout),
        ]
        if selector:
            query.append(("labelSelector", selector))
        if fields:
            query.append(("fieldSelector", fields))
        headers = {"Accept": "application/json"}
        method, full_url, headers, _, _ = self.api.param_serialize(
            method="GET",
            resource_path=path(api_version, kind, namespace),
            query_params=query,
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(
            method, full_url, header_params=headers, _request_timeout=(10, server_timeout + 30)
        )
        raw = resp.response  # urllib3, not yet read: the body is a stream of JSON lines
        try:
            if not 200 <= resp.status < 300:
                raise ApiException.from_response(http_resp=resp, body=raw.data.decode(), data=None)
            pending = b""
            for chunk in raw.stream(65536, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.close()  # a stream ended early must not go back to the pool half read

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return dict(
            self.request(
                "PATCH", url, body=dict(obj), content_type="application/apply-patch+yaml", query=query
            )
        )

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        body = {"propagationPolicy": "Background"}
        try:
            self.request("DELETE", path(api_version, kind, namespace, name), body=body)
        except ApiException as e:
            if e.status != 404:
                raise

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch of the object (labels, annotations, owner references of a pod)."""
        url = path(api_version, kind, namespace, name)
        query = [("fieldManager", FIELD_MANAGER)]
        return dict(
            self.request(
                "PATCH", url, body=dict(body), content_type="application/merge-patch+json", query=query
            )
        )

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as written."""
        url = path(api_version, kind, namespace, name, "status")
        query = [("fieldManager", FIELD_MANAGER)]
        return dict(
            self.request(
                "PATCH",
                url,
                body={"status": dict(status)},
                content_type="application/merge-patch+json",
                query=query,
            )
        )

    def has_crd(self, name: str) -> bool:
        try:
            self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API serves ``plural`` in ``api_version`` (API discovery: no RBAC needed, every
        authenticated client may read it; a group that is not installed answers 404)."""
        try:
            found = self.request("GET", f"/apis/{api_version}")
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in found.get("resources") or [])

    def server_version(self) -> dict[str, Any]:
        """The API server's ``/version`` answer (gitVersion, major, minor, ...): public to every client."""
        return dict(self.request("GET", "/version"))

    def event(self, involved: Mapping[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """A core/v1 Event on ``involved`` (what `kubectl describe` shows)."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "toposerve"},
            "reportingComponent": "toposerve",
            "reportingInstance": self.identity,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.request("POST", path("v1", "Event", meta["namespace"]), body=body)
