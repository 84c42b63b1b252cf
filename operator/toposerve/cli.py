"""The `toposerve` command line.

Each subcommand lives in its own module and is imported lazily, so `toposerve plan` never pays
for kopf or aiohttp and a broken optional part cannot break the offline tools.
Bad input exits with status 2 and one line naming the field, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from toposerve import __version__
from toposerve.api.errors import SpecError


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def _cmd_plan(args: argparse.Namespace) -> int:
    from toposerve.commands import plan

    return plan.run(args)


def _cmd_render(args: argparse.Namespace) -> int:
    from toposerve.commands import render

    return render.run(args)


def _cmd_crd(args: argparse.Namespace) -> int:
    from toposerve.api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cmd_mock_engine(args: argparse.Namespace) -> int:
    from toposerve.mockengine import cli as mock_cli

    return mock_cli.run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from toposerve.commands import run

    return run.run(args)


def _cmd_router(args: argparse.Namespace) -> int:
    from toposerve.router import cli as router_cli

    return router_cli.run(args)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from toposerve.router import gateway_cli

    return gateway_cli.run(args)


def _cmd_adapter_stage(args: argparse.Namespace) -> int:
    from toposerve.adapterstage import cli as stage_cli

    return stage_cli.run(args)


def _cmd_cost(args: argparse.Namespace) -> int:
    from toposerve.commands import cost

    return cost.run(args)


def _cmd_health_agent(args: argparse.Namespace) -> int:
    from toposerve.health import agent

    return agent.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toposerve", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"toposerve {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sp = sub.add_parser("plan", help="plan parallelism and placement for LLMDeployments in a file")
    sp.add_argument("-f", "--filename", required=True, help="YAML file with LLMDeployment(s); - for stdin")
    sp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sp.add_argument("--config", help="operator config YAML (GPU catalog extensions, prices, defaults)")
    sp.add_argument(
        "--inventory", help="node inventory YAML/JSON (kubectl get nodes -o yaml) to plan against"
    )
    sp.set_defaults(func=_cmd_plan)

    sr = sub.add_parser(
        "render", help="render the Kubernetes objects for LLMDeployments (like helm template)"
    )
    sr.add_argument("-f", "--filename", required=True, help="YAML file with LLMDeployment(s); - for stdin")
    sr.add_argument("--config", help="operator config YAML")
    sr.add_argument(
        "--inventory",
        help="node inventory YAML/JSON to plan against; multi-node replicas then ask for the fabric it offers",
    )
    sr.add_argument("--namespace", default=None, help="namespace for objects without one (default: default)")
    sr.add_argument(
        "--kubernetes-version",
        metavar="X.Y",
        help="refuse, naming the field, what an API server of this version would not serve (e.g. 1.33)",
    )
    sr.set_defaults(func=_cmd_render)

    sc = sub.add_parser("crd", help="print the LLMDeployment CustomResourceDefinition (generated)")
    sc.set_defaults(func=_cmd_crd)

    sr2 = sub.add_parser("run", help="run the operator (kopf) against the current cluster")
    from toposerve.commands import run as run_cmd

    run_cmd.add_arguments(sr2)
    sr2.set_defaults(func=_cmd_run)

    sm = sub.add_parser("mock-engine", help="run the CPU mock of the vLLM OpenAI server")
    from toposerve.mockengine import cli as mock_cli

    mock_cli.add_arguments(sm)
    sm.set_defaults(func=_cmd_mock_engine)

    so = sub.add_parser("router", help="run the token/prefix/session/GPU-aware OpenAI-compatible router")
    from toposerve.router import cli as router_cli

    router_cli.add_arguments(so)
    so.set_defaults(func=_cmd_router)

    sg = sub.add_parser("gateway", help="run the router's gateway mode: one endpoint for every LLMDeployment")
    from toposerve.router import gateway_cli

    gateway_cli.add_arguments(sg)
    sg.set_defaults(func=_cmd_gateway)

    sa = sub.add_parser(
        "adapter-stage", help="stage LoRA adapters (https, s3, hf@revision) on an engine pod's cache"
    )
    from toposerve.adapterstage import cli as stage_cli

    stage_cli.add_arguments(sa)
    sa.set_defaults(func=_cmd_adapter_stage)

    sk = sub.add_parser("cost", help="cost per hour and per million output tokens of LLMDeployments (live)")
    from toposerve.commands import cost as cost_cmd

    cost_cmd.add_arguments(sk)
    sk.set_defaults(func=_cmd_cost)

    sh = sub.add_parser(
        "health-agent", help="GPU health agent (NVML): metrics, Node condition GPUHealthy, taint"
    )
    from toposerve.health import agent as health_agent

    health_agent.add_arguments(sh)
    sh.set_defaults(func=_cmd_health_agent)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UserError, SpecError) as e:
        print(f"toposerve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `toposerve plan ... | head` is not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
