"""Install LeaderWorkerSet (sigs.k8s.io/lws) into the local cluster with its controller on the host.

Upstream ships LWS as an in-cluster Deployment whose webhooks the API server calls through a
Service. The local cluster runs no real containers, so this turns upstream's own manifests
(``kubectl kustomize <lws module>/config/default``) into: everything but the Deployment, and a
selector-less webhook Service whose Endpoints point at the controller process on the host end of
the pod-network veth (the API server runs with ``--enable-aggregator-routing``, so it calls
webhooks on their endpoints). ``hack/cluster/lws.sh`` runs the controller.

Usage: ``kubectl kustomize .../config/default | python -m toposerve.dev.lws --host 10.243.0.1``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

import yaml

WEBHOOK_SERVICE = "lws-webhook-service"
NAMESPACE = "lws-system"
WEBHOOK_PORT = 9443


def rewrite(docs: Iterable[dict[str, Any] | None], host: str) -> list[dict[str, Any]]:
    """Upstream manifests minus the in-cluster controller, plus Endpoints for the host process."""
    out: list[dict[str, Any]] = []
    for d in docs:
        if not d:
            continue
        kind, name = d["kind"], d["metadata"]["name"]
        if kind == "Deployment" or (kind == "Service" and name != WEBHOOK_SERVICE):
            continue
        if kind == "Service":
            d["spec"].pop("selector", None)
        out.append(d)
    out.append(
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE},
            "subsets": [{"addresses": [{"ip": host}], "ports": [{"port": WEBHOOK_PORT, "protocol": "TCP"}]}],
        }
    )
    return out


def controller_config(host: str, cert_dir: str) -> dict[str, Any]:
    """The controller's Configuration: no leader election, webhook on the veth address only."""
    return {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": "lws-webhook-server-cert",
        },
        "webhook": {"host": host, "port": WEBHOOK_PORT, "certDir": cert_dir},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": "127.0.0.1:18081"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", required=True, help="address the controller's webhook listens on")
    p.add_argument("--config-out", help="also write the controller Configuration here")
    p.add_argument("--cert-dir", default="/tmp/lws-certs")
    args = p.parse_args(argv)
    yaml.safe_dump_all(rewrite(yaml.safe_load_all(sys.stdin), args.host), sys.stdout, sort_keys=False)
    if args.config_out:
        with open(args.config_out, "w") as f:
            yaml.safe_dump(controller_config(args.host, args.cert_dir), f, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
