"""Find the `vllm serve` command lines in rendered objects and check them with vLLM's own parser.

The renderer may start vLLM directly (``command: [vllm, serve]``), through the image's entrypoint,
or from a shell script (``bash -c "ray start ... && exec vllm serve ..."``); this module finds the
argv in each form and substitutes what Kubernetes and the shell would (``$(VAR)``, ``$VAR``,
``${VAR}``) with plausible values, so vLLM's parser sees what a pod would run.

``parse_with_vllm`` runs hack/vllm/check_args.py in the cached venv of the pinned vLLM built by
hack/vllm/venv.sh (a few minutes the first time on a machine, instant after).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.33.0"
VENV_SH = ROOT / "hack" / "vllm" / "venv.sh"
CHECK_ARGS = ROOT / "hack" / "vllm" / "check_args.py"
FACTS = ROOT / "hack" / "vllm" / f"facts-{VLLM_VERSION}.json"

# Values for variables Kubernetes or LeaderWorkerSet set at run time (not in the rendered spec).
PLACEHOLDERS: dict[str, str] = {
    "LWS_LEADER_ADDRESS": "10.0.0.1",
    "LWS_GROUP_SIZE": "2",
    "LWS_WORKER_INDEX": "1",
    "LWS_NAME": "llm",
    "POD_IP": "10.0.0.2",
    "POD_NAME": "llm-0",
    "POD_NAMESPACE": "default",
    "NODE_NAME": "gpu-node-0",
    "HOSTNAME": "llm-0",
    "HF_TOKEN": "hf_placeholder",
    "HUGGING_FACE_HUB_TOKEN": "hf_placeholder",
    # Not Kubernetes': the shell variable a multi-node worker's script sets to the leader's
    # resolved address before it execs vLLM (render/multinode.py).
    "LEADER_IP": "10.0.0.1",
}
FIELD_PLACEHOLDERS: dict[str, str] = {
    "status.podIP": "10.0.0.2",
    "status.hostIP": "10.0.1.1",
    "metadata.name": "llm-0",
    "metadata.namespace": "default",
    "spec.nodeName": "gpu-node-0",
}
SHELLS = {"bash", "sh", "dash", "zsh"}
SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


@dataclass(frozen=True)
class VllmCommand:
    """One container's `vllm serve` invocation: where it was found, its image, its argv after `serve`."""

    where: str
    image: str
    argv: list[str]


class VllmResult(TypedDict):
    argv: list[str]
    ok: bool
    stage: str | None
    error: str | None
    values: dict[str, Any]


def _pod_specs(obj: Any, path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every pod spec (a mapping with ``containers``) anywhere in an object, with its path."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("containers"), list):
            yield path, obj
        for key, value in obj.items():
            yield from _pod_specs(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _pod_specs(value, f"{path}[{i}]")


def _env(container: Mapping[str, Any], leader: bool) -> dict[str, str]:
    """What ``$(VAR)`` resolves to in this container: its env, then run-time placeholders."""
    env = dict(PLACEHOLDERS)
    fields = dict(FIELD_PLACEHOLDERS)
    if leader:  # the leader's pod IP is what its workers resolve LWS_LEADER_ADDRESS to
        env["LWS_WORKER_INDEX"] = "0"
        fields["status.podIP"] = env["POD_IP"] = env["LEADER_IP"]
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif (field := (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")) is not None:
            env[item["name"]] = fields.get(field, PLACEHOLDERS.get(item["name"], "placeholder"))
        elif "valueFrom" in item:  # secret / config map: any non-empty value will do
            env[item["name"]] = PLACEHOLDERS.get(item["name"], "placeholder")
    return env


def expand_kubernetes(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command/args: ``$$`` escapes, unknown refs stay as written."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", repl, text)


def expand_shell(token: str, env: Mapping[str, str]) -> str:
    """The shell's ``$VAR`` / ``${VAR}`` expansion (unset variables expand to nothing, as in sh)."""
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)",
        lambda m: env.get(m.group(1) or m.group(2), ""),
        token,
    )


def serve_argvs_in_script(script: str, env: Mapping[str, str]) -> list[list[str]]:
    """The argv after each ``vllm serve`` in a shell script, up to the next ``&&``, ``;``, ``|``, end."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    tokens = list(lexer)
    found: list[list[str]] = []
    for i in range(len(tokens) - 1):
        if tokens[i].rsplit("/", 1)[-1] == "vllm" and tokens[i + 1] == "serve":
            argv: list[str] = []
            for tok in tokens[i + 2 :]:
                if tok in SEPARATORS:
                    break
                argv.append(expand_shell(tok, env))
            found.append(argv)
    return found


def find_vllm_commands(objects: list[dict[str, Any]]) -> list[VllmCommand]:
    """Every `vllm serve` invocation in the containers of the given Kubernetes objects."""
    found: list[VllmCommand] = []
    for obj in objects:
        name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        for path, pod in _pod_specs(obj):
            leader = "leaderTemplate" in path
            for kind in ("initContainers", "containers"):
                for c in pod.get(kind) or []:
                    env = _env(c, leader)
                    command = [expand_kubernetes(str(s), env) for s in c.get("command") or []]
                    args = [expand_kubernetes(str(s), env) for s in c.get("args") or []]
                    where = f"{name} {path}.{kind}[{c.get('name')}]"
                    image = str(c.get("image", ""))
                    if not command and "vllm-openai" in image:
                        command = ["vllm", "serve"]  # the vllm/vllm-openai image's entrypoint
                    line = command + args
                    if line[:2] == ["vllm", "serve"] or (
                        len(line) > 1 and line[0].endswith("/vllm") and line[1] == "serve"
                    ):
                        found.append(VllmCommand(where, image, line[2:]))
                    elif len(line) >= 3 and line[0].rsplit("/", 1)[-1] in SHELLS and line[1] == "-c":
                        for argv in serve_argvs_in_script(line[2], env):
                            found.append(VllmCommand(where, image, argv))
    return found


def vllm_argvs(objects: list[dict[str, Any]]) -> list[list[str]]:
    """The argv (after ``vllm serve``) of every vLLM container in the objects."""
    return [c.argv for c in find_vllm_commands(objects)]


@functools.cache
def vllm_python() -> str:
    """The cached venv's python (built by hack/vllm/venv.sh on first use)."""
    out = subprocess.run(
        ["bash", str(VENV_SH)], check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    ).stdout
    return out.strip().splitlines()[-1]


def _check_args(stdin: str, *flags: str) -> Any:
    proc = subprocess.run(
        [vllm_python(), str(CHECK_ARGS), *flags],
        input=stdin,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"check_args.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def parse_with_vllm(argvs: list[list[str]]) -> list[VllmResult]:
    """vLLM's verdict on each argv (see hack/vllm/check_args.py for the stages it runs)."""
    results: list[VllmResult] = _check_args(json.dumps(argvs))
    return results


def live_facts() -> dict[str, Any]:
    """What the installed vLLM offers (flags, choices), straight from its parser."""
    facts: dict[str, Any] = _check_args("", "--facts")
    return facts


def committed_facts() -> dict[str, Any]:
    facts: dict[str, Any] = json.loads(FACTS.read_text())
    return facts
