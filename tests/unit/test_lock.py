"""One run per output: the lock of rayscreen.store.lock, taken by real processes."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rayscreen.store.lock import OutputLockedError, acquire, lock_uri, output_lock, read_lock, release

HOLDER = textwrap.dedent("""
    import sys, time
    from rayscreen.store.lock import acquire
    acquire(sys.argv[1], "rayscreen train", {so})
    print("held", flush=True)
    time.sleep(600)
""")


def hold_in_another_process(output, storage_options=None):
    """A real second process that takes the lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(so=repr(storage_options)), output],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_taken_counted_and_removed(tmp_path):
    output = str(tmp_path / "out")
    with output_lock(output, "rayscreen run"):
        record = read_lock(output)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["what"] == "rayscreen run"
        with output_lock(output, "rayscreen train"):  # the stage inside the run: counted, not refused
            assert read_lock(output)["token"] == record["token"]
        assert read_lock(output) == record  # the inner release left the run's lock
    assert read_lock(output) is None and not os.path.exists(lock_uri(output))


def test_lock_is_removed_when_the_stage_fails(tmp_path):
    output = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with output_lock(output, "rayscreen infer"):
            raise RuntimeError("boom")
    assert read_lock(output) is None


def test_second_process_is_refused_then_takes_over_when_the_first_dies(tmp_path, caplog):
    output = str(tmp_path / "out")
    proc = hold_in_another_process(output)
    try:
        with pytest.raises(OutputLockedError) as e:
            acquire(output, "rayscreen run")
        message = str(e.value)
        assert f"pid {proc.pid}" in message and "rayscreen train" in message and lock_uri(output) in message
        assert read_lock(output)["pid"] == proc.pid  # the refused run left the lock alone
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed (no release): its lock is stale, taken over with a warning
    with caplog.at_level(logging.WARNING, logger="rayscreen.store.lock"):
        with output_lock(output, "rayscreen run"):
            assert read_lock(output)["pid"] == os.getpid()
    assert f"process {proc.pid} on this host is gone" in caplog.text


def write_foreign_lock(output, heartbeat_age):
    os.makedirs(output, exist_ok=True)
    now = time.time()
    record = {"token": "t", "host": "another-host.example", "pid": 1, "what": "rayscreen profile",
              "started": now - heartbeat_age - 5, "heartbeat": now - heartbeat_age}
    with open(lock_uri(output), "w") as f:
        json.dump(record, f)


def test_lock_of_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path):
    output = str(tmp_path / "out")
    write_foreign_lock(output, heartbeat_age=30)
    with pytest.raises(OutputLockedError, match="another-host.example.*last heartbeat 30 s ago"):
        acquire(output, "rayscreen run", stale_after_s=600)
    write_foreign_lock(output, heartbeat_age=700)
    with output_lock(output, "rayscreen run", stale_after_s=600):
        assert read_lock(output)["host"] == socket.gethostname()


def write_same_host_lock(output, pid, heartbeat_age, token="dead", **fields):
    """A lock of this host, as a run with ``pid`` would have left it ``heartbeat_age`` s ago
    (``fields``: ``pid_start``, ``boot_id``; none, as a record written before they existed)."""
    os.makedirs(output, exist_ok=True)
    now = time.time()
    record = {"token": token, "host": socket.gethostname(), "pid": pid, "what": "rayscreen run",
              "started": now - heartbeat_age - 5, "heartbeat": now - heartbeat_age, **fields}
    with open(lock_uri(output), "w") as f:
        json.dump(record, f)
    return record


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat")
                                or not os.path.exists("/proc/sys/kernel/random/boot_id"),
                                reason="process start times and boot ids come from Linux's /proc")


