"""rayscreen.testing.MemorySampler: the peak memory of a process tree, sampled in a thread.

Each test samples a process tree of its own (a child of the test process, with its own
child where the tree walk is under test): the test process itself may hold the session's
local Ray, whose worker processes come and go by hundreds of MB while a test runs."""

import os
import subprocess
import sys

import pytest

from rayscreen.testing import MemorySampler, tree_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SIZE = 200 * 2**20  # bytes: well above the noise of a Python process's own heap


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_an_array_allocated_in_the_block_raises_the_peak_by_its_size():
    # the child allocates (and writes: every page resident) when told to, holds it, exits
    child = _python("import sys, time, numpy as np; print('ready', flush=True); sys.stdin.readline(); "
                    f"a = np.ones({SIZE}, dtype=np.uint8); print('allocated', flush=True); time.sleep(0.3)")
    assert child.stdout.readline().strip() == "ready"
    before = tree_memory(child.pid)
    with MemorySampler(root=child.pid, interval=0.01) as sampler:
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "allocated"
        child.wait(30)
    for key in ("rss", "pss", "pss_anon"):
        assert sampler.peak[key] - before[key] >= 0.8 * SIZE, (key, sampler.peak, before)
    # private heap, not shared memory; the child is no Ray system process
    assert sampler.peak["pss_shmem"] - before["pss_shmem"] < 0.2 * SIZE
    assert sampler.peak["pss_driver_workers"] - before["pss"] >= 0.8 * SIZE
    assert sum(sampler.at_peak.values()) >= SIZE


def test_a_grandchild_counts_and_rss_only_mode_sees_it():
    # root: a parent process whose child holds SIZE bytes; the sampler must walk the tree
    grandchild = f"import time; b = b'x' * {SIZE}; print('ready', flush=True); time.sleep(1.0)"
    parent = _python(f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])")
    before = tree_memory(parent.pid, pss=False)
    with MemorySampler(root=parent.pid, interval=0.02, pss=False) as sampler:
        assert parent.stdout.readline().strip() == "ready"  # the grandchild's line, through the parent
        parent.wait(30)
    assert sampler.peak["rss"] - before["rss"] >= 0.8 * SIZE, (sampler.peak, before)
    assert sampler.peak["pss"] == 0  # not read in RSS-only mode
    # at the peak, the grandchild is listed under its own label: the interpreter's name and "-c"
    assert sampler.at_peak.get(f"{os.path.basename(sys.executable)} -c", 0) >= 0.8 * SIZE, sampler.at_peak
