"""Paths that are local folders or s3:// URLs, through fsspec (s3fs) and pyarrow."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageConfig:
    """Object-store settings; empty values fall back to the usual AWS environment and files."""

    endpoint_url: str | None = None  # S3-compatible endpoint (e.g. http://127.0.0.1:9000); AWS if unset
    key: str | None = None  # access key id (else AWS_ACCESS_KEY_ID / profiles / instance role)
    secret: str | None = None  # secret access key
    region: str | None = None  # region name
    anon: bool = False  # anonymous access to public buckets

    def options(self, url: str) -> dict:
        """fsspec storage options for a URL (empty for local paths)."""
        if not url.startswith("s3://"):
            return {}
        opts: dict = {"anon": self.anon}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        client = {k: v for k, v in (("endpoint_url", self.endpoint_url), ("region_name", self.region)) if v}
        if client:
            opts["client_kwargs"] = client
        return opts


def filesystem(url: str, storage: StorageConfig = StorageConfig()) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URL and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url, **storage.options(url))
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem over an fsspec one (local stays native)."""
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and object keys alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def write_json(fs: fsspec.AbstractFileSystem, path: str, doc: dict) -> None:
    """Write a JSON document (a single PUT on object stores, so readers never see half of it)."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """Read a JSON document."""
    with fs.open(path, "r") as f:
        return json.loads(f.read())


def is_url(path: str) -> bool:
    """True for URLs (s3://...), False for local paths."""
    return "://" in path


def key(path: str) -> str:
    """The path inside its filesystem: a URL without its scheme, a local path as given."""
    return path.split("://", 1)[-1]


def with_scheme(path: str, like: str) -> str:
    """A path inside a filesystem (as fsspec and Ray return them) as a URL of `like`'s scheme;
    unchanged when `like` is local."""
    return f"{like.split('://', 1)[0]}://{key(path)}" if is_url(like) else path


def absolute(path: str) -> str:
    """A storage root as every process must see it: URLs as given, local paths made absolute."""
    return path if is_url(path) else os.path.abspath(path)


def is_absolute(path: str) -> bool:
    """A URL or an absolute local path (not relative to some folder)."""
    return is_url(path) or path.startswith("/")