def proc_start(pid):
    """Field 22 of /proc/<pid>/stat, read independently of the module."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@needs_proc
def test_the_lock_records_its_holders_start_time_and_boot_id(tmp_path):
    output = str(tmp_path / "out")
    with output_lock(output, "rayscreen run", heartbeat_s=0.02):
        record = read_lock(output)
        assert record["pid_start"] == proc_start(os.getpid()) and record["boot_id"] == boot_id()
        assert record["pid_ns"] == os.readlink("/proc/self/ns/pid")
        time.sleep(0.1)
        beaten = read_lock(output)  # the heartbeat keeps them
        assert beaten["heartbeat"] > record["heartbeat"]
        assert (beaten["pid_start"], beaten["boot_id"]) == (record["pid_start"], record["boot_id"])


@needs_proc
def test_a_start_time_is_read_after_the_last_parenthesis(tmp_path):
    """The command name (field 2) may hold spaces and ')': a process that names itself so."""
    from rayscreen.store.lock import _pid_start

    code = ("import sys; start = open('/proc/self/stat').read().split()[21]; "
            "open('/proc/self/comm', 'w').write('x) 1 2 (y'); print(start, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        start = int(proc.stdout.readline())
        with open(f"/proc/{proc.pid}/stat") as f:
            assert "(x) 1 2 (y)" in f.read()
        assert _pid_start(proc.pid) == start
    finally:
        proc.kill()
        proc.wait()
    assert _pid_start(2 ** 22 + 12345) is None  # no such process


PAUSED_HOLDER = textwrap.dedent("""
    import sys, time
    from rayscreen.store.lock import output_lock
    with output_lock(sys.argv[1], "rayscreen run (paused)", heartbeat_s=0.1):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_paused_holder_on_this_host_keeps_its_lock_however_old_its_heartbeat(tmp_path):
    """Ctrl-Z, a debugger, a suspended laptop: the run is alive and beats again when it resumes.
    Its heartbeat ages while it is stopped; no second run may take its output meanwhile."""
    from rayscreen.store.lock import live_holder, stale_reason

    output = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_HOLDER, output], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.5)  # fifteen missed beats
        record = read_lock(output)
        assert record["pid"] == proc.pid and time.time() - record["heartbeat"] > 1.0
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} on host"):
            acquire(output, "rayscreen run", stale_after_s=1.0)
        assert stale_reason(record, time.time() + 10 ** 6, stale_after_s=1.0) is None  # however old
        assert live_holder(output, stale_after_s=1.0) == record
        # older still, as the file says: the same
        with open(lock_uri(output), "w") as f:
            json.dump({**record, "heartbeat": time.time() - 7200}, f)
        with pytest.raises(OutputLockedError, match="last heartbeat 7200 s ago"):
            acquire(output, "rayscreen run", stale_after_s=600)
        os.kill(proc.pid, signal.SIGCONT)  # resumed: it beats again, its lock still its own
        deadline = time.time() + 10
        while time.time() - read_lock(output)["heartbeat"] > 5 and time.time() < deadline:
            time.sleep(0.05)
        assert read_lock(output)["token"] == record["token"] and time.time() - read_lock(output)["heartbeat"] < 5
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_a_live_same_host_holder_keeps_its_lock_whatever_its_heartbeat(tmp_path):
    """A record written before start times and boot ids were recorded (or without /proc, as on
    macOS): a live pid on this host keeps the lock, a gone one does not."""
    from rayscreen.store.lock import stale_reason

    output = str(tmp_path / "out")
    other = os.getppid()  # alive, on this host, not this process
    record = write_same_host_lock(output, other, heartbeat_age=7200)
    assert "pid_start" not in record and "boot_id" not in record
    assert stale_reason(record, time.time(), stale_after_s=600) is None
    assert stale_reason(record, time.time() + 10 ** 6, stale_after_s=600) is None
    with pytest.raises(OutputLockedError, match=f"pid {other} on host .*last heartbeat 7200 s ago"):
        acquire(output, "rayscreen run", stale_after_s=600)
    assert read_lock(output) == record
    gone = {**record, "pid": 2 ** 22 + 12345}  # above pid_max: no such process
    assert stale_reason(gone, time.time()) == f"process {gone['pid']} on this host is gone"


