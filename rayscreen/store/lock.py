"""One run at a time per output: ``<output>/.rayscreen.lock``.

Two runs writing one output (two ``rayscreen run`` of one config, a job resubmitted while
the first still runs) would interleave their stores: one run may delete a store the
other is still creating. A stage takes the lock for its output before it writes anything
and removes it when it ends, however it ends.

The lock file is JSON: ``{"token", "host", "pid", "pid_start", "boot_id", "pid_ns", "what",
"started", "heartbeat"}`` (times in seconds since the epoch; ``pid_start`` is the holder's
start time from ``/proc/<pid>/stat``, ``boot_id`` the kernel's
``/proc/sys/kernel/random/boot_id`` and ``pid_ns`` the holder's pid namespace, all null where
there is no ``/proc``, as on macOS). It is created exclusively and whole: a
hard link of a written file on a local disk, a conditional PUT (``If-None-Match: *``) on S3;
other fsspec filesystems check then write and read the file back, which leaves a narrow race.
While the lock is held a daemon thread rewrites ``heartbeat`` every ``heartbeat_s`` seconds.

A lock left behind by a run that died is taken over, with a warning. On this host, in this
boot and pid namespace, that is as soon as its process is gone, or its pid belongs to
another process than the one that took it (the pid's start time differs from the recorded
one: after a container restart, whose fresh pid namespace gives out small pids again, the
dead run's pid may belong to any process), or its pid is this very process, which does not
hold it. A lock recorded in another boot or pid namespace (a reboot; containers that share a
hostname but not their pids; two machines of one name) goes by its heartbeat, as another
host's. A live holder on this host, the very process that took the lock, keeps it however
old its heartbeat: a run that is paused (Ctrl-Z, SIGSTOP, a debugger, a suspended laptop)
beats again when it resumes and must find its output untouched. Without ``/proc`` or with a
record written before those fields existed, a live pid keeps the lock. A lock of another host
is taken over when its heartbeat is older than ``stale_after_s``; while it beats it is never
taken over. Otherwise :class:`OutputLockedError` names the run that holds it and the file to
delete if that run is known to be dead (a hung run on this host keeps its lock until then).
On S3, where a delete cannot be conditional, a takeover first wins a claim object
(conditional PUT) named after the stale lock, so two runs finding one stale lock cannot
both go on.

Taking the lock again in the process that holds it (``rayscreen run`` holds it across
its stages, each stage takes it too) only counts; threads of one process share it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import RayscreenError
from .uri import filesystem, is_remote, join, local_path

log = logging.getLogger(__name__)

LOCK_NAME = ".rayscreen.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats


class OutputLockedError(RayscreenError):
    """Another run, alive as far as can be told, holds the output's lock."""


# lock URI -> (record, count, stop event, heartbeat thread) of the locks this process holds
_held: dict[str, list[Any]] = {}
_held_guard = threading.RLock()


def lock_uri(output: str) -> str:
    return join(output, LOCK_NAME)


