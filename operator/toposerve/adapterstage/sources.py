"""What the stager decides without I/O: which sources it stages, where, and which archive members
it accepts. Pure, so each rule is unit- and property-tested on plain strings.

A source here is ``AdapterSpec.engine_source`` (api/spec.py): the router passes that string on
unchanged. Three forms need staging (vLLM 0.33.0 cannot fetch them, docs/lora.md "Sources"):

- ``https://host/path``: an archive (tar, tar.gz/tgz, tar.bz2, tar.xz or zip; recognised by its
  first bytes, not its name, so a URL with a query string or no extension works too);
- ``s3://bucket/key``: the objects under ``key/`` (a directory), or, when there are none, the
  object ``key`` itself as an archive;
- ``hf://org/repo@revision``: a Hugging Face repo at a branch, tag or commit.

Everything else (a path in the pod, a bare ``org/repo``) is loaded by vLLM itself.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

# The sidecar's port in every engine pod with spec.lora (named STAGE_PORT_NAME), and where it
# puts what it stages: under the model cache mount, so the engine reads it at the same path.
STAGE_PORT = 8011
STAGE_PORT_NAME = "adapter-stage"
STAGE_ROOT = "/models/.toposerve-adapters"
# http:// too: the API admits https only, but a router's --adapter flag may name an in-cluster
# server (and the loopback tests do).
STAGE_SCHEMES = ("https://", "http://", "s3://", "hf://")
_FETCH_SCHEMES = STAGE_SCHEMES

SourceKind = Literal["http", "s3", "hf"]
ArchiveKind = Literal["zip", "tar"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # as the API's pattern
_REVISION = re.compile(r"^[A-Za-z0-9._/-]+$")  # AdapterSpec.revision's pattern
ADAPTER_CONFIG = "adapter_config.json"  # what vLLM's PEFTHelper.from_local_dir opens first


class SourceError(ValueError):
    """A source the stager cannot stage, for a reason in the source itself."""


@dataclass(frozen=True, slots=True)
class Source:
    kind: SourceKind
    raw: str  # as given: the staging key
    url: str = ""  # http(s)
    bucket: str = ""  # s3
    key: str = ""  # s3: object key or prefix, without a leading "/"
    repo: str = ""  # hf: org/repo
    revision: str = ""  # hf


def needs_staging(source: str) -> bool:
    """Whether the router must have `source` staged before the engine can load it."""
    return source.startswith(STAGE_SCHEMES)


def parse_source(source: str) -> Source:
    """The parts of a source to stage; SourceError naming what is wrong otherwise."""
    if not source.startswith(_FETCH_SCHEMES):
        raise SourceError(
            f"{source!r}: not a source to stage (want https://, http://, s3:// or hf://org/repo@revision)"
        )
    if any(c.isspace() for c in source) or len(source) > 2048:
        raise SourceError(f"{source!r}: whitespace or longer than 2048 characters")
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        if not parts.hostname:
            raise SourceError(f"{source}: no host in the URL")
        return Source("http", source, url=source)
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not _BUCKET.match(bucket):
            raise SourceError(f"{source}: {bucket!r} is not an S3 bucket name")
        return Source("s3", source, bucket=bucket, key=key.lstrip("/"))
    repo, _, revision = source.removeprefix("hf://").partition("@")
    if not _REPO.match(repo):
        raise SourceError(f"{source}: {repo!r} is not a Hugging Face repo id (org/repo)")
    if revision and (not _REVISION.match(revision) or ".." in revision.split("/")):
        raise SourceError(f"{source}: {revision!r} is not a revision (branch, tag or commit)")
    return Source("hf", source, repo=repo, revision=revision or "main")


def stage_name(source: str) -> str:
    """The directory name of a staged source: a hash of the whole source string (a revision is
    part of it), so one source is staged once per cache, whichever pod or router asks."""
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def staged_path(root: str, source: str) -> str:
    """Where `source` is staged under `root` (the engine's path to load)."""
    return posixpath.join(root, stage_name(source))


def stager_url(engine_url: str, port: int) -> str:
    """The stager of the pod behind `engine_url` (its sidecar, on the same pod IP)."""
    parts = urlsplit(engine_url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme or 'http'}://{host}:{port}"


def archive_kind(head: bytes) -> ArchiveKind | None:
    """An archive's format from its first bytes (at least 262): zip (PKZIP local header or empty
    archive), tar compressed with gzip, bzip2 or xz, or a plain POSIX/GNU tar ("ustar" at 257)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")):
        return "tar"
    if head[257:262] == b"ustar":
        return "tar"
    return None


MemberType = Literal["file", "dir", "symlink", "hardlink", "other"]


def member_path(name: str, kind: MemberType) -> str | None:
    """The normalised relative path of an archive member to write, None for one to skip (a
    directory entry: directories are made for the files), or ArchiveError for one that is
    refused: links (an adapter has none, and a link is how an archive escapes its directory),
    devices, absolute paths, ``..`` anywhere, backslashes (a Windows path in a zip)."""
    if kind in ("symlink", "hardlink", "other"):
        raise ArchiveError(
            f"archive member {name!r} is a {'link' if kind != 'other' else 'special file'}: refused"
        )
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"archive member {name!r}: absolute or not a POSIX path: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} points outside the archive (path traversal): refused")
    if not parts:
        if kind == "dir":
            return None
        raise ArchiveError(f"archive member {name!r}: empty path: refused")
    return None if kind == "dir" else "/".join(parts)


class ArchiveError(ValueError):
    """An archive (or S3 listing) the stager refuses: unsafe members, over the limits, corrupt."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one source may put on the cache (a LoRA adapter is megabytes to a few
    GB; the bounds keep a wrong URL from filling the model cache)."""

    max_bytes: int = 8 << 30  # downloaded, and unpacked
    max_files: int = 10_000


DEFAULT_LIMITS = Limits()


def adapter_root(files: Iterable[str]) -> str:
    """The directory of the adapter inside what was fetched: the top if it holds
    ``adapter_config.json``, else the single top-level directory that does (``tar czf a.tgz
    adapter/``). ArchiveError when neither holds it."""
    names = set(files)
    if ADAPTER_CONFIG in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1:
        (top,) = tops
        if f"{top}/{ADAPTER_CONFIG}" in names:
            return top
    raise ArchiveError(
        f"no {ADAPTER_CONFIG} at the top (or under a single top-level directory): "
        f"not a PEFT LoRA adapter ({len(names)} files: {', '.join(sorted(names)[:5]) or 'none'})"
    )