def test_without_proc_a_live_pid_keeps_the_lock(tmp_path, monkeypatch):
    """Where the start time and boot id cannot be read (macOS), the recorded ones tell nothing."""
    from rayscreen.store import lock

    monkeypatch.setattr(lock, "_pid_start", lambda pid: None)
    monkeypatch.setattr(lock, "_boot_id", lambda: None)
    record = write_same_host_lock(str(tmp_path / "out"), os.getppid(), heartbeat_age=7200,
                                  pid_start=1, boot_id="another-boot")
    assert lock.stale_reason(record, time.time(), stale_after_s=600) is None


@needs_proc
def test_a_same_host_lock_whose_pid_was_reused_is_stale(tmp_path, caplog):
    """A container restarted after an OOM kill: the dead run's pid now belongs to another live
    process, which started later than the run that took the lock. Stale at once."""
    from rayscreen.store.lock import stale_reason

    output = str(tmp_path / "out")
    other = os.getppid()
    same = write_same_host_lock(output, other, heartbeat_age=0, pid_start=proc_start(other), boot_id=boot_id())
    assert stale_reason(same, time.time() + 10 ** 6) is None  # the holder itself: live, however old its beat
    reused = write_same_host_lock(output, other, heartbeat_age=0, pid_start=proc_start(other) - 1,
                                  boot_id=boot_id())
    assert "its pid was reused" in stale_reason(reused, time.time())
    with caplog.at_level(logging.WARNING, logger="rayscreen.store.lock"):
        with output_lock(output, "rayscreen run", stale_after_s=600):  # a fresh heartbeat does not save it
            assert read_lock(output)["pid"] == os.getpid() and read_lock(output)["token"] != "dead"
    assert f"process {other} on this host started at {proc_start(other)} clock ticks" in caplog.text
    assert read_lock(output) is None


@needs_proc
@needs_proc
@pytest.mark.parametrize("field, theirs", [("boot_id", "00000000-0000-0000-0000-000000000000"),
                                           ("pid_ns", "pid:[1]")])
def test_a_lock_of_another_boot_or_pid_namespace_goes_by_its_heartbeat(tmp_path, field, theirs):
    """Its pid names a process this one cannot see: another boot (a reboot, or a second
    machine of the same name), or another pid namespace (containers sharing a hostname:
    host networking, one pod). Taken over once its heartbeat is old, as another host's lock;
    while it beats, kept (a reviewer's run in another pid namespace took a live lock at once)."""
    from rayscreen.store.lock import stale_reason

    output = str(tmp_path / "out")
    other = os.getppid()
    fresh = write_same_host_lock(output, other, heartbeat_age=0, pid_start=proc_start(other) + 1, **{field: theirs})
    assert stale_reason(fresh, time.time()) is None
    with pytest.raises(OutputLockedError):
        with output_lock(output, "rayscreen run"):
            pass
    old = write_same_host_lock(output, other, heartbeat_age=7200, pid_start=proc_start(other), **{field: theirs})
    assert "heartbeat is 7200 s old" in stale_reason(old, time.time())
    with output_lock(output, "rayscreen run"):
        assert read_lock(output)["token"] != "dead"


@pytest.mark.parametrize("heartbeat_age", [7200, 0])
@pytest.mark.parametrize("recorded", [False, pytest.param(True, marks=needs_proc)])
def test_a_lock_with_this_process_pid_that_it_does_not_hold_is_stale(tmp_path, caplog, heartbeat_age, recorded):
    """The restarted container's entrypoint got the dead run's pid (pids in a fresh pid
    namespace are small and repeat): the pid is alive (it is us) but we never took the lock.
    Stale at once, whatever its heartbeat says (and whatever start time it records)."""
    output = str(tmp_path / "out")
    fields = {"pid_start": proc_start(os.getpid()), "boot_id": boot_id()} if recorded else {}
    write_same_host_lock(output, os.getpid(), heartbeat_age=heartbeat_age, **fields)
    with caplog.at_level(logging.WARNING, logger="rayscreen.store.lock"):
        with output_lock(output, "rayscreen run"):
            assert read_lock(output)["token"] != "dead"
    assert f"its pid {os.getpid()} is this process's, which does not hold it" in caplog.text
    assert read_lock(output) is None


