"""Operator scale benchmark on the local cluster (not a test: it prints and saves numbers).

1. time from one `kubectl apply` of N LLMDeployments to every one having its children applied and
   its status written for the current generation;
2. the operator's CPU and RSS at rest with M LLMDeployments (after convergence, sampled from /proc).

``--burst`` replaces step 1 with N creates sent at once (``--burst`` concurrent POSTs through the
API, not one-by-one kubectl) and reports the time from the first create to every object carrying
``status.observedGeneration == metadata.generation`` (seen through a watch), with the CPU seconds
each process used until then; ``--m 0`` skips step 2.

The deployments use replicas 0 (their workloads exist, scaled to zero) and no router, so neither
the simulated GPU fleet's capacity nor 1,000 router processes limit the control-plane work measured.

Usage: make cluster-up && .venv/bin/python bench/operator/run.py [--n 200] [--m 1000] [--rest 60] [--burst 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
NS = "bench-operator"


def kubectl_path() -> str:
    out = subprocess.run(["bash", "-c", f"source {ROOT}/hack/cluster/versions.sh; echo $CLUSTER_BIN/kubectl"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


KC = kubectl_path()


def kc(*args: str, stdin: str | None = None, check: bool = True) -> str:
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    res = subprocess.run([KC, *args], input=stdin, capture_output=True, text=True, env=env, check=False)
    if check and res.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {res.stderr}")
    return res.stdout


def manifest(i: int) -> dict[str, Any]:
    gpus = [["H100", "A100-80GB"], ["A100-80GB"], ["L4", "A100-40GB"], ["B200", "H100"]][i % 4]
    return {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": f"b{i:04d}"},
        "spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct", "maxContextLength": 8192},
                 "engine": "vllm", "replicas": 0, "placement": {"gpuTypes": gpus},
                 "routing": {"enabled": False}},
    }  # fmt: skip


def converged(n: int) -> tuple[int, int]:
    llmds = json.loads(kc("get", "llmd", "-n", NS, "-o", "json"))["items"]
    done = sum(
        1 for o in llmds if (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
    )
    deps = len(json.loads(kc("get", "deployments", "-n", NS, "-o", "json"))["items"])
    return done, deps


def api() -> Any:
    from toposerve.controller.kube import Kube, load_client

    return Kube(load_client(str(KUBECONFIG)))


def create_burst(n: int, threads: int) -> float:
    """POST ``n`` LLMDeployments with ``threads`` in flight; the time until the last create returned."""
    kube = api()
    url = f"/apis/toposerve.io/v1alpha1/namespaces/{NS}/llmdeployments"
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: kube.request("POST", url, body=manifest(i)), range(n)))
    return time.monotonic() - t0


class StatusWatch:
    """Watches the bench namespace's LLMDeployments (one stream: polling 200 objects several times
    a second would load the API server of a 2-core machine as much as the operator does) and
    notes when each first carries status for its generation."""

    def __init__(self) -> None:
        from kubernetes import client, config, watch

        self.api = client.CustomObjectsApi(config.new_client_from_config(str(KUBECONFIG)))
        self.watch = watch.Watch()
        self.done: dict[str, float] = {}
        self.failed: BaseException | None = None
        first = self.api.list_namespaced_custom_object("toposerve.io", "v1alpha1", NS, "llmdeployments")
        self.rv = first["metadata"]["resourceVersion"]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.watch.stream(self.api.list_namespaced_custom_object, "toposerve.io", "v1alpha1",
                                        NS, "llmdeployments", resource_version=self.rv, timeout_seconds=900):  # fmt: skip
                o = ev["object"]
                name = o["metadata"]["name"]
                if (
                    name not in self.done
                    and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
                ):
                    self.done[name] = time.monotonic()
        except BaseException as e:  # reported by wait()
            self.failed = e

    def wait(self, n: int, timeout: float, t0: float) -> float:
        """Seconds from ``t0`` until ``n`` objects carried status for their generation."""
        while time.monotonic() - t0 < timeout:
            if len(self.done) >= n:
                self.watch.stop()
                return max(self.done.values()) - t0
            if self.failed:
                raise SystemExit(f"status watch failed: {self.failed}")
            time.sleep(0.1)
        raise SystemExit(f"no status on all {n} after {timeout}s ({len(self.done)} had)")


def wait_converged(n: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done, deps = converged(n)
        if done >= n and deps >= n:
            return time.monotonic() - t0
        time.sleep(1)
    raise SystemExit(f"not converged after {timeout}s: {converged(n)}")


METRICS_PORT = 18093


def reconciles() -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("toposerve_reconcile_total{")
    )


def api_latency() -> dict[str, tuple[int, float]]:
    """The operator's API calls so far: count and mean seconds per HTTP method."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for name, into in (("_sum{", sums), ("_count{", counts)):
            if line.startswith("toposerve_api_request_duration_seconds" + name):
                method = line.split('method="')[1].split('"')[0]
                into[method] = float(line.split()[-1])
    return {m: (int(counts[m]), round(sums[m] / counts[m], 4)) for m in counts if counts[m]}


