"""The mock engine's start-up, phase by phase, as vLLM 0.33.0 goes through it (plan pure; ``run``
sleeps and writes the caches).

What a vLLM replica does between its container starting and its first answer, and what each
phase's cache is (vLLM 0.33.0 source):

1. **Bind the port**: ``entrypoints/launchers/api_server/entry.py`` ``run_server`` calls
   ``setup_server`` (socket bound and listening) *before* ``build_async_engine_client``, and serves
   HTTP only once the engine is up. A probe during start-up connects (the kernel's backlog accepts
   it) and gets no answer until then: it times out, it is not refused.
2. **Download** the weights into the Hugging Face cache (``HF_HOME``, here ``/models/hf`` on the
   model cache: render/objects.py ``_engine_storage``), skipped when they are there already (a
   PVC or host-path cache kept from an earlier pod).
3. **Load** them onto the GPUs: ``model_executor/model_loader/default_loader.py`` logs
   ``Loading weights took %.2f seconds``, ``v1/worker/gpu_model_runner.py`` ``Model loading took %s
   GiB memory and %.6f seconds``.
4. **torch.compile**: ``compilation/backends.py`` keys a directory under
   ``VLLM_CACHE_ROOT/torch_compile_cache/<hash>`` by the configuration, the code and the compiler;
   with an entry there it logs ``Directly load the compiled graph(s) for compile range %s from the
   cache, took %.3f s``, else it compiles (``compilation/monitor.py``: ``torch.compile took %.2f s in
   total``) and stores the graphs there. ``VLLM_CACHE_ROOT`` is ``/models/vllm`` in toposerve's
   pods, so a persistent model cache keeps the compiled graphs too.
5. **CUDA graph capture**, every start (no cache): ``Graph capturing finished in %.0f secs, took
   %.2f GiB``.

The mock has no weights: a downloaded model is a marker file where huggingface_hub keeps a repo
(``HF_HOME/hub/models--ORG--NAME``), and a compiled configuration a marker in its vLLM-shaped
cache directory. Durations are inputs (the defaults of the CLI say where they come from); 0 means
the phase is not modelled, which keeps the mock's old instant start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("toposerve.mockengine.startup")

WEIGHTS_MARKER = ".toposerve-mock-weights"  # in the repo's hub directory: "the weights are here"
COMPILE_MARKER = ".toposerve-mock-compiled"


@dataclass(frozen=True)
class StartupModel:
    """How long each phase takes on this replica (seconds of modelled time, before time scaling)."""

    weights_gib: float = 0.0  # the checkpoint; 0: no download or load phase
    download_gib_per_s: float = 0.0  # from the hub or an object store; 0: not modelled
    load_gib_per_s: float = 0.0  # from the node's disk into GPU memory; 0: not modelled
    compile_s: float = 0.0  # torch.compile without a cache entry; 0: not modelled
    compile_cached_s: float = 0.0  # loading the compiled graphs from the cache
    graph_capture_s: float = 0.0  # CUDA graphs, every start

    @property
    def modelled(self) -> bool:
        return any(
            (self.download_s, self.load_s, self.compile_s, self.compile_cached_s, self.graph_capture_s)
        )

    @property
    def download_s(self) -> float:
        return self.weights_gib / self.download_gib_per_s if self.download_gib_per_s > 0 else 0.0

    @property
    def load_s(self) -> float:
        return self.weights_gib / self.load_gib_per_s if self.load_gib_per_s > 0 else 0.0


@dataclass(frozen=True)
class Phase:
    name: str  # download, load, compile, compile-cached, graphs
    seconds: float
    message: str  # the line vLLM logs when the phase ends


def plan(model: StartupModel, weights_cached: bool, compile_cached: bool) -> list[Phase]:
    """The phases of one start, in vLLM's order, with what each cache saves."""
    out: list[Phase] = []
    if model.download_s > 0 and not weights_cached:
        out.append(Phase("download", model.download_s, f"Downloaded {model.weights_gib:.2f} GiB of weights"))
    if model.load_s > 0:
        out.append(Phase("load", model.load_s, f"Loading weights took {model.load_s:.2f} seconds"))
    if compile_cached and model.compile_cached_s > 0:
        out.append(
            Phase(
                "compile-cached",
                model.compile_cached_s,
                "Directly load the compiled graph(s) for compile range (1, 8192) from the cache, "
                f"took {model.compile_cached_s:.3f} s",
            )
        )
    elif not compile_cached and model.compile_s > 0:
        out.append(Phase("compile", model.compile_s, f"torch.compile took {model.compile_s:.2f} s in total"))
    if model.graph_capture_s > 0:
        out.append(
            Phase(
                "graphs",
                model.graph_capture_s,
                f"Graph capturing finished in {model.graph_capture_s:.0f} secs",
            )
        )
    return out


def hub_dir(hf_home: Path, model: str) -> Path:
    """Where huggingface_hub keeps repo ``model`` (its cache layout: ``hub/models--ORG--NAME``)."""
    return hf_home / "hub" / ("models--" + model.replace("/", "--"))


def compile_dir(cache_root: Path, factors: str) -> Path:
    """vLLM's ``torch_compile_cache/<first 10 hex of sha256(factors)>/rank_0_0/backbone``."""
    key = hashlib.sha256(factors.encode()).hexdigest()[:10]
    return cache_root / "torch_compile_cache" / key / "rank_0_0" / "backbone"


@dataclass(frozen=True)
class Caches:
    """Where this start looks for (and leaves) the weights and the compiled graphs."""

    weights: Path  # hub_dir(...)
    compiled: Path  # compile_dir(...)

    def weights_cached(self) -> bool:
        return (self.weights / WEIGHTS_MARKER).exists()

    def compile_cached(self) -> bool:
        return (self.compiled / COMPILE_MARKER).exists()


def _leave(path: Path, marker: str) -> None:
    """Write the marker atomically (a concurrent start on a shared cache sees it whole or not)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f"{marker}.tmp"
        tmp.write_text("mock\n")
        tmp.replace(path / marker)
    except OSError as e:  # a read-only cache (e.g. a ReadOnlyMany PVC): vLLM also just goes on
        log.warning("could not write %s: %s", path / marker, e)


async def run(
    model: StartupModel,
    caches: Caches,
    time_scale: float,
    sleep: Callable[[float], object] = asyncio.sleep,
) -> list[Phase]:
    """Go through the phases (sleeping ``seconds x time_scale`` each), log vLLM's lines, leave the
    caches behind as vLLM does; returns the phases run."""
    phases = plan(model, caches.weights_cached(), caches.compile_cached())
    for ph in phases:
        waited = sleep(ph.seconds * time_scale)
        if asyncio.iscoroutine(waited):
            await waited
        log.info("%s", ph.message)
        if ph.name == "download":
            _leave(caches.weights, WEIGHTS_MARKER)
        elif ph.name == "compile":
            _leave(caches.compiled, COMPILE_MARKER)
    return phases


async def prefetch(
    model: StartupModel,
    caches: Caches,
    time_scale: float,
    sleep: Callable[[float], object] = asyncio.sleep,
) -> bool:
    """Only the download (a warm-node prefetch: the weights onto the node's cache before any
    replica needs them, as ``hf download`` does for vLLM pods); True when it downloaded."""
    only = StartupModel(weights_gib=model.weights_gib, download_gib_per_s=model.download_gib_per_s)
    return bool(await run(only, caches, time_scale, sleep))