def test_a_lock_this_process_holds_is_never_stale(tmp_path):
    from rayscreen.store.lock import live_holder, stale_reason

    output = str(tmp_path / "out")
    with output_lock(output, "rayscreen run"):
        record = read_lock(output)
        assert stale_reason(record, time.time()) is None
        assert stale_reason(record, time.time() + 10_000) is None  # however late its last beat
        assert stale_reason({**record, "token": "another"}, time.time()) is not None  # not ours: ours is the pid only
        assert live_holder(output) is None  # held here: no other holder to wait for


def test_heartbeat_renews_the_lock(tmp_path):
    output = str(tmp_path / "out")
    with output_lock(output, "rayscreen run", heartbeat_s=0.02):
        first = read_lock(output)
        deadline = time.time() + 10
        beats = set()
        while len(beats) < 5 and time.time() < deadline:
            record = read_lock(output)  # never a half-written file while the beat rewrites it
            assert record["token"] == first["token"], record
            beats.add(record["heartbeat"])
        assert len(beats) == 5 and max(beats) > first["heartbeat"]
    assert read_lock(output) is None


def test_a_lock_taken_over_while_held_is_not_removed_on_release(tmp_path):
    output = str(tmp_path / "out")
    acquire(output, "rayscreen run")
    write_foreign_lock(output, heartbeat_age=0)  # another run took it over (it judged ours stale)
    release(output)
    assert read_lock(output)["host"] == "another-host.example"  # not ours to remove


@pytest.mark.integration
def test_lock_on_s3_is_exclusive(s3_bucket):
    bucket, storage_options = s3_bucket
    output = f"{bucket}/run"
    proc = hold_in_another_process(output, storage_options)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid}"):
            acquire(output, "rayscreen run", storage_options)
    finally:
        proc.kill()
        proc.wait()
    with output_lock(output, "rayscreen run", storage_options):
        assert read_lock(output, storage_options)["pid"] == os.getpid()
    assert read_lock(output, storage_options) is None


def test_a_takeover_removes_only_the_stale_lock_it_judged(tmp_path):
    """Two runs find one stale lock; the first takes it over. The second, judging the stale
    record it read, must not remove the first's fresh lock."""
    from rayscreen.store.lock import _remove_stale
    from rayscreen.store.uri import filesystem

    output = str(tmp_path / "out")
    write_foreign_lock(output, heartbeat_age=10_000)
    stale = read_lock(output)
    fs, path = filesystem(lock_uri(output))
    with output_lock(output, "rayscreen train"):  # the first run took over
        fresh = read_lock(output)
        _remove_stale(fs, path, lock_uri(output), stale)  # the second run, late
        assert read_lock(output) == fresh
    _remove_stale(fs, path, lock_uri(output), stale)  # nothing there: nothing happens
    assert sorted(os.listdir(output)) == []  # no temporary or set-aside files left


def test_threads_of_one_process_share_its_lock(tmp_path):
    import threading

    output, errors = str(tmp_path / "out"), []

    def loop(what):
        try:
            for _ in range(100):
                with output_lock(output, what):
                    pass
        except Exception as e:  # noqa: BLE001 -- collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(w,)) for w in ("rayscreen infer", "rayscreen profile")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and read_lock(output) is None


def test_a_report_still_runs_while_another_run_holds_the_output(tmp_path, monkeypatch):
    """A look at a long run's progress: `rayscreen report` reads the run and writes report/;
    it runs beside the holder, leaving its lock, config.yaml and stage markers alone."""
    from rayscreen import pipeline
    from rayscreen.config import config_from_dict

    calls = []
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: (lambda config, progress=True: calls.append(stage)))
    output = tmp_path / "out"
    config = config_from_dict({"plates": ["p.zarr"], "output": str(output)})
    proc = hold_in_another_process(str(output))
    try:
        pipeline.run_stage(config, "report", progress=False)
        assert calls == ["report"] and read_lock(str(output))["pid"] == proc.pid
        assert sorted(p.name for p in output.iterdir()) == [".rayscreen.lock"]  # no config.yaml, no marker
        with pytest.raises(OutputLockedError):  # every other stage is refused
            pipeline.run_stage(config, "aggregate", progress=False)
    finally:
        proc.kill()
        proc.wait()
    pipeline.run_stage(config, "report", progress=False)  # the output free again: the usual path
    assert (output / "config.yaml").exists() and (output / "stages" / "report.json").exists()
    assert read_lock(str(output)) is None


