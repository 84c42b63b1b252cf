"""Where the tenant table comes from: a policy file and API-key Secrets (docs/tenants.md).

- Policy (models, priority, weight, budgets) per tenant: the YAML file `--tenants-file` (the
  chart renders it into a ConfigMap from `gateway.tenants.policies`). Re-read when it changes
  (a mounted ConfigMap is updated in place by the kubelet).
- Keys: Secrets in the gateway's own namespace labelled `toposerve.io/tenant=<tenant>`, data key
  `api-keys`, one key per line (several: rotation). Watched (list+watch, discovery.ListWatch),
  so keys rotate without a restart. Each key is hashed as it is read; the plaintext is dropped
  at once, never logged.

`TenantSource` is the bookkeeping (plain data in, a `Table` out through `on_table`): a bad Secret
or a bad file is logged with its name and field, and the last good version of *that* source
stays in force (a typo in one Secret neither drops that tenant's working keys nor anyone
else's). The watch itself is the thin shell at the bottom.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from toposerve.router import tenants as tn
from toposerve.router.discovery import ListWatch

if TYPE_CHECKING:
    import argparse

    from toposerve.router.gateway import Gateway

log = logging.getLogger("toposerve.router.tenants")

TENANT_LABEL = "toposerve.io/tenant"
KEYS_FIELD = "api-keys"


def load_policy_file(path: str) -> tn.Policies:
    """The tenants file; TenantConfigError naming the file and field when it is bad."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise tn.TenantConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise tn.TenantConfigError(f"{path}: not YAML: {' '.join(str(e).split())}") from None
    return tn.parse_policies(doc, path)


def parse_secret(obj: Mapping[str, Any]) -> tuple[str, frozenset[bytes]]:
    """(tenant, key digests) of one key Secret; TenantConfigError naming the Secret and field."""
    meta = obj.get("metadata") or {}
    where = f"Secret {meta.get('namespace', '')}/{meta.get('name', '')}"
    tenant = (meta.get("labels") or {}).get(TENANT_LABEL, "")
    if not isinstance(tenant, str) or not tn.TENANT_NAME.match(tenant):
        raise tn.TenantConfigError(f"{where}: label {TENANT_LABEL}={tenant!r} is not a tenant name")
    data = obj.get("data") or {}
    if KEYS_FIELD not in data:
        raise tn.TenantConfigError(f"{where}: no data key {KEYS_FIELD!r} (one API key per line)")
    try:
        text = base64.b64decode(data[KEYS_FIELD] or "", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, TypeError):
        raise tn.TenantConfigError(f"{where}: data.{KEYS_FIELD} is not base64 of UTF-8 text") from None
    return tenant, tn.parse_keys(text, f"{where} data.{KEYS_FIELD}")


