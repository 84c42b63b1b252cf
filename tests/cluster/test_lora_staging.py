"""LoRA adapters from https://, s3:// and pinned Hugging Face revisions behind the chart's gateway
on the local cluster: the engine pods' adapter stager (a native sidecar, run by the pod runner as
the kubelet runs one) downloads them onto the pod's model cache when the gateway first loads
them, the openai SDK gets 200 for each, and a broken archive gives AdaptersLoaded False naming the
adapter and its source while the base model and the other adapters keep serving.

The servers run on this machine at the pod network's bridge address (hack/cluster/common.sh
HOST_ADDR), which pods reach as they reach the API server: an HTTPS server with a self-signed
certificate (trusted through spec.lora.stagingSecret's STAGE_CA_BUNDLE), moto's S3 server
(credentials and endpoint through the same Secret), and the Hugging Face Hub stand-in of the
unit tests (tests/unit/adapterstage/loopback.py fake_hub; HF_ENDPOINT through the Secret)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.cluster.conftest import ROOT, Cluster, kubectl, wait_for
from tests.cluster.operator_harness import condition, get_llmd, wait_condition
from tests.cluster.test_helm import helm, release, values_file
from tests.cluster.test_lora import _NO_PROXY, get, ready_ips
from tests.unit.adapterstage.loopback import adapter_files, fake_hub, file_server, self_signed, tar_bytes
from tests.unit.chart_helpers import CHART
from toposerve.adapterstage.sources import STAGE_PORT

pytestmark = pytest.mark.cluster
__all__ = ["release"]
BRIDGE = "10.243.0.1"  # hack/cluster/common.sh HOST_ADDR: the host end of the pod network


@pytest.fixture
def s3_server() -> Iterator[str]:
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address=BRIDGE, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    )
    client.create_bucket(Bucket="adapters")
    for name, data in adapter_files(16).items():
        client.put_object(Bucket="adapters", Key=f"dir/fin/{name}", Body=data)
    try:
        yield url
    finally:
        server.stop()


def test_https_and_s3_adapters_are_staged_and_served_a_broken_one_is_reported(
    cluster: Cluster, namespace: str, release: str, tmp_path: Path, s3_server: str
) -> None:
    good = tar_bytes(adapter_files(8), prefix="sql/")
    tls = self_signed(tmp_path, BRIDGE)
    hub_repos = {"acme/ops-lora": {"main": adapter_files(8), "v2": adapter_files(32)}}
    with (
        file_server({"sql.tgz": good, "cut.tgz": good[:60]}, host=BRIDGE, tls=tls) as (web, hits),
        fake_hub(hub_repos, host=BRIDGE) as (hub, hub_seen),
    ):
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "adapter-creds"},
            "data": {
                k: base64.b64encode(v.encode()).decode()
                for k, v in {
                    "STAGE_CA_BUNDLE": tls[0].read_text(),
                    "AWS_ACCESS_KEY_ID": "k",
                    "AWS_SECRET_ACCESS_KEY": "s",
                    "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL_S3": s3_server,
                    "HF_ENDPOINT": hub,
                }.items()
            },
        }
        kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(secret))
        values = {
            "replicaCount": 1,
            "watchNamespaces": [namespace],
            "operatorConfig": {"autoEngine": "mock"},
            "gateway": {
                "watchNamespace": namespace,
                "extraArgs": ["--expose-backend", "--adapter-refresh", "1"],
            },
        }
        helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", values_file(tmp_path, values),
             "--wait", "--timeout", "4m")  # fmt: skip
        gws = wait_for(
            lambda: (x := ready_ips(cluster, namespace, f"{release}-toposerve-gateway")) and x,
            "a ready gateway",
        )
        obj: dict[str, Any] = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
        obj["metadata"]["name"] = "staged"
        obj["spec"].update({"engine": "mock", "replicas": 1, "routing": {"mode": "gateway"}})
        obj["spec"]["model"]["servedName"] = "base"
        obj["spec"]["lora"] = {
            "maxLoras": 2,
            "maxCpuLoras": 4,
            "maxLoraRank": 32,
            "stagingSecret": "adapter-creds",
        }
        obj["spec"]["adapters"] = [
            {"name": "web", "source": f"{web}/sql.tgz"},
            {"name": "bucket", "source": "s3://adapters/dir/fin"},
            {"name": "pinned", "source": "hf://acme/ops-lora", "revision": "v2"},
            {"name": "broken", "source": f"{web}/cut.tgz"},
        ]
        kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(obj))
        wait_condition(cluster, namespace, "staged", "Ready", "True", timeout=240)
        (engine,) = ready_ips(cluster, namespace, "staged-engine")
        # the sidecar serves on the pod IP, next to the engine
        with _NO_PROXY.open(f"http://{engine}:{STAGE_PORT}/health", timeout=10) as r:
            assert r.status == 200
        want = {"base", "web", "bucket", "pinned", "broken"}
        wait_for(
            lambda: want <= set(get(f"http://{gws[0]}:8080/health")["models"]) or None,
            "the gateway routes them",
        )

        client = openai.OpenAI(
            base_url=f"http://{gws[0]}:8080/v1", api_key="unused", max_retries=0, timeout=120
        )
        for model in ("web", "bucket", "pinned", "base"):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert raw.http_response.status_code == 200 and raw.parse().model == model
            if model != "base":  # loaded from the staged copy (checked now: it may be evicted later)
                cards = {m["id"]: m for m in get(f"http://{engine}:8000/v1/models")["data"]}
                assert cards[model]["root"].startswith("/models/.toposerve-adapters/"), cards
        assert hits.count("sql.tgz") == 1
        assert any(x["path"] == "/api/models/acme/ops-lora/revision/v2" for x in hub_seen)  # at its revision

        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="broken", prompt="x", max_tokens=2)
        assert e.value.status_code == 422 and f"{web}/cut.tgz" in str(e.value)

        def reported() -> Any:
            llmd = get_llmd(cluster, namespace, "staged")
            bad = [
                a
                for a in ((llmd.get("status") or {}).get("gateway") or {}).get("adapters") or []
                if a["name"] == "broken" and a.get("lastError")
            ]
            cond = condition(llmd, "AdaptersLoaded")
            return bad and cond and cond["status"] == "False" and (bad[0], cond)

        try:
            bad, cond = wait_for(reported, "status.gateway and AdaptersLoaded to name broken", timeout=120)
        except BaseException:
            print(
                "DEBUG status",
                json.dumps(get_llmd(cluster, namespace, "staged").get("status"), indent=1)[:6000],
            )
            raise
        assert f"{web}/cut.tgz" in bad["lastError"] and "truncated or corrupt" in bad["lastError"]
        assert "broken:" in cond["message"]
        assert not any(f"{n}:" in cond["message"] for n in ("web", "bucket", "pinned"))
        assert condition(get_llmd(cluster, namespace, "staged"), "Ready")["status"] == "True"  # type: ignore[index]
        for model in ("web", "bucket", "pinned", "base"):  # still serving
            assert client.completions.create(model=model, prompt="x", max_tokens=2).model == model
