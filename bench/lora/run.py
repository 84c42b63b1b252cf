"""LoRA placement benchmark (issue 26): 100 adapters on 4 replicas of one base model.

Every (seed, policy) cell starts 4 fresh mock engines (vLLM 0.33 model, `--enable-lora
--max-loras 8 --max-cpu-loras 8 --lora-load-seconds 0.3 --time-scale 1`, runtime loading on), so
each policy starts cold, and replays the same deterministic multi-turn chat workload:
conversations pick an adapter by Zipf popularity over the adapter table, 3-4 turns with the history
appended, closed loop. Halfway (when conversation C/2 starts) the table changes: 10 adapters at
popularity ranks 10-19 are removed and 10 new ones take their ranks.

Policies (same engines, same request list):

* `toposerve`: the gateway (bench/lora/gateway_host.py = `toposerve gateway --static-config`,
  plus SIGHUP to re-read the file: the table change above), `--strategy auto`, its own adapter
  placement (docs/router.md, "LoRA adapters").
* `round-robin`: adapter-unaware; the client sends each request to the next engine in turn and,
  if that engine does not have the adapter registered, loads it there first through
  /v1/load_lora_adapter, unloading the engine's least recently used adapter (never one with a
  request in flight) when it already holds max-cpu-loras: an adapter-unaware balancer in front of
  vLLM with on-demand loading. Implemented here (`OnDemand`).
* `gie-lora`: the Gateway API Inference Extension's scheduling with its `lora-affinity-scorer`
  (pkg/epp/scheduling/framework/plugins/loraaffinityscorer/lora_affinity.go: 1.0 if the adapter is
  in the pod's running/waiting set from vllm:lora_requests_info, 0.8 if running+waiting < max_lora,
  0.6 if only waiting, else 0) plus `queue-scorer` (min-max normalised vllm:num_requests_waiting),
  weights 1:1, max-score picker with random ties; each engine's /metrics scraped every 100 ms.
  GIE expects every adapter registered on every pod (its dynamic-lora-sidecar); with 100 adapters
  and max-cpu-loras 8 that is impossible, so the chosen pod loads on demand (`OnDemand`, as for
  round-robin).

Measured per cell: requests ok/failed (failures split into adapters that stay and removed adapters
after their removal: 404 is the expected answer there), TTFT and end-to-end p50/p99, first-turn
TTFT p95, adapter loads the engines actually did (their /admin/state counters: a load = a request
not served by a holder, or a spread), fraction served by a holder = 1 - loads / ok requests (a lower
bound), the load latency p50/p95 (gateway: its toposerve_router_lora_load_seconds histogram;
baselines: the load call as the client timed it) and the TTFT of requests that waited for a cold
load (baselines: known per request).

    PYTHONPATH=operator .venv/bin/python bench/lora/run.py --seeds 1,2 --out bench/lora/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SLOTS = 8
LOAD_S = 0.3
N_ADAPTERS = 100
CHURN_RANKS = range(10, 20)
WORDS = [
    "the",
    "model",
    "token",
    "cache",
    "batch",
    "kernel",
    "tensor",
    "memory",
    "latency",
    "request",
    "stream",
    "router",
    "adapter",
    "rank",
]


# ------------------------------------------------------------------------------------ workload


@dataclass
class Conversation:
    adapter: str
    turns: list[tuple[str, int]]  # (user text, max_tokens)
    phase: int


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def make_workload(seed: int, n_conv: int, s: float) -> tuple[list[Conversation], list[str], list[str]]:
    """Conversations, the adapters removed at the change, the adapters added."""
    rng = random.Random(seed)
    table_a = [f"a{i:03d}" for i in range(N_ADAPTERS)]
    rng.shuffle(table_a)  # popularity rank -> adapter, seeded
    added = [f"a{N_ADAPTERS + i:03d}" for i in range(len(CHURN_RANKS))]
    table_b = list(table_a)
    removed = [table_a[r] for r in CHURN_RANKS]
    for r, name in zip(CHURN_RANKS, added, strict=True):
        table_b[r] = name
    w = zipf_weights(N_ADAPTERS, s)
    convs: list[Conversation] = []
    for c in range(n_conv):
        phase = 0 if c < n_conv // 2 else 1
        adapter = rng.choices(table_a if phase == 0 else table_b, weights=w)[0]
        turns = [
            (" ".join(rng.choice(WORDS) for _ in range(rng.randint(180, 220))), rng.randint(16, 32))
            for _ in range(rng.choice((3, 4)))
        ]
        convs.append(Conversation(adapter, turns, phase))
    return convs, removed, added


# ------------------------------------------------------------------------------------ processes


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
        )
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.items:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.items:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.items.clear()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "operator")
    e["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return e


def make_hub(d: Path, n: int) -> None:
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    for i in range(n):
        a = d / "org" / f"a{i:03d}"
        a.mkdir(parents=True, exist_ok=True)
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        (a / "adapter_model.safetensors").write_bytes(b"")


def engine_argv(port: int, hub: Path, seed: int) -> list[str]:
    return [
        PY, "-m", "toposerve.cli", "mock-engine", "--host", HOST, "--port", str(port), "--model", "base",
        "--enable-lora", "--max-loras", str(SLOTS), "--max-cpu-loras", str(SLOTS), "--lora-hub-dir", str(hub),
        "--lora-load-seconds", str(LOAD_S), "--time-scale", "1", "--enable-admin", "--seed", str(seed),
    ]  # fmt: skip


def gateway_config(path: Path, adapters: list[str], engines: list[str]) -> None:
    dep = {
        "apiVersion": "toposerve.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "base", "namespace": "bench", "creationTimestamp": "2026-12-07T00:00:00Z"},
        "spec": {
            "model": {"name": "base"},
            "lora": {"maxLoras": SLOTS, "maxCpuLoras": SLOTS},
            "adapters": [{"name": a, "source": f"org/{a}"} for a in adapters],
            "routing": {"mode": "gateway"},
        },
    }
    path.write_text(yaml.safe_dump({"deployments": [dep], "backends": {"bench/base": engines}}))


async def wait_ready(s: aiohttp.ClientSession, url: str, tries: int = 200) -> None:
    for _ in range(tries):
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


# ------------------------------------------------------------------------------------ pickers


class OnDemand:
    """Loads an adapter on the chosen engine if it is not registered there: an adapter-unaware
    balancer's (or GIE's, beyond its sidecar) on-demand loading. LRU per engine by this client's
    use; never unloads an adapter with a request in flight there."""

    def __init__(self, s: aiohttp.ClientSession, engines: list[str]) -> None:
        self.s = s
        self.reg: dict[str, OrderedDict[str, bool]] = {e: OrderedDict() for e in engines}  # name -> loaded
        self.pins: dict[str, Counter[str]] = {e: Counter() for e in engines}
        self.elock: dict[str, asyncio.Lock] = {e: asyncio.Lock() for e in engines}
        self.alock: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.load_s: list[float] = []
        self.unloads = 0
        self.removed: set[str] = set()

    async def ensure(self, e: str, a: str) -> bool:
        """Pin `a` on `e` (call unpin when the request ends); True when it had to be loaded."""
        self.pins[e][a] += 1
        async with self.alock[(e, a)]:
            if self.reg[e].get(a):
                self.reg[e].move_to_end(a)
                return False
            victim = None
            while True:
                async with self.elock[e]:
                    if len(self.reg[e]) < SLOTS:
                        self.reg[e][a] = False
                        break
                    free = [x for x, ok in self.reg[e].items() if ok and self.pins[e][x] == 0]
                    if free:
                        victim = free[0]
                        del self.reg[e][victim]
                        self.reg[e][a] = False
                        break
                await asyncio.sleep(0.01)
            if victim is not None:
                await self._unload(e, victim)
            t0 = time.perf_counter()
            async with self.s.post(
                f"{e}/v1/load_lora_adapter", json={"lora_name": a, "lora_path": f"org/{a}"}
            ) as r:
                body = await r.text()
                if r.status != 200 and "already been loaded" not in body:
                    del self.reg[e][a]
                    raise RuntimeError(f"load {a} on {e}: {r.status} {body[:200]}")
            self.load_s.append(time.perf_counter() - t0)
            self.reg[e][a] = True
            return True

    def unpin(self, e: str, a: str) -> None:
        self.pins[e][a] -= 1

    async def _unload(self, e: str, a: str) -> None:
        self.unloads += 1
        async with self.s.post(f"{e}/v1/unload_lora_adapter", json={"lora_name": a}) as r:
            await r.read()

    async def remove(self, names: list[str]) -> None:
        """The table change: unload removed adapters everywhere (vLLM lets running requests end)."""
        self.removed.update(names)
        for e, reg in self.reg.items():
            for a in [x for x in names if reg.get(x)]:
                async with self.alock[(e, a)]:
                    reg.pop(a, None)
                    await self._unload(e, a)


class RoundRobin:
    def __init__(self, engines: list[str]) -> None:
        self.engines = engines
        self.i = 0

    def pick(self, adapter: str) -> str:
        e = self.engines[self.i % len(self.engines)]
        self.i += 1
        return e


LORA_INFO = re.compile(r"^vllm:lora_requests_info\{([^}]*)\}\s+(\S+)", re.M)
WAITING = re.compile(r"^vllm:num_requests_waiting\{[^}]*\}\s+(\S+)", re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')


class GieLora:
    """GIE's lora-affinity-scorer + queue-scorer (weights 1:1), max-score picker (random ties), fed
    by a /metrics scrape of every engine each 100 ms."""

    def __init__(self, s: aiohttp.ClientSession, engines: list[str], rng: random.Random) -> None:
        self.s = s
        self.engines = engines
        self.rng = rng
        self.m: dict[str, dict[str, Any]] = {
            e: {"active": set(), "waiting": set(), "max": SLOTS, "queue": 0} for e in engines
        }
        self.task: asyncio.Task[None] | None = None

    async def scrape(self) -> None:
        while True:
            for e in self.engines:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    async with self.s.get(f"{e}/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        text = await r.text()
                    best: tuple[float, dict[str, str]] | None = None
                    for labels, value in LORA_INFO.findall(text):
                        v = float(value)
                        if best is None or v > best[0]:
                            best = (v, dict(LABEL.findall(labels)))
                    m = self.m[e]
                    if best is not None:
                        lab = best[1]
                        m["active"] = {x for x in lab.get("running_lora_adapters", "").split(",") if x}
                        m["waiting"] = {x for x in lab.get("waiting_lora_adapters", "").split(",") if x}
                        m["max"] = int(lab.get("max_lora", SLOTS))
                    w = WAITING.findall(text)
                    m["queue"] = int(float(w[0])) if w else 0
            await asyncio.sleep(0.1)

    def pick(self, adapter: str) -> str:
        qs = [self.m[e]["queue"] for e in self.engines]
        lo, hi = min(qs), max(qs)
        scores: dict[str, float] = {}
        for e in self.engines:
            m = self.m[e]
            if adapter in m["active"]:
                lora = 1.0
            elif len(m["active"]) + len(m["waiting"]) < m["max"]:
                lora = 0.8
            elif adapter in m["waiting"]:
                lora = 0.6
            else:
                lora = 0.0
            queue = 1.0 if hi == lo else (hi - m["queue"]) / (hi - lo)
            scores[e] = lora + queue
        top = max(scores.values())
        return self.rng.choice([e for e in self.engines if scores[e] == top])


# ------------------------------------------------------------------------------------ clients


@dataclass
class Result:
    adapter: str
    turn: int
    phase_at_send: int
    ok: bool
    status: int
    ttft: float
    e2e: float
    cold: bool | None  # baselines: the request waited for a load; gateway: unknown
    removed: bool  # its adapter had been removed when it was sent


@dataclass
class Cell:
    results: list[Result] = field(default_factory=list)
    phase: int = 0


async def one(
    s: aiohttp.ClientSession, url: str, adapter: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[int, float, float, str]:
    body = {
        "model": adapter, "messages": messages, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft = -1.0
    text: list[str] = []
    async with s.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return r.status, -1.0, time.perf_counter() - t0, ""
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ev = json.loads(line[6:])
            for ch in ev.get("choices") or ():
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if ttft < 0:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
    return 200, ttft, time.perf_counter() - t0, "".join(text)


async def drive(
    s: aiohttp.ClientSession,
    convs: list[Conversation],
    workers: int,
    send: Any,
    on_change: Any,
    removed: set[str],
    cell: Cell,
    deadline: float,
) -> None:
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    change_lock = asyncio.Lock()

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                c = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if c.phase == 1 and cell.phase == 0:
                async with change_lock:
                    if cell.phase == 0:
                        cell.phase = 1  # before the change: a request sent from now on may meet it
                        await on_change()
            msgs: list[dict[str, str]] = []
            for i, (user, mt) in enumerate(c.turns):
                msgs.append({"role": "user", "content": user})
                phase = cell.phase
                gone = phase == 1 and c.adapter in removed
                try:
                    status, ttft, e2e, out, cold = await send(c.adapter, msgs, mt)
                except (TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
                    print(f"  request error {c.adapter}: {exc!r}", flush=True)
                    status, ttft, e2e, out, cold = 599, -1.0, 0.0, "", None
                ok = status == 200 and ttft >= 0
                cell.results.append(Result(c.adapter, i, phase, ok, status, ttft, e2e, cold, gone))
                if not ok:
                    break  # the conversation ends on an error
                msgs.append({"role": "assistant", "content": out})

    await asyncio.gather(*(worker() for _ in range(workers)))


# ------------------------------------------------------------------------------------ a cell


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def hist_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus histogram_quantile over cumulative (le, count) buckets."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return buckets[-1][0]


def parse_router_metrics(text: str) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    buckets: Counter[float] = Counter()
    loads: Counter[str] = Counter()
    unloads: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(LABEL.findall(m.group(2))), float(m.group(3))
        if name == "toposerve_router_lora_requests_total":
            outcomes[labels.get("outcome", "")] += value
        elif name == "toposerve_router_lora_load_seconds_bucket":
            buckets[float(labels["le"])] += value
        elif name == "toposerve_router_lora_loads_total":
            loads[labels.get("reason", "")] += value
        elif name == "toposerve_router_lora_unloads_total":
            unloads[labels.get("reason", "")] += value
    b = list(buckets.items())
    return {
        "outcomes": dict(outcomes),
        "loads": dict(loads),
        "unloads": dict(unloads),
        "load_p50_s": hist_quantile(b, 0.5),
        "load_p95_s": hist_quantile(b, 0.95),
    }


async def run_cell(args: argparse.Namespace, policy: str, seed: int, hub: Path, tmp: Path) -> dict[str, Any]:
    convs, removed, added = make_workload(seed, args.conversations, args.zipf)
    ports = [args.port + i for i in range(4)]
    engines = [f"http://{HOST}:{p}" for p in ports]
    procs = Procs(tmp)
    cell = Cell()
    removed_set = set(removed)
    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=0)
    try:
        for i, p in enumerate(ports):
            procs.start(f"{policy}-{seed}-engine{i}", engine_argv(p, hub, seed), env())
        async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
            for e in engines:
                await wait_ready(s, f"{e}/health")
            router_metrics: dict[str, Any] = {}
            picker_info: dict[str, Any] = {}
            if policy == "toposerve":
                gw = f"http://{HOST}:{args.port + 10}"
                cfgfile = tmp / f"gateway-{seed}.yaml"
                table_a = [f"a{i:03d}" for i in range(N_ADAPTERS)]
                gateway_config(cfgfile, table_a, engines)
                gp = procs.start(
                    f"{policy}-{seed}-gateway",
                    [PY, str(ROOT / "bench/lora/gateway_host.py"), "--static-config", str(cfgfile), "--host", HOST,
                     "--port", str(args.port + 10), "--strategy", "auto", "--adapter-slots", str(SLOTS),
                     "--expose-backend", "--log-level", "warning"],
                    env(),
                )  # fmt: skip
                await wait_ready(s, f"{gw}/health")
                for _ in range(100):  # the member router has probed the engines
                    async with s.get(f"{gw}/v1/models") as r:
                        if r.status == 200 and len((await r.json()).get("data", [])) > N_ADAPTERS:
                            break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)

                async def send(
                    a: str, msgs: list[dict[str, str]], mt: int
                ) -> tuple[int, float, float, str, bool | None]:
                    st, ttft, e2e, out = await one(s, gw, a, msgs, mt)
                    return st, ttft, e2e, out, None

                async def change() -> None:
                    gateway_config(cfgfile, [x for x in table_a if x not in removed_set] + added, engines)
                    os.kill(gp.pid, signal.SIGHUP)
                    await asyncio.sleep(0.05)
                    print(f"  table change: -{len(removed)} +{len(added)} adapters", flush=True)

            else:
                od = OnDemand(s, engines)
                rng = random.Random(seed)
                picker: RoundRobin | GieLora = (
                    RoundRobin(engines) if policy == "round-robin" else GieLora(s, engines, rng)
                )
                if isinstance(picker, GieLora):
                    picker.task = asyncio.create_task(picker.scrape())
                    await asyncio.sleep(0.3)

                async def send(
                    a: str, msgs: list[dict[str, str]], mt: int
                ) -> tuple[int, float, float, str, bool | None]:
                    if a in od.removed:
                        return 404, -1.0, 0.0, "", None  # the balancer's table no longer has it
                    e = picker.pick(a)
                    t0 = time.perf_counter()
                    try:
                        cold = await od.ensure(e, a)
                        st, ttft, e2e, out = await one(s, e, a, msgs, mt)
                    finally:
                        od.unpin(e, a)
                    extra = time.perf_counter() - t0 - e2e  # the load, before the request
                    return st, (ttft + extra if ttft >= 0 else ttft), e2e + extra, out, cold

                async def change() -> None:
                    await od.remove(removed)
                    print(f"  table change: -{len(removed)} +{len(added)} adapters", flush=True)

            t0 = time.monotonic()
            await drive(s, convs, args.workers, send, change, removed_set, cell, t0 + args.max_seconds)
            wall = time.monotonic() - t0
            if policy == "toposerve":
                async with s.get(f"{gw}/metrics") as r:
                    router_metrics = parse_router_metrics(await r.text())
            else:
                if isinstance(picker, GieLora) and picker.task is not None:
                    picker.task.cancel()
                picker_info = {
                    "load_p50_s": pct(od.load_s, 50),
                    "load_p95_s": pct(od.load_s, 95),
                    "loads_by_client": len(od.load_s),
                    "unloads_by_client": od.unloads,
                }
            eng_state = []
            for e in engines:
                async with s.get(f"{e}/admin/state") as r:
                    st = await r.json()
                lo = st.get("lora", {})
                eng_state.append({k: lo.get(k) for k in ("loads", "swap_ins", "cpu_evictions", "gpu_evictions")}
                                 | {"served": [x["name"] for x in lo.get("served", [])]})  # fmt: skip
    finally:
        procs.stop_all()
    return summarise(policy, seed, cell.results, wall, eng_state, router_metrics, picker_info, removed, added)


def summarise(
    policy: str,
    seed: int,
    rs: list[Result],
    wall: float,
    eng: list[dict[str, Any]],
    router: dict[str, Any],
    picker: dict[str, Any],
    removed: list[str],
    added: list[str],
) -> dict[str, Any]:
    ok = [r for r in rs if r.ok]
    stay_fail = [r for r in rs if not r.ok and not r.removed]
    removed_fail = [r for r in rs if not r.ok and r.removed]
    loads = sum(e["loads"] or 0 for e in eng)
    cold = [r.ttft for r in ok if r.cold]
    warm = [r.ttft for r in ok if r.cold is False]
    first = [r.ttft for r in ok if r.turn == 0]
    later = [r.ttft for r in ok if r.turn > 0]
    load_p50 = router.get("load_p50_s", picker.get("load_p50_s"))
    load_p95 = router.get("load_p95_s", picker.get("load_p95_s"))
    out = {
        "policy": policy,
        "seed": seed,
        "wall_s": round(wall, 1),
        "requests": len(rs),
        "ok": len(ok),
        "failed_staying": len(stay_fail),
        "failed_staying_status": dict(Counter(r.status for r in stay_fail)),
        "removed_answers": dict(Counter(r.status for r in rs if r.removed)),
        "removed_failed": len(removed_fail),
        "failed_detail": [[r.adapter, r.status, r.turn, r.phase_at_send, r.removed] for r in rs if not r.ok],
        "engine_loads": loads,
        "served_by_holder": round(1 - loads / max(len(ok), 1), 4),
        "load_p50_s": load_p50,
        "load_p95_s": load_p95,
        "ttft_p50_s": pct([r.ttft for r in ok], 50),
        "ttft_p99_s": pct([r.ttft for r in ok], 99),
        "ttft_first_turn_p95_s": pct(first, 95),
        "ttft_later_turns_p95_s": pct(later, 95),
        "ttft_cold_p50_s": pct(cold, 50) if cold else None,
        "ttft_cold_p95_s": pct(cold, 95) if cold else None,
        "ttft_warm_p50_s": pct(warm, 50) if warm else None,
        "e2e_p50_s": pct([r.e2e for r in ok], 50),
        "e2e_p99_s": pct([r.e2e for r in ok], 99),
        "router": router,
        "client_loader": picker,
        "engines": eng,
        "removed": removed,
        "added": added,
        "removed_still_served": sorted({a for e in eng for a in e["served"] if a in removed}),
    }
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    hub = tmp / "hub"
    make_hub(hub, N_ADAPTERS + len(CHURN_RANKS))
    cells = []
    policies = args.policies.split(",")
    for seed in [int(x) for x in args.seeds.split(",")]:
        for k in range(len(policies)):
            policy = policies[(k + seed) % len(policies)]  # order rotated per seed
            print(f"seed {seed} policy {policy}", flush=True)
            res = await run_cell(args, policy, seed, hub, tmp)
            print(
                "  " + json.dumps({k: v for k, v in res.items() if k not in ("engines", "removed", "added")}),
                flush=True,
            )
            cells.append(res)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "cells": cells}, indent=1))
    print(f"logs in {tmp}", flush=True)
    return {"args": vars(args), "cells": cells}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--policies", default="toposerve,round-robin,gie-lora")
    p.add_argument("--conversations", type=int, default=240)
    p.add_argument("--workers", type=int, default=20)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--port", type=int, default=18300)
    p.add_argument(
        "--max-seconds", type=float, default=150.0, help="per cell: stop starting conversations after"
    )
    p.add_argument("--out", default=str(ROOT / "bench/lora/results"))
    args = p.parse_args()
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
