"""The container image.

Cheap checks (always): the Dockerfile and `make image` install the same way, every runtime
dependency is pinned with hashes, the image runs as the user the chart's pods run as.

The full check runs the built image (`make image`, build/image/) for real: `toposerve --version`,
a mock engine and a router answering a chat completion, each as user 65532 in a chroot of the
image's root filesystem mounted read-only (as the chart's pods run it), so a file or dependency
missing from the image fails here. `make test-image` builds and runs it; elsewhere it is skipped,
loudly, unless TOPOSERVE_IMAGE_TEST=1 makes a missing build a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tomllib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from toposerve import __version__

ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path(os.environ.get("IMAGE_OUT") or ROOT / "build" / "image")
ROOTFS = IMAGE / "rootfs"
USER = "65532:65532"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    text = (ROOT / "hack/image/requirements.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, re.M))
    assert wanted <= {_norm(p) for p in pins}, f"not pinned: {wanted - {_norm(p) for p in pins}}"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[1])
    for block in blocks:
        assert "--hash=sha256:" in block, f"no hash: {block.splitlines()[0]}"


def test_dockerfile_and_make_image_install_the_same_way() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    build = (ROOT / "hack/image/build.sh").read_text()
    assert "hack/image/install.sh" in docker and "install.sh" in build
    assert "hack/image/requirements.txt" in docker and "hack/image/requirements.txt" in build
    assert "FROM debian:bookworm-slim" in docker and "SUITE=bookworm" in build
    for pkg in ("python3", "python3-venv", "ca-certificates"):
        assert pkg in docker and pkg in build
    assert "USER 65532:65532" in docker and "--config.user=65532:65532" in build
    assert 'ENTRYPOINT ["toposerve"]' in docker and "--config.entrypoint=toposerve" in build
    kept = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().split() if line[0] == "!"]
    for src in re.findall(r"^COPY (?!--from)(\S+)", docker, re.M):
        assert any(src == k or src.startswith(k + "/") for k in kept), f".dockerignore drops {src}"


def test_the_chart_runs_the_image_user() -> None:
    values = yaml.safe_load((ROOT / "charts/toposerve/values.yaml").read_text())
    assert values["image"]["repository"] == "ghcr.io/toposerve/toposerve"
    deployment = (ROOT / "charts/toposerve/templates/deployment.yaml").read_text()
    assert "runAsUser: 65532" in deployment and "runAsGroup: 65532" in deployment


# ---- the built image --------------------------------------------------------------------------


def _need_image() -> None:
    why = ""
    if not (ROOTFS / "opt/toposerve/bin/toposerve").exists():
        why = f"IMAGE NOT BUILT: {ROOTFS} missing (run `make image`); image run tests SKIPPED"
    elif os.geteuid() != 0:
        why = "IMAGE TESTS NEED ROOT (chroot); SKIPPED"
    if why:
        if os.environ.get("TOPOSERVE_IMAGE_TEST") == "1":
            pytest.fail(why)
        warnings.warn(why, stacklevel=2)
        pytest.skip(why)


def in_image(*argv: str) -> list[str]:
    """argv run as user 65532 in a private mount namespace, the image's root read-only, /tmp a tmpfs."""
    script = (
        'set -e; r="$0"; mount --bind "$r" "$r"; mount -t tmpfs -o size=64m tmpfs "$r/tmp"; '
        'mount -t proc proc "$r/proc"; mount -o remount,bind,ro "$r"; '
        "exec chroot --userspec=" + USER + ' "$r" /usr/bin/env -i HOME=/nonexistent '
        'PATH=/opt/toposerve/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 "$@"'
    )
    # A pid namespace whose init dies with unshare (--kill-child): nothing outlives the test.
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "sh",
        "-c",
        script,
        str(ROOTFS),
        *argv,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(*argv: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        in_image(*argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        for _ in range(600):
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"{argv} exited {proc.returncode} in the image:\n{out}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            subprocess.run(["sleep", "0.1"], check=True)
        else:
            raise AssertionError(f"{argv} never answered /health")
        yield proc
    finally:  # the whole process group: unshare, and the server it started in the chroot
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_image_version() -> None:
    _need_image()
    out = subprocess.run(in_image("toposerve", "--version"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"toposerve {__version__}"


def test_every_module_imports_in_the_image() -> None:
    """The operator, router, mock engine (and whatever joins them) import with the image's packages."""
    _need_image()
    code = (
        "import importlib, pkgutil, toposerve; "
        "mods = [m.name for m in pkgutil.walk_packages(toposerve.__path__, 'toposerve.')]; "
        "[importlib.import_module(m) for m in mods]; print(len(mods))"
    )
    out = subprocess.run(in_image("python3", "-c", code), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 30
    for sub in ("run", "router", "mock-engine"):
        out = subprocess.run(in_image("toposerve", sub, "--help"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr


def test_image_runs_mock_engine_and_router_read_only_as_non_root() -> None:
    _need_image()
    engine, router = _free_port(), _free_port()
    with (
        serving("toposerve", "mock-engine", "--host", "127.0.0.1", "--port", str(engine), "--model", "m",
                port=engine),
        serving("toposerve", "router", "--host", "127.0.0.1", "--port", str(router),
                "--backends", f"http://127.0.0.1:{engine}", port=router),
    ):  # fmt: skip
        r = httpx.post(
            f"http://127.0.0.1:{router}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]


def test_image_has_no_writable_root_and_no_root_user_processes() -> None:
    _need_image()
    probe = "import os; open('/opt/toposerve/x', 'w')"
    out = subprocess.run(in_image("python3", "-c", probe), capture_output=True, text=True, timeout=60)
    assert "Read-only file system" in out.stderr or "Permission denied" in out.stderr, out.stderr
    out = subprocess.run(in_image("python3", "-c", "import os; print(os.getuid())"),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "65532"


def test_oci_image_config() -> None:
    _need_image()
    layout = IMAGE / "oci"
    index = json.loads((layout / "index.json").read_text())
    (manifest_ref,) = [m for m in index["manifests"]
                       if m["annotations"]["org.opencontainers.image.ref.name"] == __version__]  # fmt: skip
    blob = lambda d: json.loads((layout / "blobs" / "sha256" / d.split(":")[1]).read_text())  # noqa: E731
    manifest = blob(manifest_ref["digest"])
    config = blob(manifest["config"]["digest"])["config"]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["toposerve"]
    assert any(e.startswith("PATH=/opt/toposerve/bin:") for e in config["Env"])
    assert (IMAGE / f"toposerve-{__version__}.tar").stat().st_size > 10_000_000
