"""Check `vllm serve` command lines with vLLM's own parser (run inside hack/vllm/venv.sh's venv).

Why: toposerve renders vLLM command lines, and vLLM's flags change between versions (renamed,
removed, new choices). Only vLLM's own code can say whether a line will start; this script runs it
on a CPU-only machine, with the platform forced to CPU, without loading any model.

Input (stdin): a JSON list of argv lists, each the arguments after `vllm serve` (model first).
Output (stdout): a JSON list, one object per argv::

    {"argv": [...], "ok": bool, "stage": null | "parse" | "validate" | "engine_args" | "config",
     "error": null | "message", "values": {...parsed values of interest...}}

Stages, in the order `vllm serve` meets them:
  parse        the `vllm` top-level parser with the `serve` subcommand registered exactly as vLLM's
               CLI does (ServeSubcommand.subparser_init): unknown flags, bad types, --dtype choices;
  validate     ServeSubcommand.validate (validate_parsed_serve_args), run before serving;
  engine_args  AsyncEngineArgs.from_cli_args, the first thing the server does with the namespace;
  config       the model-independent value checks vLLM makes when it builds its configs, which
               argparse does not enforce: --kv-cache-dtype through CacheConfig's own validator,
               --quantization against vLLM's registry (QUANTIZATION_METHODS, as
               ModelConfig._verify_quantization checks it) and --distributed-executor-backend
               against the DistributedExecutorBackend literal. Checks that need the model's
               config (head counts vs TP, ...) or a GPU are out of reach here.

`--facts` prints what the installed vLLM offers instead: flags, choices, version.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
from typing import Any, get_args

# Before vLLM is imported: force the CPU platform (no GPU, no NVML probing) and keep it quiet
# and offline.
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

VALUES = (
    "model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size",
    "data_parallel_size", "data_parallel_size_local", "data_parallel_start_rank",
    "data_parallel_rank", "data_parallel_address", "data_parallel_rpc_port",
    "enable_expert_parallel", "prefill_context_parallel_size", "decode_context_parallel_size",
    "max_model_len", "gpu_memory_utilization", "dtype", "kv_cache_dtype", "quantization",
    "distributed_executor_backend", "nnodes", "node_rank", "master_addr", "master_port",
    "headless", "api_server_count", "host", "port",
)  # fmt: skip

FLAGS_OF_INTEREST = (
    "--prefill-context-parallel-size", "--decode-context-parallel-size", "--nnodes", "--node-rank",
    "--master-addr", "--master-port", "--headless", "--data-parallel-size",
    "--enable-expert-parallel", "--data-parallel-address", "--data-parallel-rpc-port",
    "--data-parallel-size-local", "--data-parallel-start-rank", "--tensor-parallel-size",
    "--pipeline-parallel-size", "--max-model-len", "--gpu-memory-utilization", "--kv-cache-dtype",
    "--quantization", "--served-model-name", "--distributed-executor-backend", "--dtype", "--port",
    "--host",
)  # fmt: skip


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The `vllm` parser with `serve` registered the way vllm.entrypoints.cli.main does it."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["serve"]
            return sub
    raise RuntimeError("no serve subcommand")


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def config_checks(args: argparse.Namespace) -> None:
    """vLLM's model-independent value checks that argparse leaves to config construction."""
    from vllm.config import CacheConfig
    from vllm.config.parallel import DistributedExecutorBackend
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    CacheConfig(cache_dtype=args.kv_cache_dtype)  # pydantic + vLLM's _validate_cache_dtype
    if args.quantization is not None and args.quantization not in QUANTIZATION_METHODS:
        # The message ModelConfig._verify_quantization raises at start-up.
        raise ValueError(
            f"Unknown quantization method: {args.quantization}. Must be one of {QUANTIZATION_METHODS}."
        )
    backend = args.distributed_executor_backend
    if backend is not None and backend not in get_args(DistributedExecutorBackend):
        raise ValueError(
            f"Unknown distributed executor backend: {backend}. "
            f"Must be one of {list(get_args(DistributedExecutorBackend))}."
        )