def wait_quiet(timeout: float, quiet: float = 15.0) -> float:
    """Seconds until the reconcile counter has not moved for ``quiet`` seconds."""
    t0 = time.monotonic()
    last, since = reconciles(), time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(1)
        now = reconciles()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return time.monotonic() - t0
    raise SystemExit("the operator never went quiet")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(operator_pid: int) -> dict[str, float]:
    """CPU seconds used so far by the operator, the control plane's processes (by name) and the
    whole machine, to tell where the time of a burst goes on a shared machine."""
    out: dict[str, float] = {"operator": proc_cpu_seconds(operator_pid)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "comm").read_text().strip()
            if name in ("kube-apiserver", "etcd", "kube-controller", "kube-scheduler", "kwok-controller"):
                out[name] = out.get(name, 0.0) + proc_cpu_seconds(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    out["machine_busy"] = (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")
    return out


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--rest", type=float, default=60.0, help="seconds to sample at rest")
    ap.add_argument("--resync", type=float, default=300.0, help="the operator's --resync")
    ap.add_argument("--burst", type=int, default=0, help="create the N at once with this many in flight")
    ap.add_argument("--workers", type=int, default=4, help="the operator's --workers")
    ap.add_argument("--out", default=str(ROOT / "bench" / "operator" / "results"))
    args = ap.parse_args()
    kc("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kc("delete", "namespace", NS, "--ignore-not-found", "--wait=true")
    kc("create", "namespace", NS)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    log = open(Path(args.out) / "operator.log", "w")  # noqa: SIM115
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    op = subprocess.Popen([sys.executable, "-m", "toposerve.cli", "run", "--metrics-port", str(METRICS_PORT),
                           "-n", NS, "--resync", str(args.resync), "--workers", str(args.workers)],
                          env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        time.sleep(3)
        t_status: float | None = None
        cpu: dict[str, float] = {}
        if args.burst:
            watcher = StatusWatch()
            c0 = cpu_by_process(op.pid)
            t0 = time.monotonic()
            t_apply = create_burst(args.n, args.burst)
            t_status = watcher.wait(args.n, 900, t0)
            c1 = cpu_by_process(op.pid)
            cpu = {k: round(v - c0.get(k, 0.0), 1) for k, v in c1.items()}
            print(f"CPU seconds until then: {cpu}")
            print(f"operator API calls until then (count, mean s): {api_latency()}")
            wait_converged(args.n, 900)
            t_conv = time.monotonic() - t0
            print(f"{args.n} LLMDeployments created at once ({args.burst} in flight): creates {t_apply:.1f}s, "
                  f"all with status for their generation {t_status:.1f}s")  # fmt: skip
        else:
            docs = yaml.safe_dump_all([manifest(i) for i in range(args.n)])
            t0 = time.monotonic()
            kc("apply", "-n", NS, "-f", "-", stdin=docs)
            t_apply = time.monotonic() - t0
            t_conv = wait_converged(args.n, 900) + t_apply
            print(
                f"{args.n} LLMDeployments: kubectl apply {t_apply:.1f}s, all children applied + status written {t_conv:.1f}s"
            )
        if not args.m:
            out = Path(args.out)
            result_n = {"n": args.n, "burst": args.burst, "workers": args.workers, "create_seconds": round(t_apply, 2),
                        "status_seconds": round(t_status or 0, 2), "converge_seconds": round(t_conv, 2),
                        "reconciles": reconciles(), "cpu_seconds": cpu, "command": " ".join(sys.argv)}  # fmt: skip
            (out / f"operator-burst-{args.n}.json").write_text(json.dumps(result_n, indent=2) + "\n")
            print(json.dumps(result_n, indent=2))
            return 0
        more = yaml.safe_dump_all([manifest(i) for i in range(args.n, args.m)])
        kc("apply", "-n", NS, "-f", "-", stdin=more)
        wait_converged(args.m, 1800)
        # Every status write comes back as a watch event and one more (write-free) reconcile: wait
        # until that tail has drained, so "at rest" means no reconcile is running.
        drained = wait_quiet(600)
        print(f"reconcile tail drained {drained:.0f}s after convergence")
        r0, c0, w0 = reconciles(), proc_cpu_seconds(op.pid), time.monotonic()
        rss = []
        while time.monotonic() - w0 < args.rest:
            time.sleep(5)
            rss.append(proc_rss_mib(op.pid))
        cpu = (proc_cpu_seconds(op.pid) - c0) / (time.monotonic() - w0)
        rest_reconciles = reconciles() - r0
        result = {
            "n": args.n, "apply_seconds": round(t_apply, 2), "converge_seconds": round(t_conv, 2),
            "m": args.m, "rest_seconds": args.rest, "rest_cpu_cores": round(cpu, 4),
            "rest_rss_mib_max": round(max(rss), 1), "resync_seconds": args.resync,
            "rest_reconciles": rest_reconciles, "tail_drain_seconds": round(drained, 1),
            "command": " ".join(sys.argv),
        }  # fmt: skip
        print(f"{args.m} LLMDeployments at rest: CPU {cpu * 100:.1f}% of a core, RSS max {max(rss):.0f} MiB")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "operator-scale.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        op.terminate()
        op.wait(20)
        kc("delete", "namespace", NS, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
