"""The launch of a multi-node vLLM replica's worker pods: find the leader's address first.

vLLM's ``--master-addr`` is where torch.distributed's rendezvous store listens on rank 0. LeaderWorkerSet
gives workers the leader's DNS name (``LWS_LEADER_ADDRESS``, a record of the group's headless
Service), which exists only once the leader pod has an IP, and may lag it on a busy CoreDNS. Passed
as a name, a worker that starts first fails its rendezvous and crash-loops the whole group (LWS
restarts every pod of a group when one restarts). KServe's multi-node vLLM template resolves the
leader before it starts the engine; the worker does the same here: it waits, bounded, until the
name resolves, then ``exec``s ``vllm serve`` with the address, so vLLM is PID 1's child no more
than it would be without the wrapper (``exec`` replaces the shell, signals reach vLLM directly).

The leader needs no wait: it is the rendezvous, and passes its own pod IP.
``getent`` (glibc) and ``/bin/sh`` are in the vllm/vllm-openai image (Ubuntu); a custom image for
multi-node serving needs both. Kubernetes expands ``$(LWS_WORKER_INDEX)`` in the script; the shell's
own ``$(...)`` forms are not variable names, and Kubernetes leaves unknown references as written.
"""

from __future__ import annotations

import shlex

LEADER_IP_VAR = "LEADER_IP"
POLL_SECONDS = 2


def worker_script(serve_args: list[str], master_addr_at: int, wait_seconds: int) -> str:
    """A ``/bin/sh -c`` script that waits until ``$LWS_LEADER_ADDRESS`` resolves (at most
    ``wait_seconds``, then exits 1 so the group restarts) and ``exec``s ``vllm serve serve_args`` with
    the resolved address in place of ``serve_args[master_addr_at]``."""
    before = shlex.join(["vllm", "serve", *serve_args[:master_addr_at]])
    after = shlex.join(serve_args[master_addr_at + 1 :])
    return "\n".join([
        "waited=0",
        'until set -- $(getent hosts "$LWS_LEADER_ADDRESS") && [ -n "${1:-}" ]; do',
        f'  if [ "$waited" -ge {wait_seconds} ]; then',
        f'    echo "toposerve: the group leader $LWS_LEADER_ADDRESS did not resolve within {wait_seconds} s" >&2',
        "    exit 1",
        "  fi",
        '  echo "toposerve: waiting for the group leader $LWS_LEADER_ADDRESS to resolve"',
        f"  sleep {POLL_SECONDS}; waited=$((waited + {POLL_SECONDS}))",
        "done",
        f'{LEADER_IP_VAR}="$1"',
        f'echo "toposerve: the group leader $LWS_LEADER_ADDRESS is ${LEADER_IP_VAR}"',
        f'exec {before} "${LEADER_IP_VAR}" {after}'.rstrip(),
    ])  # fmt: skip
