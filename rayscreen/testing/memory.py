"""Peak memory of a process tree (a driver, its local Ray and Ray's workers), sampled in a
background thread. Linux only: everything is read from ``/proc``.

Used by the memory benchmarks (``benchmarks/stream.py``, ``benchmarks/infer.py``) and the
tests that run them. Read by hand rather than through psutil: psutil is not among
rayscreen's dependencies (nor installed with Ray here), and three /proc files are all
this needs.
"""

from __future__ import annotations

import os
import threading
import time

# Summed figures, in bytes, from /proc/PID/smaps_rollup:
#   rss        resident pages; a shared page counts once per process mapping it (as ``ps``)
#   pss        resident pages, each shared page split among the processes mapping it: summed
#              over processes, the physical memory they use (Ray's object store counted once)
#   pss_anon   the private heaps' part of pss
#   pss_shmem  the shared-memory part of pss (Ray's object store)
FIGURES = ("rss", "pss", "pss_anon", "pss_shmem")

# Ray's own processes (GCS, raylet -- which maps the object store --, dashboard, monitors,
# agents), as opposed to the driver and Ray's workers (tasks and actors, titled ``ray::``)
RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "agent", "runtime_env")


def process_tree(root: int) -> list[int]:
    """PIDs of ``root`` and all its descendants (those alive while /proc is read)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cmdline(pid: int) -> list[str]:
    """The process's command line words; ``[]`` if it is gone (or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return [w for w in f.read().split("\0") if w]
    except OSError:
        return []


def process_label(pid: int) -> str:
    """A short name that groups processes of one kind: a Ray worker's title up to its
    first space or ``->`` (``ray::IDLE``, ``ray::ReadPlates``, an actor's class), else the
    base names of the first two command-line words (``raylet --raylet_socket_name=...``)."""
    words = cmdline(pid)
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split(" ")[0].split("->")[0]
    return " ".join(os.path.basename(w) for w in words[:2])


def is_ray_system(label: str) -> bool:
    """Whether a :func:`process_label` names one of Ray's own processes, not a worker."""
    if label.startswith("ray::"):
        return label.endswith("Agent")  # the agents' titles start with ray:: too
    return any(s in label for s in RAY_SYSTEM)


def process_memory(pid: int, pss: bool = True) -> dict[str, int]:
    """:data:`FIGURES` of one process in bytes; zeros if it is gone. ``pss=False`` reads
    only the RSS, from /proc/PID/statm (much cheaper than smaps_rollup, which walks the
    process's page tables); the pss figures are then 0."""
    out = dict.fromkeys(FIGURES, 0)
    try:
        if not pss:
            with open(f"/proc/{pid}/statm") as f:
                out["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            return out
        wanted = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_Shmem:": "pss_shmem"}
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(None, 1)[0]
                if key in wanted:
                    out[wanted[key]] = int(line.split()[1]) * 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    return out


def tree_memory(root: int | None = None, pss: bool = True) -> dict[str, int]:
    """:data:`FIGURES` in bytes, summed over ``root`` (default: this process) and all its descendants."""
    totals = dict.fromkeys(FIGURES, 0)
    for pid in process_tree(root or os.getpid()):
        for key, value in process_memory(pid, pss).items():
            totals[key] += value
    return totals


class MemorySampler:
    """Peak memory of a process tree while a ``with`` block runs.

    A daemon thread samples, every ``interval`` s (and once more on exit), the memory of
    ``root`` (default: this process) and every descendant -- with a local Ray: the driver,
    GCS, raylet, agents and every worker. After the block, in bytes:

    - ``peak[f]`` for each of :data:`FIGURES`: the peak of the figure summed over the tree;
    - ``peak["rss_driver_workers"]``, ``peak["pss_driver_workers"]``: the same over the
      root and Ray's workers only, Ray's own processes (:func:`is_ray_system`) left out;
    - ``at_peak``: ``{process label: bytes}`` at the peak of the summed main figure
      (pss, or rss when ``pss=False``), processes of one :func:`process_label` summed.

    ``pss=False`` samples the RSS only (cheap enough for short intervals); the pss figures
    stay 0. The peaks are the maxima over samples: a spike shorter than ``interval`` can
    be missed.

        with MemorySampler() as sampler:
            run()
        sampler.peak["pss"]
    """

    def __init__(self, root: int | None = None, interval: float = 0.05, pss: bool = True):
        self.root, self.interval, self.pss = root or os.getpid(), interval, pss
        self.peak = dict.fromkeys(FIGURES + ("rss_driver_workers", "pss_driver_workers"), 0)
        self.at_peak: dict[str, int] = {}
        # pid -> one of Ray's own processes; never changes, whereas a worker's title does
        # (ray::IDLE until it runs a task or becomes an actor), so labels are read afresh
        self._system: dict[int, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="MemorySampler")

    def _is_system(self, pid: int) -> bool:
        if pid not in self._system:
            self._system[pid] = is_ray_system(process_label(pid))
        return self._system[pid]

    def sample(self) -> None:
        """Take one sample now and update the peaks."""
        memory = {pid: process_memory(pid, self.pss) for pid in process_tree(self.root)}
        main = "pss" if self.pss else "rss"
        totals = {key: sum(m[key] for m in memory.values()) for key in FIGURES}
        ours = [m for pid, m in memory.items() if pid == self.root or not self._is_system(pid)]
        totals["rss_driver_workers"] = sum(m["rss"] for m in ours)
        totals["pss_driver_workers"] = sum(m["pss"] for m in ours)
        if totals[main] > self.peak[main]:
            self.at_peak = {}
            for pid, m in memory.items():
                label = process_label(pid)
                self.at_peak[label] = self.at_peak.get(label, 0) + m[main]
        for key, value in totals.items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
