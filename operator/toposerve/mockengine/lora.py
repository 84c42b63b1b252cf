"""LoRA adapters as vLLM 0.33.0 keeps them: sources, GPU/CPU slots with LRU, load and swap-in time.

Pure (no aiohttp, no clock): the engine loop asks :class:`LoRASlots` how many simulated seconds
an adapter load or a batch's adapter set costs, and the HTTP shell (server.py) owns the
registry of names that ``/v1/models`` lists.

What is modelled, from vLLM 0.33.0's source (paths under ``vllm/``):

* ``lora/model_manager.py`` LRUCacheLoRAModelManager: every loaded adapter is *registered* in a
  CPU cache of ``max_cpu_loras`` entries (``capacity``; default ``max_loras``, config/lora.py
  ``_validate_lora_config``), and up to ``max_loras`` of them are also *active* in GPU slots
  (``lora_slots``); both are LRU caches. Dropping an adapter from the CPU cache also drops it
  from its GPU slot; activating one with every GPU slot taken evicts the least recently used
  active one (it stays in the CPU cache).
* ``lora/worker_manager.py`` LRUCacheWorkerLoRAManager.add_adapter: an adapter not registered
  (or loaded ``load_inplace``) is read from disk first, then the oldest registered adapter is
  evicted if the CPU cache is full, then it is registered and activated; one already registered
  is only touched and activated. The same path runs for ``POST /v1/load_lora_adapter``
  (``add_lora``) and for every engine step, for the adapters of the scheduled requests
  (``_apply_adapters``), so an adapter evicted from the CPU cache is read from disk again by the
  step that needs it, and that step lasts longer.
* ``lora/utils.py`` get_adapter_absolute_path and ``lora/peft_helper.py`` PEFTHelper: what a
  source must hold (``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules``) and
  the errors when it does not.

The mock cannot download from the Hugging Face hub. A ``lora_path`` that is not a local path is
looked up as ``<hub_dir>/<repo id>`` when ``--lora-hub-dir`` is set (a directory standing in for
the hub); without it, or when that directory has no such repo, the load fails as vLLM's does when
the download fails (vLLM returns the path unchanged, then finds no ``adapter_config.json``):
``LoRAAdapterNotFoundError``, a 404.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

# vLLM 0.33.0 config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# PEFTHelper's fields without defaults (lora/peft_helper.py): the keys adapter_config.json needs.
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
REFERENCE_RANK = 16  # the rank the default load/swap times are for


@dataclass(frozen=True)
class LoRAModule:
    """One ``--lora-modules`` entry (vLLM's LoRAModulePath, entrypoints/openai/models/protocol.py)."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(item: str) -> LoRAModule:
    """``name=path`` (no comma) or a JSON object, as vLLM 0.33.0's LoRAParserAction
    (entrypoints/common/cli_args.py) reads each ``--lora-modules`` value."""
    if "=" in item and "," not in item:
        name, path = item.split("=", 1)
        return LoRAModule(name, path)
    try:
        data = json.loads(item)
    except ValueError:
        raise ValueError(f"Invalid JSON format for --lora-modules: {item}") from None
    if not isinstance(data, dict):
        raise ValueError(f"Invalid fields for --lora-modules: {item} - not a JSON object")
    allowed = {"name", "path", "base_model_name", "is_3d_lora_weight"}
    extra = set(data) - allowed
    missing = {"name", "path"} - set(data)
    if extra or missing:
        raise ValueError(
            f"Invalid fields for --lora-modules: {item} - unexpected {sorted(extra)}, missing {sorted(missing)}"
        )
    return LoRAModule(str(data["name"]), str(data["path"]), data.get("base_model_name"))


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRA flags plus the mock's timing and hub stand-in."""

    enabled: bool = False  # --enable-lora
    max_loras: int = 1  # --max-loras: distinct adapters in one batch = GPU slots
    max_lora_rank: int = 16  # --max-lora-rank
    max_cpu_loras: int | None = None  # --max-cpu-loras (None or <= 0: max_loras, as vLLM)
    modules: tuple[LoRAModule, ...] = ()  # --lora-modules: loaded at startup
    load_s: float = 0.3  # mock: read a rank-16 adapter from disk into a CPU slot
    swap_s: float = 0.003  # mock: copy a rank-16 adapter from its CPU slot into a GPU slot
    hub_dir: str | None = None  # mock: stands in for the Hugging Face hub

    @property
    def cpu_slots(self) -> int:
        # engine/arg_utils.py passes max_cpu_loras only when > 0; LoRAConfig then defaults it
        return self.max_cpu_loras if self.max_cpu_loras and self.max_cpu_loras > 0 else self.max_loras

    def validate(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {list(MAX_LORA_RANKS)}, got {self.max_lora_rank}")
        if self.cpu_slots < self.max_loras:  # config/lora.py _validate_lora_config
            raise ValueError(f"max_cpu_loras ({self.cpu_slots}) must be >= max_loras ({self.max_loras}).")


class AdapterLoadError(Exception):
    """Loading an adapter failed in the engine; ``not_found`` is vLLM's LoRAAdapterNotFoundError
    (a FileNotFoundError while reading the source, lora/worker_manager.py _load_adapter)."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.not_found = not_found


def resolve_source(lora_path: str, hub_dir: str | None) -> str:
    """Where the adapter's files are, as lora/utils.py get_adapter_absolute_path decides: an
    absolute path as is (existing or not), ``~`` expanded, an existing relative path made
    absolute, anything else a hub repo id (here: ``<hub_dir>/<id>``; without a hub the id is
    returned unchanged, as vLLM does when the download fails)."""
    if os.path.isabs(lora_path):
        return lora_path
    if lora_path.startswith("~"):
        return os.path.expanduser(lora_path)
    if os.path.exists(lora_path):
        return os.path.abspath(lora_path)
    if hub_dir:
        snapshot = os.path.join(hub_dir, lora_path)
        if os.path.isdir(snapshot) and ".." not in lora_path.split("/"):
            return snapshot
    return lora_path


def read_adapter(lora_name: str, lora_path: str, hub_dir: str | None, max_lora_rank: int) -> int:
    """Validate an adapter's source as vLLM's loader does and return its rank.

    Raises AdapterLoadError with vLLM's messages: not found (no ``adapter_config.json``: vLLM opens
    it first, PEFTHelper.from_local_dir), missing fields / bad rank (PEFTHelper.from_dict and
    __post_init__), unsupported features and rank above ``--max-lora-rank``
    (PEFTHelper.validate_legal), and no weights file (LoRAModel.from_local_checkpoint)."""
    path = resolve_source(lora_path, hub_dir)
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        # exceptions.py LoRAAdapterNotFoundError's text; NotADirectoryError: a file given as path
        raise AdapterLoadError(
            f"Loading lora {lora_name} failed: No adapter found for {lora_path}", not_found=True
        ) from None
    except ValueError as e:  # JSONDecodeError / bad UTF-8: re-raised as is by _load_adapter
        raise AdapterLoadError(str(e)) from None
    except OSError as e:
        raise AdapterLoadError(str(e)) from None
    if not isinstance(config, dict):
        raise AdapterLoadError("'list' object has no attribute 'keys'")
    missing = set(REQUIRED_FIELDS) - set(config)
    if missing:
        raise AdapterLoadError(f"Missing required configuration fields: {missing}")
    r = config["r"]
    if not isinstance(r, int) or isinstance(r, bool):
        raise AdapterLoadError(f"'<=' not supported between instances of '{type(r).__name__}' and 'int'")
    if r <= 0:
        raise AdapterLoadError(f"LoRA rank `r` must be a positive integer, got {r}.")
    errors: list[str] = []
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        errors.append("vLLM does not support LoRA bias (lora_bias).")
    pattern = config.get("rank_pattern") or {}
    ranks = [v for v in pattern.values() if isinstance(v, int)] if isinstance(pattern, dict) else []
    rank = max([r, *ranks])
    if rank > max_lora_rank:
        errors.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if errors:
        raise AdapterLoadError(" ".join(errors))
    if not any(
        os.path.isfile(os.path.join(path, n))
        for n in ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
    ):
        raise AdapterLoadError(f"{path} doesn't contain tensors")
    return rank


@dataclass
class Adapter:
    """One adapter as the engine knows it (vLLM's LoRARequest): keyed by ``int_id``."""

    int_id: int
    name: str
    path: str
    rank: int = REFERENCE_RANK

    @property
    def hash_extra(self) -> tuple[tuple[str, str, str], ...]:
        """Block-hash extra keys of its requests (v1/core/kv_cache_utils.py
        _gen_lora_extra_hash_keys): KV computed with an adapter is cached apart from the base's."""
        return (("lora", self.name, self.path),)


@dataclass
class SwapStats:
    loads: int = 0  # reads from disk into a CPU slot
    swap_ins: int = 0  # copies from a CPU slot into a GPU slot
    cpu_evictions: int = 0
    gpu_evictions: int = 0


@dataclass
class LoRASlots:
    """The GPU slots and the CPU cache, both LRU (oldest first), with the simulated cost of
    every change. Mirrors LRUCacheLoRAModelManager + LRUCacheWorkerLoRAManager (module doc)."""

    max_loras: int
    max_cpu_loras: int
    load_s: float = 0.3
    swap_s: float = 0.003
    cpu: OrderedDict[int, Adapter] = field(default_factory=OrderedDict)  # registered
    gpu: OrderedDict[int, Adapter] = field(default_factory=OrderedDict)  # active, subset of cpu
    stats: SwapStats = field(default_factory=SwapStats)

    def __post_init__(self) -> None:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}).")

    def load_time(self, a: Adapter) -> float:
        return self.load_s * a.rank / REFERENCE_RANK

    def swap_time(self, a: Adapter) -> float:
        return self.swap_s * a.rank / REFERENCE_RANK

    def add(self, a: Adapter, load_inplace: bool = False) -> float:
        """worker_manager.py add_adapter: register (reading from disk if new or in place), then
        activate. Returns the simulated seconds it took."""
        t = 0.0
        if a.int_id not in self.cpu or load_inplace:
            t += self.load_time(a)
            self.stats.loads += 1
            self._drop(a.int_id)  # in place: the old copy goes first
            if len(self.cpu) + 1 > self.max_cpu_loras:
                oldest = next(iter(self.cpu))
                self._drop(oldest)
                self.stats.cpu_evictions += 1
            self.cpu[a.int_id] = a
        else:
            self.cpu.move_to_end(a.int_id)  # touch
        return t + self._activate(a.int_id)

    def prepare_batch(self, adapters: list[Adapter]) -> float:
        """``_apply_adapters`` for one step's scheduled requests; the scheduler never asks for
        more distinct adapters than GPU slots (v1/core/sched/scheduler.py's max_loras check)."""
        distinct = {a.int_id: a for a in adapters}
        if len(distinct) > self.max_loras:
            raise RuntimeError(
                f"Number of requested LoRAs ({len(distinct)}) is greater than the number of GPU LoRA "
                f"slots ({self.max_loras})."
            )
        return sum(self.add(a) for a in distinct.values())

    def _activate(self, int_id: int) -> float:
        """model_manager.py LRUCacheLoRAModelManager.activate_adapter."""
        if int_id in self.gpu:
            self.gpu.move_to_end(int_id)
            return 0.0
        if len(self.gpu) >= self.max_loras:
            self.gpu.popitem(last=False)
            self.stats.gpu_evictions += 1
        a = self.cpu[int_id]
        self.gpu[int_id] = a
        self.stats.swap_ins += 1
        return self.swap_time(a)

    def _drop(self, int_id: int) -> None:
        self.cpu.pop(int_id, None)
        self.gpu.pop(int_id, None)

    def state(self) -> dict[str, object]:
        def names(d: OrderedDict[int, Adapter]) -> list[dict[str, object]]:
            return [{"id": a.int_id, "name": a.name} for a in d.values()]

        return {
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
            "gpu": names(self.gpu),  # least recently used first
            "cpu": names(self.cpu),  # every registered adapter (GPU ones too), LRU first
            "cpu_only": [{"id": a.int_id, "name": a.name} for i, a in self.cpu.items() if i not in self.gpu],
            "loads": self.stats.loads,
            "swap_ins": self.stats.swap_ins,
            "cpu_evictions": self.stats.cpu_evictions,
            "gpu_evictions": self.stats.gpu_evictions,
        }
