"""rayscreen.testing.MemorySampler: the peak memory of a process tree, sampled in a thread."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rayscreen.testing import MemorySampler, tree_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SIZE = 200 * 2**20  # bytes: well above the noise of a test process's own heap


def test_an_array_allocated_in_the_block_raises_the_peak_by_its_size():
    before = tree_memory()
    with MemorySampler(interval=0.01) as sampler:
        array = np.ones(SIZE, dtype=np.uint8)  # written, so every page is resident
        time.sleep(0.2)  # several samples see it
        del array
    for key in ("rss", "pss", "pss_anon"):
        assert sampler.peak[key] - before[key] >= 0.8 * SIZE, (key, sampler.peak, before)
    # private heap, not shared memory; this process is no Ray system process
    assert sampler.peak["pss_shmem"] - before["pss_shmem"] < 0.2 * SIZE
    assert sampler.peak["pss_driver_workers"] - before["pss"] >= 0.8 * SIZE
    assert sum(sampler.at_peak.values()) >= SIZE


def test_a_child_process_counts_and_rss_only_mode_sees_it():
    # a child holding SIZE bytes for a while; the sampler must walk the process tree to see it
    code = f"import time; b = b'x' * {SIZE}; print('ready', flush=True); time.sleep(1.0)"
    before = tree_memory(pss=False)
    with MemorySampler(interval=0.02, pss=False) as sampler:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        child.wait(30)
    assert sampler.peak["rss"] - before["rss"] >= 0.8 * SIZE, (sampler.peak, before)
    assert sampler.peak["pss"] == 0  # not read in RSS-only mode
    # at the peak, the child is listed under its own label: the interpreter's name and "-c"
    assert sampler.at_peak.get(f"{os.path.basename(sys.executable)} -c", 0) >= 0.8 * SIZE, sampler.at_peak