def check(parser: argparse.ArgumentParser, cmd: Any, argv: list[str]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    result: dict[str, Any] = {"argv": argv, "ok": False, "stage": "parse", "error": None, "values": {}}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(["serve", *argv])
    except SystemExit:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        result["error"] = lines[-1] if lines else "argparse exited"
        return result
    except Exception as e:  # FlexibleArgumentParser raises ValueError for some mistakes
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    # ServeSubcommand.cmd: the positional model wins over --model.
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    result["values"] = {k: jsonable(getattr(args, k)) for k in VALUES if hasattr(args, k)}
    for stage, step in (
        ("validate", lambda: cmd.validate(args)),
        ("engine_args", lambda: AsyncEngineArgs.from_cli_args(copy.deepcopy(args))),
        ("config", lambda: config_checks(args)),
    ):
        result["stage"] = stage
        try:
            with contextlib.redirect_stderr(err):
                step()
        except (Exception, SystemExit) as e:
            result["error"] = f"{type(e).__name__}: {e}"
            return result
    result.update(ok=True, stage=None)
    return result


def facts(parser: argparse.ArgumentParser) -> dict[str, Any]:
    from importlib.metadata import version

    from vllm.config.cache import CacheDType
    from vllm.config.parallel import DistributedExecutorBackend
    from vllm.model_executor.layers.quantization import (
        DEPRECATED_QUANTIZATION_METHODS,
        QUANTIZATION_METHODS,
    )

    serve = serve_parser(parser)
    by_flag = {s: a for a in serve._actions for s in a.option_strings}

    def argparse_choices(flag: str) -> list[str] | None:
        choices = by_flag[flag].choices
        return None if choices is None else [str(c) for c in choices]

    return {
        "vllm": version("vllm"),
        "torch": version("torch"),
        "platform": "cpu (VLLM_TARGET_DEVICE=cpu)",
        "flags": sorted(s for s in by_flag if s.startswith("--")),
        "short_flags": {s: _long(by_flag[s]) for s in sorted(by_flag) if not s.startswith("--")},
        "has": {f: f in by_flag for f in FLAGS_OF_INTEREST},
        "quantization": {
            "choices": list(QUANTIZATION_METHODS),
            "deprecated": list(DEPRECATED_QUANTIZATION_METHODS),
            "argparse_choices": argparse_choices("--quantization"),
        },
        "kv_cache_dtype": {
            "choices": list(get_args(CacheDType)),
            "argparse_choices": argparse_choices("--kv-cache-dtype"),
        },
        "dtype": {"choices": argparse_choices("--dtype"), "argparse_choices": argparse_choices("--dtype")},
        "distributed_executor_backend": {
            "choices": list(get_args(DistributedExecutorBackend)),
            "argparse_choices": argparse_choices("--distributed-executor-backend"),
        },
        "defaults": {
            a.dest: jsonable(a.default)
            for a in serve._actions
            if a.dest in VALUES and a.default is not argparse.SUPPRESS
        },
    }


def _long(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else action.option_strings[0]


def main() -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # vLLM logs to stdout; keep stdout for the JSON answer
    parser, cmd = build_parser()
    if sys.argv[1:] == ["--facts"]:
        answer: Any = facts(parser)
    elif sys.argv[1:]:
        print(f"usage: {sys.argv[0]} [--facts] < argvs.json", file=sys.stderr)
        return 2
    else:
        argvs = json.load(sys.stdin)
        if not isinstance(argvs, list) or not all(
            isinstance(a, list) and all(isinstance(s, str) for s in a) for a in argvs
        ):
            print("stdin must be a JSON list of lists of strings", file=sys.stderr)
            return 2
        answer = [check(parser, cmd, a) for a in argvs]
    json.dump(answer, out, indent=2, sort_keys=True)
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
