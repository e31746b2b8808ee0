"""URIs of plates and results: local paths, ``file://`` and ``s3://`` (any fsspec protocol).

Filesystems and zarr stores are created lazily in the process that uses them: fsspec's
async filesystems (s3fs) hold an event loop and sockets that do not survive a fork or a
pickle, so objects that travel to Ray workers carry only the URI and options.

Credentials are never taken from or written to rayscreen's own files: s3fs finds them in
the standard places (environment, AWS profile, instance role) or ``anon=True`` is passed
in ``storage_options``. ``redact`` keeps secrets out of messages and logs.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import fsspec
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import MissingChunkError, RayscreenError

_SECRET_KEYS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token")

# Keys that hold metadata, not chunks: their absence is normal while probing formats.
_METADATA_SUFFIXES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without ``os.path`` mangling ``s3://``."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def redact(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy safe to print: secret values replaced by ``***``."""

    def scrub(d: dict) -> dict:
        return {
            k: ("***" if any(s in k.lower() for s in _SECRET_KEYS) else scrub(v) if isinstance(v, dict) else v)
            for k, v in d.items()
        }

    return scrub(dict(storage_options or {}))


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for sidecar files (tables, reports)."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(local_path(uri))
    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


class StrictStore(WrapperStore):
    """A store wrapper that raises on a missing chunk.

    zarr fills an absent chunk with the array's fill value, so a lost or never-written
    chunk would read back silently as zeros. Raising here costs no extra request: the
    read that found nothing is the one that raises.
    """

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if value is None and not key.endswith(_METADATA_SUFFIXES):
            raise MissingChunkError(f"chunk {key!r} is missing from {self._store}")
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and not key.endswith(_METADATA_SUFFIXES):
                raise MissingChunkError(f"chunk {key!r} is missing from {self._store}")
        return values


def make_store(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = True,
    strict: bool = True,
) -> zarr.abc.store.Store:
    """A zarr store for ``uri``; ``strict`` raises on missing chunks instead of filling."""
    if is_remote(uri):
        store = FsspecStore.from_url(str(uri), storage_options=storage_options, read_only=read_only)
    else:
        store = LocalStore(os.path.abspath(local_path(uri)), read_only=read_only)
    return StrictStore(store) if strict else store


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def expand_uris(uris: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Plate URIs from URIs or globs, local (``plates/*.zarr``) or remote
    (``s3://bucket/screen/*.zarr``, listed through fsspec with ``storage_options``).

    Each glob is replaced by its matches, sorted; remote matches keep their protocol
    (``s3://...``). A glob matching nothing is an error naming it. Other entries are kept
    as given (trailing ``/`` removed), unchecked.
    """
    out: list[str] = []
    for uri in [uris] if isinstance(uris, str) else list(uris):
        uri = str(uri)
        if not any(ch in uri for ch in "*?["):
            out.append(uri.rstrip("/"))
            continue
        if is_remote(uri):
            fs, path = filesystem(uri, storage_options)
            found = sorted(fs.unstrip_protocol(p).rstrip("/") for p in fs.glob(path.rstrip("/")))
        else:
            found = sorted(glob.glob(uri))
        if not found:
            raise RayscreenError(f"plate glob {uri!r} matches nothing")
        out += found
    return out