def write_stale_s3_lock(output, storage_options):
    from rayscreen.store.uri import filesystem

    fs, path = filesystem(lock_uri(output), storage_options)
    record = {"token": "t", "host": "another-host.example", "pid": 1, "what": "rayscreen profile",
              "started": time.time() - 10_000, "heartbeat": time.time() - 9_000}
    fs.pipe_file(path, json.dumps(record).encode())
    return fs, path


@pytest.mark.integration
def test_a_late_takeover_on_s3_does_not_delete_the_winners_lock(s3_bucket):
    """S3 cannot delete conditionally: two runs that read one stale lock must not both go on.
    The first wins the takeover claim; the second, late, removes nothing."""
    from rayscreen.store.lock import CLAIM_KEEP_S, _remove_stale

    bucket, storage_options = s3_bucket
    output = f"{bucket}/run"
    fs, path = write_stale_s3_lock(output, storage_options)
    stale = read_lock(output, storage_options)
    with output_lock(output, "rayscreen train", storage_options):  # the first run took over
        fresh = read_lock(output, storage_options)
        assert fresh["pid"] == os.getpid()
        assert _remove_stale(fs, path, lock_uri(output), stale) is False  # the second run, late
        assert read_lock(output, storage_options) == fresh
    assert read_lock(output, storage_options) is None
    claim = f"{path}.takeover-t-0"
    assert fs.exists(claim)  # kept: it still guards against a late reader of the stale record
    # an hour later a release tidies it away
    record = json.loads(fs.cat_file(claim))
    fs.pipe_file(claim, json.dumps({**record, "at": time.time() - CLAIM_KEEP_S - 1}).encode())
    with output_lock(output, "rayscreen run", storage_options):
        pass
    fs.invalidate_cache()
    assert not fs.exists(claim) and read_lock(output, storage_options) is None


RACER = textwrap.dedent("""
    import sys, time
    from rayscreen.store.lock import OutputLockedError, acquire
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all racers start together
    try:
        acquire(sys.argv[1], "rayscreen run", {so})
    except OutputLockedError:
        print("refused", flush=True)
    else:
        print("held", flush=True)
        time.sleep(20)
""")


@pytest.mark.integration
def test_racers_for_one_stale_s3_lock_let_exactly_one_run(s3_bucket):
    bucket, storage_options = s3_bucket
    output = f"{bucket}/run"
    write_stale_s3_lock(output, storage_options)
    start_at = time.time() + 8  # after every racer has imported s3fs
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(so=repr(storage_options)), output, str(start_at)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        answers = sorted(p.stdout.readline().strip() for p in procs)
        assert answers == ["held", "refused", "refused", "refused"], answers
        holder = read_lock(output, storage_options)
        assert holder["pid"] in {p.pid for p in procs}
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.integration
def test_a_takeover_whose_claimer_died_is_claimed_again_once_its_claim_is_stale(s3_bucket):
    """A run that won the claim and died (or met an S3 error) before deleting the stale lock
    must not block the output for ever: its claim ages like a lock's heartbeat."""
    bucket, storage_options = s3_bucket
    output = f"{bucket}/run"
    fs, path = write_stale_s3_lock(output, storage_options)
    dead = {"token": "c", "stale_token": "t", "host": "another-host.example", "pid": 1, "at": time.time()}
    fs.pipe_file(f"{path}.takeover-t-0", json.dumps(dead).encode())
    with pytest.raises(OutputLockedError, match="takeover-"):  # a fresh claim: another run is on it
        acquire(output, "rayscreen run", storage_options, stale_after_s=600)
    fs.pipe_file(f"{path}.takeover-t-0", json.dumps({**dead, "at": time.time() - 700}).encode())
    with output_lock(output, "rayscreen run", storage_options, stale_after_s=600):
        assert read_lock(output, storage_options)["pid"] == os.getpid()
    fs.invalidate_cache()
    assert fs.exists(f"{path}.takeover-t-1")
