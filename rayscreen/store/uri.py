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
import json
import os
import re
from typing import Any, Sequence

import fsspec
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .errors import CorruptDataError, MissingChunkError, RayscreenError

# A key holds a secret when its name, lower-cased with camelCase and '-' turned into '_'
# ("secretAccessKey" -> "secret_access_key", "X-Amz-Security-Token" -> "x_amz_security_token"),
# ends in one of these words (a whole name, a '_'-joined last word, or one glued on as in
# "apikey", "authtoken", "dbpassword"): s3fs key/secret/token, botocore
# aws_access_key_id/aws_secret_access_key/aws_session_token, adlfs account_key/sas_token/
# connection_string/credential/client_secret, gcsfs token/credentials, sftp password/pkey/
# passphrase, HTTP Authorization/Proxy-Authorization/Cookie/X-Api-Key headers, aiohttp auth.
# The end of the name, not anywhere in it: a substring test also masked settings such as
# config_kwargs.signature_version, key_prefix, sse_kms_key_id, max_keys or author, and a
# recorded config (whose masked values drop_masked leaves out) then ran without them.
# A masked setting is a changed run, a leaked secret is worse: a name that ends in one of
# these words is masked even when it may not be a secret (a "cache_key"), and an identifier
# that is only half a credential (access_key_id) is masked too. A plural is the same word
# ("secrets", "api_keys", "cookies", "passwords": a list or dict of them), except where a
# count prefix says the setting counts them ("max_keys", "num_tokens").
_SECRET_NAMES = ("key", "secret", "token", "password", "passwd", "passphrase", "credential", "credentials",
                 "connection_string", "sas", "signature", "auth", "authorization", "cookie", "access_key_id")
# a plural credential word after one of these names a number, not credentials (s3fs's max_keys)
_COUNT_PREFIXES = ("max_", "min_", "num_", "n_", "number_of_", "count_")
# gcsfs's token may name a way to find credentials instead of holding one: shown as it is
_TOKEN_MODES = ("anon", "google_default", "cloud", "browser")

