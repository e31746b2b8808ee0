"""The training run's export, <output>/train/model, is rewritten in place by every run: an
export that dies half-way must not leave a directory that loads as a complete artefact."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import rayscreen
import rayscreen.models.artefact as artefact
from rayscreen.models.artefact import ArtefactMeta, load_artefact, read_meta, save_artefact
from rayscreen.store.errors import RayscreenError


def _meta(epoch, classes):
    return ArtefactMeta(model={"name": "wscnn", "kwargs": {}}, channels=["DNA"], classes=classes, epoch=epoch)


# The next run's export, in a process of its own. An audit hook (it observes, it replaces
# nothing) holds the process still at the moment it opens `dies_at` for writing and says
# so in a marker file; the test then kills it with SIGKILL: a real death, mid-export.
_EXPORT = textwrap.dedent("""
    import os, sys, time
    import torch
    from rayscreen.models.artefact import ArtefactMeta, save_artefact

    uri, dies_at, marker = sys.argv[1:4]

    def hold(event, args):
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if not os.fsdecode(args[0]).endswith(dies_at):
            return
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing:
            with open(marker, "w"):
                pass
            time.sleep(600)

    sys.addaudithook(hold)
    meta = ArtefactMeta(model={"name": "wscnn", "kwargs": {}}, channels=["DNA"], classes=["ctrl", "hit"], epoch=2)
    save_artefact(uri, {"w": torch.ones(3)}, meta)
""")


def _export_killed_at(uri, dies_at, marker):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(rayscreen.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT, uri, dies_at, str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the export ended (rc {proc.returncode}) without opening {dies_at}"
            assert time.monotonic() < deadline, f"the export never opened {dies_at}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("dies_at", [artefact.WEIGHTS, artefact.META])
def test_an_export_that_dies_leaves_no_artefact_mixing_two_runs(tmp_path, dies_at):
    uri = str(tmp_path / "train" / "model")
    save_artefact(uri, {"w": torch.zeros(3)}, _meta(7, ["neg", "pos"]))
    _export_killed_at(uri, dies_at, tmp_path / "reached")
    files = sorted(p.name for p in (tmp_path / "train" / "model").iterdir())
    # killed as it opened the weights: nothing new written; as it opened the metadata: the new weights
    assert files == [artefact.WEIGHTS]
    new_weights = torch.load(tmp_path / "train" / "model" / artefact.WEIGHTS, weights_only=True)["w"].tolist()
    assert new_weights == ([0, 0, 0] if dies_at == artefact.WEIGHTS else [1, 1, 1])
    with pytest.raises(RayscreenError, match="not a rayscreen model artefact"):
        load_artefact(uri)
    save_artefact(uri, {"w": torch.ones(3)}, _meta(2, ["ctrl", "hit"]))  # the rerun's export completes it
    state, meta = load_artefact(uri)
    assert state["w"].tolist() == [1, 1, 1] and meta.epoch == 2 and read_meta(uri).classes == ["ctrl", "hit"]
