"""Training options on two Ray Train workers: WS-DINO self-distillation with its resume and
export, and a training set cached in the workers' memory.

Apart from test_train.py so that two pytest-xdist workers (``make test TEST_WORKERS=2``)
can run the training modules side by side."""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from .train_helpers import make_config

pytestmark = pytest.mark.integration


def test_ws_dino_trains_resumes_its_teacher_and_exports_it(ray_local, train_screen, tmp_path):
    """train.distill (WS-DINO) on two DDP workers, self-distillation alone (the class head
    takes no gradient): one epoch, then a rerun with two resumes from the checkpoint
    (student, teacher and centre come back) and exports the teacher of the best epoch."""
    from rayscreen.config import ModelConfig
    from rayscreen.models.artefact import build_model
    from rayscreen.train import read_events, run_train
    from rayscreen.train.checkpoint import load_checkpoint

    uris, _ = train_screen
    output = str(tmp_path / "dino")
    distill = {"enabled": True, "local_crops": 2, "local_crop": 24, "out_dim": 64, "hidden": 64, "bottleneck": 16,
               "classify": 0.0}

    milnet = ModelConfig(name="milnet", kwargs={"width": 0.25, "pooling": "mean"})

    def config(epochs):  # cosine: the resume to more epochs must continue on the longer curve
        return make_config(uris, output, num_workers=2, cpus_per_worker=0.5, epochs=epochs, max_failures=0,
                           crop=48, distill=distill, metric="train_loss", schedule="cosine").replace(model=milnet)

    first = run_train(config(1), progress=False)
    assert first.epochs_completed == 1
    result = run_train(config(2), progress=False)
    assert [e["from_epoch"] for e in read_events(result.run_dir)] == [0, 1]
    m = result.metrics
    assert m["epoch"].tolist() == [1, 2] and np.isfinite(m["train_distill_loss"]).all(), m.to_string()
    # a fresh 2-epoch cosine's lrs (the 1-epoch run's stored schedule had ended at lr 0)
    np.testing.assert_allclose(m["lr"], [0.003, 0.0015], rtol=1e-6)
    np.testing.assert_allclose(m["train_loss"], m["train_distill_loss"], rtol=1e-6)  # no cross-entropy
    # the teacher's entropies are logged per epoch (collapse shows there); H(batch mean) >= mean H
    assert (0 <= m["train_teacher_entropy"]).all() and (m["train_teacher_entropy"] <= m["train_teacher_batch_entropy"]
                                                        + 1e-6).all(), m.to_string()

    ckpts = {}
    for d, _, files in os.walk(os.path.join(result.run_dir, "checkpoints")):
        if "state.json" in files:
            ckpts[load_checkpoint(d)["state"].epoch] = d
    assert set(ckpts) == {1, 2}
    best = load_checkpoint(ckpts[result.best_epoch])
    assert set(best["extra"]) == {"student", "teacher", "center"}
    teacher = {k[len("net."):]: v for k, v in best["extra"]["teacher"].items() if k.startswith("net.")}
    student = {k[len("net."):]: v for k, v in best["extra"]["student"].items() if k.startswith("net.")}
    model, meta = build_model(result.artefact)
    exported = model.state_dict()
    assert meta.epoch == result.best_epoch and set(exported) == set(teacher)
    assert all(torch.equal(exported[k], teacher[k]) for k in exported)
    assert not all(torch.equal(exported[k], student[k]) for k in exported)  # the EMA, not the student


def test_a_cached_training_set_replays_from_memory_on_two_workers(ray_local, train_screen, tmp_path):
    """train.cache_mb: epoch 1 streams and fills each worker's cache; epochs 2 and 3 train on
    the held fields on both workers (DDP in step), without waiting for a stream, and learn;
    with train.precise_bn each worker recomputes from its own sample and the statistics are
    averaged over the workers (collectives every rank must reach). train.torch_threads sets
    each worker's torch threads apart from the CPUs it reserved."""
    from rayscreen.train import read_events, run_train

    uris, _ = train_screen
    output = str(tmp_path / "cached")
    config = make_config(uris, output, epochs=3, max_failures=0, cache_mb=256, precise_bn=24, torch_threads=2)
    assert config.train.cpus_per_worker <= 1  # else 2 threads would be the default
    result = run_train(config, progress=False)
    metrics = pd.read_csv(os.path.join(output, "train", "metrics.csv"))
    assert result.epochs_completed == 3
    assert [e["torch_threads"] for e in read_events(os.path.join(output, "train"))] == [2]
    assert metrics["train_cached"].tolist() == [0, 1, 1]  # on every worker
    assert metrics["train_samples"].nunique() == 1  # the same fields each epoch
    # a batch gathered from memory, not a stream started: milliseconds, where epoch 1 waited for
    # reads. Relative to epoch 1, not a fixed 0.1 s: with another test loading both cores the
    # gather once took 0.14 s (a CI run with two pytest workers)
    first = metrics["first_batch_seconds"]
    assert (first.iloc[1:] < first.iloc[0] / 10).all(), first.tolist()
    assert np.isfinite(metrics["train_loss"]).all() and metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