def read_lock(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The lock record of ``output``, or None when it is not locked (or the file is unreadable)."""
    fs, path = filesystem(lock_uri(output), storage_options)
    try:
        return _parse(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict[str, Any]:
    """A lock record from its bytes; ``{}`` for an empty or foreign file (no record)."""
    try:
        return json.loads(data)
    except ValueError:
        return {}


def live_holder(output: str, storage_options: dict[str, Any] | None = None,
                stale_after_s: float = STALE_AFTER_S) -> dict[str, Any] | None:
    """The lock record of another run that holds ``output`` and is alive as far as can be
    told; None when it is free, stale, or held by this process."""
    with _held_guard:
        if lock_uri(output) in _held:
            return None
    record = read_lock(output, storage_options)
    if not record or stale_reason(record, time.time(), stale_after_s) is not None:
        return None
    return record


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _boot_id() -> str | None:
    """This host's boot id (a new one at every boot); None without ``/proc`` (macOS)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """When process ``pid`` started (``/proc/<pid>/stat`` field 22, clock ticks since boot):
    with the boot id it names one process, where a pid alone may be reused. None when it
    cannot be read (no ``/proc``, no such process, a ``/proc`` mounted with ``hidepid``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # field 2, the command name, is in parentheses and may hold spaces and ')': the
        # fields after it start after the last ')', with field 3 (state) first
        return int(stat[stat.rindex(b")") + 1:].split()[22 - 3])
    except (OSError, ValueError, IndexError):
        return None


def stale_reason(record: dict[str, Any], now: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the lock ``record`` belongs to no living run (None: it may be alive).

    A function of the record, this host (its processes, boot id and pid namespace), this
    process's held locks and the clock. On this host, in this boot and pid namespace, it is
    stale when its pid is gone; when the pid is alive but is not the process that took the
    lock (its ``pid_start`` differs from the live pid's start time: the pid was reused after
    a container restart); or when the pid is this process's own while this process does not
    hold the lock. Otherwise such a lock is live whatever its heartbeat: its holder may be
    paused (SIGSTOP, a debugger, a suspended laptop) and resume. Where the start time cannot be
    read (no ``/proc``) or the record has none (written before it was recorded), a live pid
    keeps the lock. Recorded in another boot or pid namespace, or on another host, it is stale
    when its heartbeat is older than ``stale_after_s``. A lock this process holds is never stale.
    """
    if not record:
        return "its lock file is unreadable"
    if record.get("host") == socket.gethostname() and _same_pid_space(record):
        pid = int(record.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return f"process {pid} on this host is gone"
        if pid == os.getpid():  # this process knows for sure whether it holds the lock
            return None if _holds(record) else (f"its pid {pid} is this process's, which does not hold it "
                                                f"(the pid of a run before a restart, reused)")
        started, live = record.get("pid_start"), _pid_start(pid)
        if isinstance(started, int) and not isinstance(started, bool) and live is not None and started != live:
            return (f"process {pid} on this host started at {live} clock ticks after boot, not at {started} "
                    f"like the run that took the lock: its pid was reused")
        return None  # the holder itself, alive: perhaps paused, never taken over
    age = now - float(record.get("heartbeat", record.get("started", 0)))
    return f"its heartbeat is {age:.0f} s old" if age > stale_after_s else None


def _same_pid_space(record: dict[str, Any]) -> bool:
    """Whether the lock's pid means a process this one can see: same boot and same pid
    namespace as recorded (unknown counts as the same: records without them, no ``/proc``).
    Containers sharing a hostname (host networking, one pod) but not their pids, or two
    machines of one name, differ here; their locks go by heartbeat, as another host's."""
    for key, ours in (("boot_id", _boot_id()), ("pid_ns", _pid_namespace())):
        theirs = record.get(key)
        if theirs and ours and theirs != ours:
            return False
    return True


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``); None without ``/proc``."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holds(record: dict[str, Any]) -> bool:
    """Whether this process holds the lock ``record`` (took it and has not released it)."""
    with _held_guard:
        return any(entry[0].get("token") == record.get("token") for entry in _held.values())


def describe(record: dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
    seen = now - float(record.get("heartbeat", record.get("started", now)))
    return (f"{record.get('what', 'a run')} (pid {record.get('pid')} on host {record.get('host')}, "
            f"started {started}, last heartbeat {seen:.0f} s ago)")


def _create(fs, path: str, data: bytes, uri: str) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it.
    Locally the record is written to a file of its own, then hard-linked to the lock's name:
    the link is atomic and fails if the lock exists, and a reader never finds the lock empty."""
    if not is_remote(uri):
        target = local_path(uri)
        tmp = _written_beside(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # s3fs: If-None-Match: * (atomic; FileExistsError on 412)
    except FileExistsError:
        return False
    # filesystems without a conditional create checked then wrote: the last writer wins
    return json.loads(fs.cat_file(path)).get("token") == json.loads(data)["token"]


def _replace(fs, path: str, data: bytes, uri: str) -> None:
    """Overwrite ``path`` so that a reader sees the old or the new bytes, never a truncated file
    (an S3 PUT is atomic; a local file is written beside and renamed over)."""
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.replace(_written_beside(local_path(uri), data), local_path(uri))


def _written_beside(target: str, data: bytes) -> str:
    """A new file of its own beside ``target`` holding ``data``; returns its path."""
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def _remove_stale(fs, path: str, uri: str, stale: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> bool:
    """Remove the lock judged stale, and only that one: another run may have taken it over
    since it was read. True when this call removed it (or it was already gone); False when
    another run is taking it over.

    Locally it is renamed aside first (one rename wins) and its token checked; a fresh lock
    moved by mistake is linked back. S3 has no conditional delete, so a run first creates a
    claim ``<lock>.takeover-<stale token>-<n>`` (a conditional PUT: one run wins it) and only
    the winner deletes. Claims are never deleted while they guard anything (deleting one
    would let a run that read the same stale record late win it again and delete the
    winner's fresh lock): a claim older than ``stale_after_s`` belongs to a run that died
    mid-takeover, and the next generation ``n + 1`` is claimed instead. :func:`release`
    removes claims an hour old."""
    if is_remote(uri):
        for generation in range(100):
            claim_path = _claim_path(path, stale, generation)
            claim = {"token": uuid.uuid4().hex, "stale_token": stale.get("token"), "host": socket.gethostname(),
                     "pid": os.getpid(), "at": time.time()}
            if _create(fs, claim_path, json.dumps(claim).encode(), uri):
                break
            try:
                held = _parse(fs.cat_file(claim_path))
            except FileNotFoundError:  # tidied away in between: try it again next time round
                return False
            if time.time() - float(held.get("at", 0)) <= stale_after_s:
                return False  # another run is taking it over now
        else:
            return False
        try:
            if _parse(fs.cat_file(path)).get("token") == stale.get("token"):
                fs.rm_file(path)
        except FileNotFoundError:
            pass
        return True
    target = local_path(uri)
    aside = f"{target}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return True
    with open(aside, "rb") as f:
        moved = _parse(f.read())
    if moved.get("token") != stale.get("token"):
        try:
            os.link(aside, target)  # someone's fresh lock: back in place (unless a newer one is there)
        except FileExistsError:
            pass
    os.unlink(aside)
    return True


CLAIM_KEEP_S = 3600.0


def _claim_path(path: str, stale: dict[str, Any], generation: int = 0) -> str:
    # an unreadable lock has no token: its claims are named by when it was judged, to the minute
    token = stale.get("token") or f"unreadable-{int(time.time() // 60)}"
    return f"{path}.takeover-{token}-{generation}"


def _drop_old_claims(fs, path: str) -> None:
    """Remove takeover claims older than an hour (a run that read a stale record acts on it
    within seconds, so an old claim no longer guards anything)."""
    prefix = path.rsplit("/", 1)[-1] + ".takeover-"
    try:
        names = [p for p in fs.ls(path.rsplit("/", 1)[0], detail=False, refresh=True)
                 if p.rsplit("/", 1)[-1].startswith(prefix)]
        for name in names:
            if time.time() - float(_parse(fs.cat_file(name)).get("at", 0)) > CLAIM_KEEP_S:
                fs.rm_file(name)
    except (FileNotFoundError, OSError) as e:  # litter at worst; never fail a finished run for it
        log.debug("could not tidy the lock's takeover claims beside %s: %s", path, e)


def acquire(output: str, what: str, storage_options: dict[str, Any] | None = None, *,
            stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> None:
    """Take ``output``'s lock for ``what`` (e.g. "rayscreen train") or raise :class:`OutputLockedError`."""
    uri = lock_uri(output)
    with _held_guard:  # the whole of it: two threads of this process never race each other
        if uri in _held:
            _held[uri][1] += 1
            return
        _acquire(output, uri, what, storage_options, stale_after_s, heartbeat_s)


def _acquire(output: str, uri: str, what: str, storage_options: dict[str, Any] | None, stale_after_s: float,
             heartbeat_s: float) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    now = time.time()
    record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _pid_start(os.getpid()), "boot_id": _boot_id(),
              "pid_ns": _pid_namespace(), "what": what,
              "started": now, "heartbeat": now}
    for _ in range(3):  # a stale lock taken over by another run in between: look again
        if _create(fs, path, json.dumps(record).encode(), uri):
            break
        other = read_lock(output, storage_options)
        if other is None:
            continue  # released in between
        reason = stale_reason(other, time.time(), stale_after_s)
        if reason is None:
            raise OutputLockedError(
                f"output {output} is in use by {describe(other, time.time())}. Two runs on one output would "
                f"overwrite each other's stores: wait for it to finish, use another output, or, if that run "
                f"is known to be dead, delete {uri}")
        if _remove_stale(fs, path, uri, other, stale_after_s):
            log.warning("taking over the lock of %s: %s, %s", output, describe(other, time.time()), reason)
        else:
            time.sleep(1.0)  # another run is taking it over: its lock will be there to read next
    else:
        raise OutputLockedError(
            f"could not take the lock {uri}: other runs keep taking it, or a run that claimed the takeover of a "
            f"stale lock died before finishing it. If no other run is live, delete {uri} and "
            f"{uri}.takeover-* beside it")
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(output, storage_options, record, stop, heartbeat_s),
                              name="rayscreen-lock-heartbeat", daemon=True)
    _held[uri] = [record, 1, stop, thread]  # the caller holds _held_guard
    thread.start()


def _beat(output: str, storage_options: dict[str, Any] | None, record: dict[str, Any], stop: threading.Event,
          every: float) -> None:
    fs, path = filesystem(lock_uri(output), storage_options)
    while not stop.wait(every):
        try:
            current = read_lock(output, storage_options)
            if not current or current.get("token") != record["token"]:
                log.warning("the lock of %s was taken by %s while this run held it", output,
                            describe(current or {}, time.time()))
                return
            _replace(fs, path, json.dumps({**record, "heartbeat": time.time()}).encode(), lock_uri(output))
        except Exception as e:  # a missed beat is not a failed run; ten in a row make the lock stale
            log.warning("could not renew the lock of %s: %s", output, e)


def release(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """Give back a lock :func:`acquire` took (the file is removed when the last holder leaves)."""
    uri = lock_uri(output)
    with _held_guard:  # the file is removed under the guard too: a thread's acquire waits for it
        entry = _held.get(uri)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[uri]
        record, _, stop, thread = entry
        stop.set()
        thread.join(10)
        current = read_lock(output, storage_options)
        if current and current.get("token") == record["token"]:  # never remove a lock another run took over
            fs, path = filesystem(uri, storage_options)
            fs.rm_file(path)
            if is_remote(uri):
                _drop_old_claims(fs, path)


@contextmanager
def output_lock(output: str, what: str, storage_options: dict[str, Any] | None = None, **kwargs) -> Iterator[None]:
    """``with output_lock(config.output, "rayscreen train", config.storage_options): ...``"""
    acquire(output, what, storage_options, **kwargs)
    try:
        yield
    finally:
        release(output, storage_options)
