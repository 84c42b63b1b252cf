"""What the local pod runner gives the chart's pods, like a kubelet: mounts (configMap, secret,
emptyDir, the ServiceAccount token) in a private mount namespace and the in-cluster variables.
The mount script is run for real (root, unshare) so a broken mount fails here, not in a cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from toposerve.dev.podrunner import (
    SA_DIR,
    Mount,
    container_mounts,
    in_cluster_env,
    in_cluster_from_kubeconfig,
    mount_script,
    tmpfs_size,
    volume_files,
)

POD = {
    "metadata": {"name": "op", "namespace": "ns", "uid": "u1"},
    "spec": {
        "volumes": [
            {"name": "config", "configMap": {"name": "cfg"}},
            {"name": "picked", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "sub/b.yaml"}]}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "other", "hostPath": {"path": "/"}},
        ],
        "containers": [
            {
                "name": "c",
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/toposerve", "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "shm", "mountPath": "/dev/shm"},
                    {"name": "other", "mountPath": "/host"},
                ],
            }
        ],
    },
}


def test_volume_files_all_keys_or_the_listed_items() -> None:
    data = {"a": "1", "b": "2"}
    assert volume_files(POD["spec"]["volumes"][0], data) == data
    assert volume_files(POD["spec"]["volumes"][1], data) == {"sub/b.yaml": "1"}


def test_container_mounts_follow_the_pod_spec(tmp_path: Path) -> None:
    mounts = container_mounts(POD, POD["spec"]["containers"][0], tmp_path, tmp_path / "sa")
    assert mounts == [
        Mount("/etc/toposerve", str(tmp_path / "volumes/config"), True),
        Mount("/tmp", str(tmp_path / "volumes/tmp"), False),
        Mount("/dev/shm", None, False, "64Mi"),  # medium Memory: a tmpfs, as the kubelet does
        Mount("/host", "/", False),  # hostPath: the node's directory, bind-mounted
        Mount(SA_DIR, str(tmp_path / "sa"), True),
    ]
    assert container_mounts(POD, POD["spec"]["containers"][0], tmp_path, None)[-1].target == "/host"
    # A checkout under /tmp: the emptyDir on /tmp would hide its venv, so the host's /tmp stays.
    kept = container_mounts(POD, POD["spec"]["containers"][0], tmp_path, None, ["/tmp/co/.venv/bin"])
    assert "/tmp" not in [m.target for m in kept] and len(kept) == 3


def test_host_path_volumes_are_bind_mounted_created_when_asked_and_left_out_when_missing(
    tmp_path: Path,
) -> None:
    made, missing = tmp_path / "cache", tmp_path / "absent"
    pod = {"spec": {"volumes": [
        {"name": "a", "hostPath": {"path": str(made), "type": "DirectoryOrCreate"}},
        {"name": "b", "hostPath": {"path": str(missing)}},
    ]}}  # fmt: skip
    c = {
        "volumeMounts": [
            {"name": "a", "mountPath": "/models", "readOnly": True},
            {"name": "b", "mountPath": "/x"},
        ]
    }
    assert container_mounts(pod, c, tmp_path, None) == [Mount("/models", str(made), True)]
    assert made.is_dir() and not missing.exists()


def test_a_mount_that_would_hide_a_source_comes_last(tmp_path: Path) -> None:
    """An emptyDir on /tmp must not hide the token of a checkout that lives under /tmp."""
    mounts = [
        Mount("/tmp", "/tmp/co/.cluster/pods/.pods/u/volumes/tmp"),
        Mount("/etc/x", "/tmp/co/.cluster/pods/.pods/u/volumes/x", True),
        Mount(SA_DIR, "/tmp/co/.cluster/pods/.pods/u/serviceaccount", True),
    ]
    script = mount_script(mounts, tmp_path, exists=lambda p: True)
    binds = [line.split()[-1] for line in script.splitlines() if line.startswith("mount --bind")]
    assert binds[-1] == "/tmp" and len(binds) == 3


def test_tmpfs_size_from_quantities() -> None:
    assert [tmpfs_size(q) for q in ("64Mi", "1Gi", "2G", "500k", "4096")] == [
        "64m", "1g", "2000000000", "500000", "4096"
    ]  # fmt: skip


def test_in_cluster_env_points_at_the_reachable_api_server() -> None:
    env = in_cluster_env("10.243.0.1", 32764)
    assert env["KUBERNETES_SERVICE_HOST"] == "10.243.0.1" and env["KUBERNETES_SERVICE_PORT"] == "32764"


def test_in_cluster_from_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    kc = tmp_path / "kc"
    kc.write_text(
        "clusters:\n- cluster: {certificate-authority: ca.crt, server: 'https://10.243.0.1:32764'}\n  name: c\n"
    )
    assert in_cluster_from_kubeconfig(str(kc)) == (("10.243.0.1", 32764), b"CA")


@pytest.mark.skipif(os.geteuid() != 0, reason="MOUNT SCRIPT TEST NEEDS ROOT (unshare --mount); SKIPPED")
def test_mount_script_mounts_privately_and_leaves_the_host_alone(tmp_path: Path) -> None:
    co = tmp_path / "co"  # like a checkout under /tmp, whose /tmp gets an emptyDir below
    src, sa, scratch, empty = co / "src", co / "sa", co / "scratch", co / "empty"
    for d in (src, sa, scratch, empty):
        d.mkdir(parents=True)
    (src / "config.yaml").write_text("autoEngine: mock\n")
    (sa / "token").write_text("t0k3n\n")
    existing = tmp_path / "existing"
    existing.mkdir()
    missing = tmp_path / "not" / "there"  # created through an overlay, only in the namespace
    mounts = [
        Mount(str(existing), str(src), True),
        Mount(str(missing), str(sa), True),
        Mount(str(tmp_path / "shm"), None, False, "1Mi"),
        Mount(str(co), str(empty)),  # hides every source: must be mounted last
    ]
    script = mount_script(mounts, scratch)
    check = (
        f"cat {existing}/config.yaml {missing}/token; touch {tmp_path}/shm/x; "
        f"touch {existing}/y 2>/dev/null && echo WRITABLE || echo READONLY; ls -A {co}"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "pod", "sh", "-c", check],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["autoEngine:", "mock", "t0k3n", "READONLY"]
    assert not (tmp_path / "not").exists(), "the overlay leaked a directory onto the host"
    assert list(existing.iterdir()) == [] and not (tmp_path / "shm").exists()