def _secret_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class TenantSource:
    """Policies + key Secrets -> one `Table`, handed to `on_table` on every change."""

    def __init__(self, policies: Mapping[str, tn.Tenant], on_table: Callable[[tn.Table], None]) -> None:
        self.policies = dict(policies)
        self.objectives: Mapping[str, str] = getattr(policies, "objectives", {})  # tn.Policies
        self.on_table = on_table
        self.secrets: dict[str, tuple[str, frozenset[bytes]]] = {}  # last good parse per Secret
        self.errors: dict[str, str] = {}  # Secret or file -> its current error
        self._publish()

    def set_policies(self, policies: Mapping[str, tn.Tenant]) -> None:
        self.policies = dict(policies)
        self.objectives = getattr(policies, "objectives", {})
        self._publish()

    def policy_error(self, where: str, message: str) -> None:
        """The file is bad: say so once, keep the last good policy."""
        if self.errors.get(where) != message:
            log.error("tenant policy not applied (the previous one stays in force): %s", message)
        self.errors[where] = message

    def secrets_listed(self, items: Sequence[Mapping[str, Any]]) -> None:
        seen = set()
        for obj in items:
            seen.add(_secret_key(obj))
            self._take(obj)
        for gone in set(self.secrets) - seen:
            del self.secrets[gone]
            self.errors.pop(gone, None)
        self._publish()

    def secret_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = _secret_key(obj)
        if kind == "DELETED":
            self.secrets.pop(key, None)
            self.errors.pop(key, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._take(obj)
        self._publish()

    def _take(self, obj: Mapping[str, Any]) -> None:
        key = _secret_key(obj)
        try:
            self.secrets[key] = parse_secret(obj)
        except tn.TenantConfigError as e:
            if self.errors.get(key) != str(e):
                kept = "its previous keys stay in force" if key in self.secrets else "no keys taken from it"
                log.error("tenant keys not applied (%s): %s", kept, e)
            self.errors[key] = str(e)
            return
        if self.errors.pop(key, None) is not None:
            log.info("Secret %s: keys applied again", key)
        tenant = self.secrets[key][0]
        if tenant not in self.policies:  # kept (hashed): they apply once the policy names it
            log.warning(
                "Secret %s: tenant %r is not in the tenant policy: its keys are not accepted", key, tenant
            )

    def table(self) -> tn.Table:
        keys: dict[str, set[bytes]] = {}
        for tenant, digests in self.secrets.values():
            if tenant in self.policies:  # a tenant removed from the policy: its keys go too
                keys.setdefault(tenant, set()).update(digests)
        tenants = [
            replace(t, key_hashes=t.key_hashes | frozenset(keys.get(n, ()))) for n, t in self.policies.items()
        ]
        return tn.build_table(tenants, self.objectives)

    def _publish(self) -> None:
        table = self.table()
        for c in table.conflicts:
            log.error("an API key is listed for tenants %s: it is refused for both until fixed", c)
        self.on_table(table)


def secret_watch(source: TenantSource, namespace: str, loop: asyncio.AbstractEventLoop) -> ListWatch:
    """The list+watch of key Secrets in the gateway's own namespace (a Role there allows it)."""

    def lister(api: Any) -> Callable[..., Any]:
        core = importlib.import_module("kubernetes.client").CoreV1Api(api)
        return lambda **kw: core.list_namespaced_secret(namespace, **kw)

    return ListWatch(
        "tenant-secret",
        lister,
        source.secrets_listed,
        source.secret_event,
        loop,
        {"label_selector": TENANT_LABEL},
    )


async def follow_file(source: TenantSource, path: str, period_s: float = 10.0) -> None:
    """Re-read the policy file when its modification time changes (ConfigMap updates)."""
    last = _mtime(path)
    while True:
        await asyncio.sleep(period_s)
        now = _mtime(path)
        if now == last:
            continue
        last = now
        try:
            source.set_policies(load_policy_file(path))
        except tn.TenantConfigError as e:
            source.policy_error(path, str(e))
        else:
            if source.errors.pop(path, None) is not None:
                log.info("tenant policy %s applied again", path)
            log.info("tenant policy reloaded from %s: %d tenants", path, len(source.policies))


def _mtime(path: str) -> float | None:
    with contextlib.suppress(OSError):
        # a ConfigMap volume swaps a symlink (..data): stat follows it to the new file
        return os.stat(path).st_mtime
    return None


def check_args(args: argparse.Namespace) -> tn.Policies | None:
    """The tenant policy the flags name (None: tenants off); ValueError naming what is wrong."""
    if args.flow_max_wait <= 0 or args.flow_max_bytes <= 0:
        raise ValueError("--flow-max-wait and --flow-max-bytes must be more than 0")
    if args.tenant_secrets and not args.tenants_namespace:
        raise ValueError("--tenant-secrets needs --tenants-namespace (or $POD_NAMESPACE)")
    if args.tenant_secrets and not args.tenants_file:
        raise ValueError(
            "--tenant-secrets needs --tenants-file: the policy of the tenants the keys belong to"
        )
    if not args.tenants_file:
        return tn.Policies({}) if args.require_api_key else None
    return load_policy_file(args.tenants_file)


def start(
    gw: Gateway,
    args: argparse.Namespace,
    policies: dict[str, tn.Tenant] | None,
    loop: asyncio.AbstractEventLoop,
) -> list[ListWatch]:
    """Tenants on the gateway as the flags say: the admission, the file follower, the Secret
    watch (returned, for the caller to start and stop with the others)."""
    from toposerve.router.tenant_gate import FlowOptions

    if policies is None:
        return []
    gate = gw.tenants
    gate.admission.require_key = args.require_api_key
    gate.flow = FlowOptions(max_bytes=args.flow_max_bytes, max_wait_s=args.flow_max_wait)
    source = TenantSource(policies, gate.admission.set_table)
    gate.source = source
    if args.tenants_file:
        task = loop.create_task(follow_file(source, args.tenants_file))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    log.info(
        "tenants: %d in the policy, keys %s%s",
        len(policies),
        "required" if args.require_api_key else "optional",
        f", key Secrets watched in {args.tenants_namespace}" if args.tenant_secrets else "",
    )
    return [secret_watch(source, args.tenants_namespace, loop)] if args.tenant_secrets else []


_tasks: set[asyncio.Task[None]] = set()  # the file followers (a task needs a reference)
