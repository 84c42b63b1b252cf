"""The stager's pure rules: which sources it stages and where, which archive members it writes."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from toposerve.adapterstage.sources import (
    STAGE_ROOT,
    ArchiveError,
    SourceError,
    adapter_root,
    archive_kind,
    member_path,
    needs_staging,
    parse_source,
    staged_path,
    stager_url,
)
from toposerve.api.spec import AdapterSpec


@pytest.mark.parametrize(
    ("spec", "staged"),
    [
        ({"name": "a", "source": "https://example.com/a.tgz"}, True),
        ({"name": "a", "source": "s3://bucket/prefix/a"}, True),
        ({"name": "a", "source": "hf://org/repo", "revision": "v2"}, True),
        ({"name": "a", "source": "hf://org/repo"}, False),  # vLLM downloads a repo id itself
        ({"name": "a", "source": "org/repo"}, False),
        ({"name": "a", "source": "cache://adapters/a"}, False),
        ({"name": "a", "source": "/models/adapters/a"}, False),
    ],
)
def test_what_the_api_admits_is_staged_exactly_when_vllm_cannot_fetch_it(
    spec: dict[str, str], staged: bool
) -> None:
    src = AdapterSpec.model_validate(spec).engine_source
    assert needs_staging(src) is staged
    if staged:
        parse_source(src)  # every staged form parses


def test_parse_source_forms() -> None:
    s = parse_source("s3://my-bucket/adapters/sql/")
    assert (s.kind, s.bucket, s.key) == ("s3", "my-bucket", "adapters/sql/")
    h = parse_source("hf://acme/llama-sql@refs/pr/3")
    assert (h.kind, h.repo, h.revision) == ("hf", "acme/llama-sql", "refs/pr/3")
    assert parse_source("hf://acme/x").revision == "main"
    assert parse_source("https://h.example/a.tgz?sig=1").url == "https://h.example/a.tgz?sig=1"


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("s3://B/x", "bucket"),
        ("hf://org@v1", "repo id"),
        ("hf://org/repo@../x", "revision"),
        ("https:///path", "no host"),
        ("ftp://h/x", "not a source"),
        ("/models/x", "not a source"),
    ],
)
def test_bad_sources_are_refused_naming_the_part(source: str, names: str) -> None:
    with pytest.raises(SourceError, match=names):
        parse_source(source)


@given(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60))
def test_staged_paths_are_one_level_under_the_root_and_distinct(a: str, b: str) -> None:
    pa, pb = staged_path(STAGE_ROOT, a), staged_path(STAGE_ROOT, b)
    assert posixpath.dirname(pa) == STAGE_ROOT and "/" not in pa[len(STAGE_ROOT) + 1 :]
    assert pa == staged_path(STAGE_ROOT, a)  # deterministic: the router knows it in advance
    assert (pa == pb) == (a == b)


def test_revision_is_part_of_the_key() -> None:
    assert staged_path("/r", "hf://o/r@v1") != staged_path("/r", "hf://o/r@v2")


def test_stager_url_is_the_engine_pod_on_the_stage_port() -> None:
    assert stager_url("http://10.1.2.3:8000", 8011) == "http://10.1.2.3:8011"
    assert stager_url("http://[fd00::5]:8000", 8011) == "http://[fd00::5]:8011"


def test_archive_kinds_by_first_bytes() -> None:
    assert archive_kind(b"PK\x03\x04" + b"\0" * 300) == "zip"
    assert archive_kind(b"\x1f\x8b\x08" + b"\0" * 300) == "tar"
    assert archive_kind(b"\0" * 257 + b"ustar\x0000" + b"\0" * 100) == "tar"
    assert archive_kind(b"<html>" + b"\0" * 300) is None


@pytest.mark.parametrize(
    ("name", "kind", "why"),
    [
        ("../x", "file", "traversal"),
        ("a/../../x", "file", "traversal"),
        ("/etc/passwd", "file", "absolute"),
        ("C:/x", "file", "absolute"),
        ("a\\..\\x", "file", "absolute"),
        ("link", "symlink", "link"),
        ("hard", "hardlink", "link"),
        ("dev", "other", "special"),
    ],
)
def test_unsafe_members_are_refused(name: str, kind: str, why: str) -> None:
    with pytest.raises(ArchiveError, match=why):
        member_path(name, kind)  # type: ignore[arg-type]


_SEGMENT = st.text(
    st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)), min_size=1, max_size=8
)


@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_an_accepted_member_never_leaves_the_directory(parts: list[str]) -> None:
    name = "/".join(parts)
    try:
        rel = member_path(name, "file")
    except ArchiveError:
        return
    assert rel is not None
    joined = posixpath.normpath(posixpath.join("/dest", rel))
    assert joined.startswith("/dest/")
    assert ".." not in rel.split("/") and not rel.startswith("/")


def test_directory_entries_are_skipped() -> None:
    assert member_path("adapter/", "dir") is None
    assert member_path("./", "dir") is None
    assert member_path("./adapter/x.json", "file") == "adapter/x.json"


def test_adapter_root_at_top_or_under_one_directory() -> None:
    assert adapter_root(["adapter_config.json", "adapter_model.safetensors"]) == ""
    assert adapter_root(["sql/adapter_config.json", "sql/adapter_model.safetensors"]) == "sql"
    with pytest.raises(ArchiveError, match="no adapter_config\\.json"):
        adapter_root(["a/adapter_config.json", "b/x"])
    with pytest.raises(ArchiveError, match="no adapter_config\\.json"):
        adapter_root(["README.md"])