# Keys that hold metadata, not chunks: their absence is normal while probing formats.
_METADATA_SUFFIXES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def local_path(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def absolute(uri: str) -> str:
    """A local path made absolute (``file://`` dropped); a remote URI as given. Paths are
    handed to Ray workers, which may run in another directory than the driver: Ray Train
    runs its workers in a directory of its own, and a cluster started elsewhere keeps its
    own working directory."""
    uri = str(uri)
    return uri if is_remote(uri) else os.path.abspath(local_path(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without ``os.path`` mangling ``s3://``."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


MASK = "***"  # what redact writes in place of a secret


def is_secret_name(key: str) -> bool:
    """Whether a storage option (or header) named ``key`` holds a credential (see ``_SECRET_NAMES``)."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key)).lower().replace("-", "_")
    if name.endswith(_SECRET_NAMES):
        return True
    # a plural ("tokens", "api_keys", "cookies"), unless a count of them ("max_keys")
    return name.endswith("s") and name[:-1].endswith(_SECRET_NAMES) and not name.startswith(_COUNT_PREFIXES)


def redact(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy safe to print: secret values replaced by ``***``."""

    def secret(key: str, value: Any) -> bool:
        if value is None or (key.lower() == "token" and value in _TOKEN_MODES):
            return False
        return is_secret_name(key)

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: MASK if secret(str(k), v) else scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        if isinstance(value, str):  # a password inside a URL (endpoint_url: http://user:pw@host:9000)
            return mask_url_passwords(value)
        return value

    return scrub(dict(storage_options or {}))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# scheme://user:password@host: the authority ends at the first '/', '?' or '#' after '://',
# the userinfo at its last '@', the user at the userinfo's first ':' (urllib.parse.urlsplit's
# reading, which raises on some authorities, such as an unclosed '[')
# (the user part holds no '[' or ']': an IPv6 host, http://[::1]:9000/a@b, is no password)
_AUTHORITY_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#\[\]]*:)([^/?#]*)@")
# scheme://user:pass/word@host: no URL parser reads a password holding '/', '?' or '#' unencoded
# (the authority ends there), but a person writes one: masked to the last '@', unless what
# follows the ':' up to the '/' (or the end) is a port number
_BROKEN_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#\[\]]*:)(?![0-9]*(?:[/?#]|$))\S*@")


def mask_url_passwords(text: str) -> str:
    """``text`` with the password of each URL in it replaced by ``***``.

    The password is read as :func:`urllib.parse.urlsplit` reads it: the authority runs from
    ``://`` to the next ``/``, ``?`` or ``#``, its userinfo to its last ``@`` and the password
    from the userinfo's first ``:``, so one holding ``@`` is masked whole
    (``http://user:p@ss@host/x`` -> ``http://user:***@host/x``). A password holding an
    unencoded ``/``, ``?`` or ``#`` ends the authority early for every URL parser and HTTP
    client (``http://u:a/b@host`` is host ``u``, port ``a``, path ``/b@host``; encode it as
    ``%2F``): rather than show it, everything from ``u:`` to the last ``@`` in the URL is
    masked (``http://u:***@host``), unless what follows ``u:`` up to the ``/`` is a port number
    (``http://host:9000/p?mail=a@b`` is kept, and so is ``http://u:1234/5@host``). An empty
    password hides nothing and is kept; so is text that is not a ``scheme://`` URL.
    """
    if "://" not in text or "@" not in text:
        return text
    return _URL.sub(lambda m: _mask_url_password(m.group(0)), text)


def _mask_url_password(url: str) -> str:
    found = _AUTHORITY_PASSWORD.match(url)
    if found:
        return url if not found.group(2) else f"{found.group(1)}{MASK}@{url[found.end():]}"
    found = _BROKEN_PASSWORD.match(url)
    return f"{found.group(1)}{MASK}@{url[found.end():]}" if found else url


def drop_masked(storage_options: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[str]]:
    """``storage_options`` without the values :func:`redact` masked, and the dotted keys
    dropped: a recorded config (``<output>/config.yaml``) used again must not hand s3fs
    ``***`` as a key, which fails as a confusing access denied."""
    dropped: list[str] = []

    def clean(value: Any, prefix: str) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if v == MASK or (isinstance(v, str) and f":{MASK}@" in v):
                    dropped.append(f"{prefix}{k}")
                else:
                    out[k] = clean(v, f"{prefix}{k}.")
            return out
        return value

    if not storage_options:
        return storage_options, dropped
    return clean(storage_options, "storage_options."), dropped


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for sidecar files (tables, reports)."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(local_path(uri))
    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


class StrictStore(WrapperStore):
    """A store wrapper that raises on a missing chunk and on a truncated blosc chunk.

    zarr fills an absent chunk with the array's fill value, so a lost or never-written
    chunk would read back silently as zeros. Raising here costs no extra request: the
    read that found nothing is the one that raises. ``fill_missing=True`` keeps zarr's
    filling (for foreign plates written without empty chunks) but still checks chunks.

    A truncated blosc chunk is worse than a missing one: Zarr v2 chunks carry no checksum
    and c-blosc trusts the compressed size in the chunk's header, so a chunk cut short (an
    interrupted copy) can decode into wrong pixels, nondeterministically, with no error.
    So before zarr decodes a chunk of an array whose chunks are bare blosc frames, the
    header's ``cbytes`` (bytes 12-16, little-endian uint32) must equal the chunk's length,
    or ``CorruptDataError`` names the chunk. That reads 4 bytes of a buffer already fetched:
    no request, no decode. Which arrays those are is learnt from the array metadata that
    zarr reads through this store anyway (``.zarray``, ``zarr.json``, consolidated
    ``.zmetadata``/``zarr.json``), so it costs no request either.

    Other codecs need no such check: numcodecs' zstd, zlib, gzip, lz4, bz2 and lzma all
    raise on a truncated stream (checked with numcodecs 0.16), and Zarr v3 chunks ending
    in a crc32c codec (rayscreen writes blosc + crc32c) fail their checksum.
    """

    def __init__(self, store, *, fill_missing: bool = False, _blosc: dict[str, bool] | None = None) -> None:
        super().__init__(store)
        self.fill_missing = fill_missing
        # array prefix ("A/1/0/0/") -> whether its chunks are bare blosc frames
        self._blosc: dict[str, bool] = {} if _blosc is None else _blosc

    def _with_store(self, store):
        return type(self)(store, fill_missing=self.fill_missing, _blosc=self._blosc)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        if key.endswith(_METADATA_SUFFIXES):
            if value is not None and byte_range is None:
                self._learn(key, value)
        elif value is None:
            if not self.fill_missing:
                raise MissingChunkError(f"chunk {key!r} is missing from {self._store}")
        elif byte_range is None and self._is_blosc_chunk(key):
            self._check_blosc(key, value)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        # byte ranges (shards' inner chunks) are not whole blosc frames: only the missing check
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and not self.fill_missing and not key.endswith(_METADATA_SUFFIXES):
                raise MissingChunkError(f"chunk {key!r} is missing from {self._store}")
        return values

    # -- which arrays have bare blosc chunks, learnt from the metadata zarr reads
    def _learn(self, key: str, value: Buffer) -> None:
        name = key.rsplit("/", 1)[-1]
        if name not in (".zarray", ".zmetadata", "zarr.json"):
            return
        base = key[: -len(name)]
        try:
            meta = json.loads(value.to_bytes())
            if name == ".zarray":
                self._blosc[base] = _v2_bare_blosc(meta)
            elif name == ".zmetadata":
                for path, node in (meta.get("metadata") or {}).items():
                    if path.rsplit("/", 1)[-1] == ".zarray":
                        self._blosc[base + path[: -len(".zarray")]] = _v2_bare_blosc(node)
            elif meta.get("node_type") == "array":
                self._blosc[base] = _v3_bare_blosc(meta)
            else:
                consolidated = (meta.get("consolidated_metadata") or {}).get("metadata") or {}
                for path, node in consolidated.items():
                    if node.get("node_type") == "array":
                        self._blosc[f"{base}{path.strip('/')}/"] = _v3_bare_blosc(node)
        except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
            pass  # unreadable metadata: zarr reports it itself; its chunks go unchecked

    def _is_blosc_chunk(self, key: str) -> bool:
        if not self._blosc:
            return False
        parts = key.split("/")
        for i in range(len(parts) - 1, -1, -1):  # the longest known array prefix holds the chunk
            found = self._blosc.get("/".join(parts[:i]) + "/" if i else "")
            if found is not None:
                return found
        return False

    def _check_blosc(self, key: str, value: Buffer) -> None:
        size = len(value)
        declared = int.from_bytes(value[12:16].to_bytes(), "little") if size >= _BLOSC_HEADER else None
        if declared != size:
            header = "is shorter than a blosc header" if declared is None else f"its blosc header declares {declared}"
            raise CorruptDataError(f"chunk {key!r} in {self._store} is truncated or damaged: it holds {size} bytes "
                                   f"and {header}")


_BLOSC_HEADER = 16


def _v2_bare_blosc(meta: dict) -> bool:
    compressor = meta.get("compressor")
    return isinstance(compressor, dict) and compressor.get("id") == "blosc"


def _v3_bare_blosc(meta: dict) -> bool:
    """Whether a v3 array's stored chunks are blosc frames: blosc is the last codec (no crc32c
    after it, no sharding)."""
    codecs = meta.get("codecs") or []
    last = codecs[-1] if codecs else None
    name = last.get("name") if isinstance(last, dict) else last
    return name == "blosc"


def zarr_storage_options(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` for a Zarr store at ``uri``: on S3, ``max_concurrency`` 1 unless
    the user set it. s3fs (2026.9) asks for an object's size (a HEAD request) before every
    whole-object GET when ``max_concurrency`` > 1 (its default, 10), to split objects over
    its 50 MiB block size into parallel ranges; Zarr chunks and metadata are far smaller,
    so the HEAD doubled the requests of every read (benchmarks/s3_read.py). Concurrency
    comes from reading many chunks at once instead."""
    if fsspec.utils.get_protocol(str(uri)) not in ("s3", "s3a"):
        return storage_options
    options = dict(storage_options or {})
    options.setdefault("max_concurrency", 1)
    return options


def make_store(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = True,
    strict: bool = True,
    check_chunks: bool = False,
) -> zarr.abc.store.Store:
    """A zarr store for ``uri``; ``strict`` raises on missing chunks instead of filling.

    A strict store also refuses truncated blosc chunks (see ``StrictStore``);
    ``check_chunks=True`` keeps that check on a non-strict store, whose missing chunks fill.
    """
    if is_remote(uri):
        store = FsspecStore.from_url(str(uri), storage_options=zarr_storage_options(uri, storage_options),
                                     read_only=read_only)
    else:
        store = LocalStore(os.path.abspath(local_path(uri)), read_only=read_only)
    if strict or check_chunks:
        return StrictStore(store, fill_missing=not strict)
    return store


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file at ``uri`` if there is one."""
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path)


def expand_uris(uris: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Plate URIs from URIs or globs, local (``plates/*.zarr``) or remote
    (``s3://bucket/screen/*.zarr``, listed through fsspec with ``storage_options``).

    Each glob is replaced by its matches, sorted; remote matches keep their protocol
    (``s3://...``), local ones are made absolute (:func:`absolute`). A glob matching nothing
    is an error naming it. Other entries are kept (local ones made absolute, trailing ``/``
    removed), unchecked. A plate listed twice (overlapping globs,
    ``[screen/*.zarr, screen/A.zarr]``) is kept once, where it first appears: streaming it
    twice would give every field of it twice under the same (plate, well, field) key.
    """
    out: list[str] = []
    for uri in [uris] if isinstance(uris, str) else list(uris):
        uri = str(uri)
        if not any(ch in uri for ch in "*?["):
            out.append(absolute(uri.rstrip("/")))
            continue
        if is_remote(uri):
            fs, path = filesystem(uri, storage_options)
            found = sorted(fs.unstrip_protocol(p).rstrip("/") for p in fs.glob(path.rstrip("/")))
        else:
            found = sorted(absolute(p.rstrip("/")) for p in glob.glob(local_path(uri)))
        if not found:
            raise RayscreenError(f"plate glob {uri!r} matches nothing")
        out += found
    return list(dict.fromkeys(out))
