"""Build and drive the fake ``libnvidia-ml.so.1`` (hack/nvml/fake_nvml.c) for tests and the local cluster.

The library is compiled with the machine's ``cc`` into ``~/.cache/toposerve/nvml/<hash>/`` (never
into git) and found by pynvml the way the real one is: ``ctypes.CDLL("libnvidia-ml.so.1")`` through
``LD_LIBRARY_PATH``. GPU state lives in a key=value file named by ``TOPOSERVE_FAKE_NVML_STATE``
(format in the C source's header), re-read on every NVML call, so a test changes a GPU by
rewriting the file.

    python -m toposerve.dev.fakenvml            # build (if needed), print the library's directory
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[3] / "hack" / "nvml" / "fake_nvml.c"
STATE_ENV = "TOPOSERVE_FAKE_NVML_STATE"
LIB_NAME = "libnvidia-ml.so.1"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "toposerve" / "nvml"


def build(source: Path = SOURCE, cache: Path | None = None, cc: str | None = None) -> Path:
    """Compile the fake library unless a build of this exact source is cached; returns its directory
    (for ``LD_LIBRARY_PATH``). Raises ``RuntimeError`` with the compiler's words when it fails."""
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH: cannot build the fake libnvidia-ml.so.1")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out_dir = (cache or cache_root()) / digest
    lib = out_dir / LIB_NAME
    if lib.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / LIB_NAME
        cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(tmp_lib), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders never see half a library
    return out_dir


def state_text(gpus: Sequence[Mapping[str, object]], driver: str = "loaded") -> str:
    """The state file for ``gpus`` (one mapping of field -> value per GPU, keys as in the C header,
    e.g. ``{"temp": 92, "ecc.vol.uncorrected": 3, "xids": [79]}``)."""
    lines = [f"driver={driver}", f"count={len(gpus)}"]
    for i, gpu in enumerate(gpus):
        for key, value in gpu.items():
            if isinstance(value, list | tuple):
                value = ",".join(str(v) for v in value)
            lines.append(f"gpu.{i}.{key}={value}")
    return "\n".join(lines) + "\n"


def write_state(path: Path, gpus: Sequence[Mapping[str, object]], driver: str = "loaded") -> None:
    """Replace the state file atomically (the library may read it at any moment)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(state_text(gpus, driver))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    try:
        print(build())
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
