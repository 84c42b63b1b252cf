"""What the agent writes on the Node (condition, taint) and what it exports (DCGM names)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from toposerve.health.exporter import GPUCollector
from toposerve.health.node import TAINT_KEY, NodeUpdate, plan_node_update, publish
from toposerve.health.verdict import (
    NVML_ERROR_NOT_SUPPORTED,
    GPUReading,
    HealthState,
    NodeReading,
    Thresholds,
    step,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OTHER_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def node(
    conditions: list[dict[str, Any]] | None = None, taints: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": "gpu-1", "resourceVersion": "42"},
        "spec": {"taints": taints or []},
        "status": {"conditions": conditions or [{"type": "Ready", "status": "True"}]},
    }


def cond(
    status: str, reason: str, message: str, beat: datetime = NOW, since: str = "2026-11-30T00:00:00Z"
) -> dict[str, Any]:
    return {"type": "GPUHealthy", "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": beat.strftime("%Y-%m-%dT%H:%M:%SZ"), "lastTransitionTime": since}  # fmt: skip


def test_unhealthy_adds_condition_and_taint_keeping_other_taints() -> None:
    u = plan_node_update(node(taints=[OTHER_TAINT]), False, "GPUsUnhealthy", "GPU 0: XID 79", NOW)
    assert u.taints == [OTHER_TAINT, {"key": TAINT_KEY, "effect": "NoSchedule"}]
    assert u.resource_version == "42"
    (c,) = u.status_patch["status"]["conditions"]  # type: ignore[index]
    assert (c["type"], c["status"], c["reason"], c["lastTransitionTime"]) == (
        "GPUHealthy", "False", "GPUsUnhealthy", "2026-12-01T12:00:00Z")  # fmt: skip


def test_nothing_to_write_when_the_node_already_says_so() -> None:
    n = node([cond("False", "GPUsUnhealthy", "m")], [{"key": TAINT_KEY, "effect": "NoSchedule"}])
    assert plan_node_update(n, False, "GPUsUnhealthy", "m", NOW) == NodeUpdate(None, None, "42")


def test_heartbeat_rewrites_a_stale_condition_keeping_its_transition_time() -> None:
    n = node([cond("True", "GPUsHealthy", "ok", beat=NOW - timedelta(seconds=301))])
    u = plan_node_update(n, True, "GPUsHealthy", "ok", NOW, heartbeat_seconds=300)
    (c,) = u.status_patch["status"]["conditions"]  # type: ignore[index]
    assert (
        c["lastTransitionTime"] == "2026-11-30T00:00:00Z" and c["lastHeartbeatTime"] == "2026-12-01T12:00:00Z"
    )
    assert u.taints is None


def test_recovery_removes_only_our_taint_and_no_taint_mode_leaves_taints_alone() -> None:
    n = node([cond("False", "GPUsUnhealthy", "m")], [OTHER_TAINT, {"key": TAINT_KEY, "effect": "NoSchedule"}])
    u = plan_node_update(n, True, "GPUsHealthy", "ok", NOW)
    assert u.taints == [OTHER_TAINT]
    assert u.status_patch["status"]["conditions"][0]["lastTransitionTime"] == "2026-12-01T12:00:00Z"  # type: ignore[index]
    assert plan_node_update(node(), False, "GPUsUnhealthy", "m", NOW, taint=False).taints is None


class FakeKube:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, str]] = []

    def request(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        self.calls.append((method, url, body, content_type))
        return {}


def test_publish_patches_taints_with_a_precondition_and_status_by_strategic_merge() -> None:
    kube = FakeKube()
    publish(kube, "gpu-1", plan_node_update(node(), False, "GPUsUnhealthy", "m", NOW))
    (m1, u1, b1, t1), (m2, u2, _, t2) = kube.calls
    assert (m1, u1, t1) == ("PATCH", "/api/v1/nodes/gpu-1", "application/merge-patch+json")
    assert b1["metadata"] == {"resourceVersion": "42"}
    assert (m2, u2, t2) == ("PATCH", "/api/v1/nodes/gpu-1/status", "application/strategic-merge-patch+json")


def test_metrics_use_dcgm_names_and_leave_out_what_nvml_did_not_say() -> None:
    g0 = GPUReading(index=0, uuid="GPU-a", name="NVIDIA H100 80GB HBM3", temperature_c=91, memory_total_bytes=80 * 2**30,
                    memory_used_bytes=10 * 2**30, power_mw=350500, ecc_volatile_uncorrected=2, xids=(79,))  # fmt: skip
    g1 = GPUReading(index=1, uuid="GPU-b", temperature_c=40, errors={"power": NVML_ERROR_NOT_SUPPORTED})
    reading = NodeReading(gpus=(g0, g1))
    s = step(HealthState(), reading, Thresholds())
    c = GPUCollector("gpu-1")
    c.update(reading, s.verdicts, s.state)
    reg = CollectorRegistry()
    reg.register(c)
    labels = {
        "gpu": "0",
        "UUID": "GPU-a",
        "device": "nvidia0",
        "modelName": "NVIDIA H100 80GB HBM3",
        "Hostname": "gpu-1",
    }
    assert reg.get_sample_value("DCGM_FI_DEV_GPU_TEMP", labels) == 91
    assert reg.get_sample_value("DCGM_FI_DEV_FB_USED", labels) == 10 * 1024
    assert reg.get_sample_value("DCGM_FI_DEV_FB_FREE", labels) == 70 * 1024
    assert reg.get_sample_value("DCGM_FI_DEV_POWER_USAGE", labels) == 350.5
    assert reg.get_sample_value("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", labels) == 2
    assert reg.get_sample_value("DCGM_FI_DEV_XID_ERRORS", labels) == 79
    assert reg.get_sample_value("toposerve_gpu_healthy", labels) == 0
    l1 = {**labels, "gpu": "1", "UUID": "GPU-b", "device": "nvidia1", "modelName": ""}
    assert reg.get_sample_value("DCGM_FI_DEV_POWER_USAGE", l1) is None
    assert reg.get_sample_value("toposerve_gpu_healthy", l1) == 1
    assert reg.get_sample_value("toposerve_nvml_errors", {"gpu": "1", "query": "power", "code": "3"}) == 1
    assert (
        reg.get_sample_value("toposerve_node_gpu_healthy", {"Hostname": "gpu-1"}) == 1
    )  # one sample: not yet
