"""Deterministic training on the local Ray: runs of one seed repeat exactly, a resumed run
trains as the uninterrupted one did, and train.precise_bn changes only the exported
BatchNorm statistics (one set of runs, a module fixture, serves both tests); and an epoch
whose last batch is a single field trains a ResNet trunk.

Apart from test_train.py so that two pytest-xdist workers (``make test TEST_WORKERS=2``)
can run the training modules side by side: each run is mostly Ray Train set-up, waiting on processes."""

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import torch

from .train_helpers import make_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deterministic_runs(ray_local, train_screen, tmp_path_factory):
    """Three deterministic one-worker runs of the same seed (metric train_loss, so that the
    exported epoch follows the losses): ``whole`` trains 3 epochs in one call; ``resumed``
    trains 2, is exported (``at_2``: model and metrics), then is resumed to 3; ``precise``
    trains 2 with train.precise_bn. The determinism and precise-BN tests share them: each run
    is tens of seconds of Ray Train set-up on two cores, and ``resumed`` after its first call
    is exactly the run without precise_bn that the precise-BN test compares with."""
    from rayscreen.models.artefact import build_model
    from rayscreen.train import run_train

    uris, _ = train_screen
    root = tmp_path_factory.mktemp("deterministic")

    def train(name, epochs, precise_bn=0):
        output = str(root / name)
        result = run_train(make_config(uris, output, num_workers=1, cpus_per_worker=1.0, epochs=epochs, max_failures=0,
                                       deterministic=True, metric="train_loss", precise_bn=precise_bn),
                           progress=False)
        return result, pd.read_csv(os.path.join(output, "train", "metrics.csv"))

    runs = {"whole": train("whole", 3)}
    result, metrics = train("resumed", 2)
    runs["at_2"] = (build_model(result.artefact)[0], metrics)  # before the resume replaces the export
    runs["resumed"] = train("resumed", 3)
    result, metrics = train("precise", 2, precise_bn=100_000)
    runs["precise"] = (build_model(result.artefact)[0], metrics)
    return runs


def test_deterministic_runs_repeat_exactly_and_resumed_runs_too(deterministic_runs):
    """train.deterministic: two runs with the same seed see the same batches and end with
    the same losses, epoch for epoch (without it the read order, and so the batches, vary);
    a run stopped after epoch 2 and resumed to 3 trains epoch 3 as the uninterrupted run
    did (its crops, augmentation and batch order are functions of (seed, rank, epoch))."""
    from rayscreen.train import read_events

    (_, whole), (resumed, again) = deterministic_runs["whole"], deterministic_runs["resumed"]
    assert [e["from_epoch"] for e in read_events(resumed.run_dir)] == [0, 2]  # really resumed
    losses = [m[["epoch", "train_loss", "val_loss"]].to_numpy() for m in (whole, again)]
    assert losses[0].shape == (3, 3)
    np.testing.assert_array_equal(losses[0], losses[1])


def test_precise_bn_changes_the_exported_statistics_and_nothing_of_the_training(deterministic_runs):
    """train.precise_bn: the same deterministic run with and without it trains alike (losses,
    weights), while the exported BatchNorm statistics are recomputed from the last epoch's
    training fields (one cumulative average over that epoch's batches) instead of the running
    averages over every step."""
    (ema, m_ema), (pbn, m_pbn) = deterministic_runs["at_2"], deterministic_runs["precise"]
    np.testing.assert_array_equal(m_ema["train_loss"], m_pbn["train_loss"])
    steps = -(-int(m_ema["train_samples"].iloc[-1]) // 8)  # batch_size 8
    best = int(m_ema.loc[m_ema["train_loss"].idxmin(), "epoch"])  # the exported epoch
    for (name, a), b in zip(ema.state_dict().items(), pbn.state_dict().values()):
        if "running_" in name:
            assert not torch.equal(a, b), name
        elif "num_batches_tracked" in name:  # every step so far; one epoch's batches
            assert (int(a), int(b)) == (best * steps, steps), name
        else:
            assert torch.equal(a, b), name


def test_an_epoch_ending_in_one_field_trains_a_resnet_trunk_on_small_crops(ray_local, train_screen, tmp_path):
    """A ResNet trunk on 32 px crops ends in a 1 x 1 map, where BatchNorm cannot train on one
    field: an epoch whose last batch is a single field used to fail on the workers (every
    retry again); the loop leaves that batch out, and the run finishes."""
    from rayscreen.train import run_train
    from rayscreen.train.plan import plan_run

    uris, _ = train_screen
    output = str(tmp_path / "out")
    config = make_config(uris, output, num_workers=1, cpus_per_worker=1.0, epochs=1, max_failures=0, crop=32)
    config = config.replace(model=dataclasses.replace(config.model, name="milnet", kwargs={"trunk": "resnet18"}))
    rows = int((plan_run(config).wells["split"] == "train").sum()) * 2  # 2 fields per well
    result = run_train(config.replace(train=dataclasses.replace(config.train, batch_size=rows - 1)), progress=False)
    metrics = pd.read_csv(os.path.join(output, "train", "metrics.csv"))
    assert result.epochs_completed == 1 and metrics["train_samples"].tolist() == [rows - 1]
