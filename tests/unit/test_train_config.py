"""Bad training configs fail in plan_run, before any Ray worker starts, naming the problem."""

import os

import pandas as pd
import pytest

from rayscreen.config import ConfigError, config_from_dict, load_config
from rayscreen.testing.plates import make_plate
from rayscreen.train.plan import SPLIT_COL, config_differences, plan_run, write_run_config


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    root = tmp_path_factory.mktemp("plates")
    wells = [f"{r}{c:02d}" for r in "AB" for c in range(1, 7)]
    ann = pd.DataFrame({"Metadata_Well": wells, "Metadata_Label": ["pos" if i % 3 == 0 else "neg" for i in range(12)],
                        "Metadata_Compound": [("p" if i % 3 == 0 else "n") + str(i % 2) for i in range(12)]})
    a = make_plate(str(root / "a.zarr"), "PA", wells=wells, fields=1, annotations=ann, field_shape=(16, 16))
    b = make_plate(str(root / "b.zarr"), "PB", wells=wells, fields=1, annotations=ann, field_shape=(16, 16))
    c = make_plate(str(root / "c.zarr"), "PC", wells=wells, fields=1, annotations=ann, field_shape=(16, 16),
                   channels=("DNA", "Tubulin"))
    return {"a": a, "b": b, "c": c, "root": root}


def cfg(plates, tmp_path, **sections):  # noqa: D103
    base = {"plates": [plates["a"], plates["b"]], "output": str(tmp_path / "out"),
            "stream": {"normalize": "none"},
            "label": {"column": "Metadata_Label", "positive": ["pos"]},
            "model": {"name": "milnet", "kwargs": {"width": [4, 4, 4]}},
            "train": {"split": {"val": 0.25, "test": 0.0}}}
    for key, value in sections.items():
        section, _, sub = key.partition("__")
        if sub:
            base.setdefault(section, {})[sub] = value
        else:
            base[section] = value
    return config_from_dict(base)


def test_good_config_plans_without_ray(plates, tmp_path):
    plan = plan_run(cfg(plates, tmp_path, train={"num_workers": 2, "split": {"val": 0.25, "test": 0.0}}))
    assert plan.classes == ["neg", "pos"] and plan.channels == ["DNA", "Actin"]
    assert plan.plate_names == ["PA", "PB"] and not plan.resume
    w = plan.wells
    assert len(w) == 24 and set(w["split"]) == {"train", "val"}
    # validation wells dealt to the two ranks, every one exactly once
    assert sorted(w.loc[w["split"] == "val", SPLIT_COL].unique()) == ["val_0", "val_1"]
    assert plan.val_names == ["val_0", "val_1"]


def test_unknown_key_is_an_error_naming_it(tmp_path):
    text = "plates: [x.zarr]\noutput: out\ntrain:\n  epochs: 2\n  epoch_count: 3\n"
    with pytest.raises(ConfigError, match=r"<config>:5: train.epoch_count: unknown key"):
        load_config(text)


@pytest.mark.parametrize("change, match", [
    ({"label__column": "Metadata_Missing"}, "label.column: 'Metadata_Missing' is not an annotation column"),
    ({"label__positive": ["positive"]}, "label.positive: value 'positive' matches no well"),
    ({"label": {"column": "Metadata_Label", "classes": ["pos"]}}, "at least two"),
    ({"stream__channels": ["DNA", "Mito"]}, r"stream.channels: \['Mito'\] not in the plates' channels"),
    ({"train": {"split": {"by": "column", "column": "Metadata_Compound", "column_values": {"train": ["p0"], "val": ["n0"]}}}},
     r"training split has 1 class\(es\) \['pos'\]"),
    ({"train": {"split": {"by": "column", "column": "Metadata_Compound",
                          "column_values": {"train": ["p0", "p1", "n0", "n1"]}}}}, "the val split is empty"),
    ({"train": {"metric": "val_auc"}}, r"train.metric: expected one of \[.*'val_roc_auc'\], found 'val_auc'"),
    ({"model__name": "nonet"}, "model.name: unknown model 'nonet'"),
    ({"model__kwargs": {"depth": 3}}, "model.kwargs"),
    ({"stream__normalize": "percentile"}, "stream.normalize: 'percentile': plate .*a\\.zarr: no normalisation stored"),
    ({"train": {"max_failures": -1}}, "train.max_failures"),
    # a negative clip norm flips the gradients (the loss rose every step), 0 zeroes them
    ({"train": {"grad_clip": -1.0}}, r"train.grad_clip: -1.0; expected the largest gradient norm, a finite number > 0"),
    ({"train": {"grad_clip": 0.0}}, r"train.grad_clip: 0.0; expected"),
    ({"train": {"grad_clip": float("inf")}}, r"train.grad_clip: inf; expected"),
    ({"train": {"lr": float("nan")}}, r"train.lr: nan; expected a finite number > 0"),
    ({"train": {"lr": float("inf")}}, r"train.lr: inf; expected a finite number > 0"),
    ({"train": {"lr": 0.0}}, r"train.lr: 0.0; expected a finite number > 0"),
    ({"train": {"weight_decay": -0.1}}, r"train.weight_decay: -0.1; expected a finite number >= 0"),
    ({"train": {"weight_decay": float("nan")}}, r"train.weight_decay: nan; expected a finite number >= 0"),
    ({"train": {"momentum": -0.5}}, r"train.momentum: -0.5; expected 0 <= value < 1"),
    ({"train": {"momentum": 1.0}}, r"train.momentum: 1.0; expected 0 <= value < 1"),
    ({"train": {"momentum": float("nan")}}, r"train.momentum: nan; expected 0 <= value < 1"),
    ({"train": {"keep_checkpoints": 0}}, r"train.keep_checkpoints: 0; expected >= 1, or null"),
    ({"train": {"cpus_per_worker": float("nan")}}, r"train.cpus_per_worker: nan; expected a finite number > 0"),
    ({"train": {"cpus_per_worker": float("inf")}}, r"train.cpus_per_worker: inf; expected a finite number > 0"),
    ({"train": {"cpus_per_worker": 0.0}}, r"train.cpus_per_worker: 0.0; expected a finite number > 0"),
    ({"train": {"crop": 64}}, "train.crop: 64 is larger than the fields"),
    ({"train": {"crop_centre": "nuclei"}}, "train.crop_centre: nuclei centres crops on nuclei: set train.crop"),
    ({"train": {"crop": 12, "crop_centre": "nuclei", "nucleus_channel": "Hoechst"}},
     r"train.nucleus_channel: 'Hoechst' is not a streamed channel; expected one of \['DNA', 'Actin'\]"),
    ({"train": {"crop": 12, "crop_centre": "nuclei", "distill": {"enabled": True, "local_crop": 8}}},
     "train.crop_centre: nuclei is not supported with train.distill"),
    ({"stream__tile": 8, "train": {"crop": 12}}, r"train.crop: 12 is larger than the tiles \(8 x 8\)"),
    ({"train": {"mixup": -0.2}}, "train.mixup: -0.2; expected the Beta parameter"),
    ({"train": {"label_smoothing": 1.0}}, r"train.label_smoothing: 1.0; expected 0 <= value < 1"),
    ({"train": {"torch_threads": -1}}, r"train.torch_threads: -1; expected torch threads per CPU worker >= 0"),
    ({"train": {"augment": {"intensity": -0.1}}}, r"train.augment.intensity: -0.1; expected a log-gain"),
    ({"train": {"augment": {"noise": 1.5}}}, r"train.augment.noise: 1.5; expected the largest noise"),
    ({"train": {"augment": {"translate": -4}}}, r"train.augment.translate: -4.0; expected the largest shift"),
    ({"train": {"augment": {"scale": [1.2, 0.8]}}}, r"train.augment.scale: \[1.2, 0.8\]; expected \[low, high\]"),
    ({"train": {"augment": {"scale": [0.9]}}}, r"train.augment.scale: \[0.9\]; expected \[low, high\]"),
    ({"train": {"augment": {"scale": []}}}, r"train.augment.scale: \[\]; expected \[low, high\]"),
    ({"train": {"augment": {"enabled": False, "noise": 1.5}}}, r"train.augment.noise: 1.5; expected the largest noise"),
    ({"train": {"shuffle_buffer": 4, "batch_size": 8}}, r"train.shuffle_buffer: 4; expected at least train.batch_size"),
    ({"train": {"distill": {"enabled": True, "local_crop": 24}}}, r"train.distill.local_crop: 24 px is larger than "
                                                                  r"the fields \(16 x 16\)"),
    ({"train": {"distill": {"enabled": True, "local_crop": 12, "bank": 10**8}}},
     r"train.distill.bank: 100000000 fields x 2 classes of 2 x 16 x 16 float32 = 381.5 GiB"),
    ({"train": {"distill": {"enabled": True, "local_crop": 12, "teacher_temp": float("nan")}}},
     r"train.distill.teacher_temp: nan; expected a finite number"),
    ({"train": {"augment": {"enabled": False}, "distill": {"enabled": True, "local_crop": 12, "pair_by": "image"}}},
     r"train.distill.pair_by: 'image' with train.crop null and train.augment off"),
    # what the workers feed the network, below its smallest input: every step would fail there
    ({"model__name": "wscnn", "train": {"distill": {"enabled": True, "local_crop": 12}}},
     r"stream.level \(0: fields of that level\): the network gets 16 x 16 px, smaller than the smallest input of "
     r"wscnn \(46 x 46 px\)"),
    ({"model__name": "wscnn", "train": {"crop": 12}}, r"train.crop: the network gets 12 x 12 px"),
    ({"model__name": "wscnn", "stream": {"normalize": "none", "tile": 16}}, r"stream.tile: the network gets 16 x 16"),
])
def test_bad_configs_fail_before_workers(plates, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        plan_run(cfg(plates, tmp_path, **change))


def test_plates_with_different_channels_are_refused(plates, tmp_path):
    with pytest.raises(ConfigError, match="channels .* but .*c.zarr has .*Tubulin"):
        plan_run(cfg(plates, tmp_path).replace(plates=[plates["a"], plates["c"]]))


def test_two_plates_of_one_name_are_refused_naming_both(plates, tmp_path):
    twin = make_plate(str(tmp_path / "twin.zarr"), "PA", wells=("A01",), fields=1, field_shape=(16, 16))
    with pytest.raises(ConfigError, match=f"plates: {plates['a']} and {twin} are both named 'PA'"):
        plan_run(cfg(plates, tmp_path).replace(plates=[plates["a"], twin]))


def test_resume_refuses_a_different_config_and_allows_more_epochs(plates, tmp_path):
    config = cfg(plates, tmp_path)
    plan = plan_run(config)
    write_run_config(plan)  # what run_train does before starting workers
    assert plan_run(config).resume
    assert plan_run(cfg(plates, tmp_path, train={"epochs": 30, "split": {"val": 0.25, "test": 0.0}})).resume
    with pytest.raises(ConfigError, match=r"run 'train' exists .*train.lr differ.*new train.run_name"):
        plan_run(cfg(plates, tmp_path, train={"lr": 0.5, "split": {"val": 0.25, "test": 0.0}}))
    fresh = plan_run(cfg(plates, tmp_path, train={"lr": 0.5, "run_name": "other", "split": {"val": 0.25, "test": 0.0}}))
    assert not fresh.resume


def test_good_optimiser_values_plan(plates, tmp_path):
    plan_run(cfg(plates, tmp_path, train={"grad_clip": 1.0, "momentum": 0.0, "weight_decay": 0.0,
                                          "keep_checkpoints": None, "split": {"val": 0.25, "test": 0.0}}))


def _glob_plates(root, names, labels=("pos", "neg", "neg")):
    wells = [f"{r}{c:02d}" for r in "AB" for c in range(1, 7)]
    ann = pd.DataFrame({"Metadata_Well": wells, "Metadata_Label": [labels[i % len(labels)] for i in range(12)]})
    for name in names:
        make_plate(str(root / "plates" / f"{name}.zarr"), name, wells=wells, fields=1, annotations=ann,
                   field_shape=(16, 16))
    return [str(root / "plates" / "*.zarr")]


def test_resume_refuses_a_changed_split_of_the_wells_and_keeps_the_stored_one(tmp_path):
    """A plate the plates: glob now matches reshuffles the split (a same config): wells the run
    trained on could be validated on, so the run does not resume."""
    import dataclasses
    import json

    from rayscreen.train.plan import SPLIT_FILE

    glob = _glob_plates(tmp_path, ["P1", "P2"])
    config = config_from_dict({"plates": glob, "output": str(tmp_path / "out"), "stream": {"normalize": "none"},
                               "label": {"column": "Metadata_Label", "positive": ["pos"]},
                               "model": {"name": "milnet", "kwargs": {"width": [4, 4, 4]}},
                               "train": {"split": {"val": 0.25, "test": 0.0}}})
    first = plan_run(config)
    write_run_config(first)
    stored_file = tmp_path / "out" / "train" / "checkpoints" / "train" / SPLIT_FILE
    stored = stored_file.read_text()
    assert json.loads(stored)["classes"] == ["neg", "pos"] and len(json.loads(stored)["wells"]) == 24
    again = plan_run(config)  # the same data: resumes, and the stored split stays as it was
    assert again.resume
    write_run_config(again)
    assert stored_file.read_text() == stored
    _glob_plates(tmp_path, ["P3"])
    with pytest.raises(ConfigError, match=r"train.run_name: run 'train' exists but the plates and labels now give "
                                          r"another split or classes .* e.g. P\d/\w+: train -> val.*new train.run_name"):
        plan_run(config)
    assert stored_file.read_text() == stored
    assert not plan_run(config.replace(train=dataclasses.replace(config.train, run_name="more"))).resume  # fresh


def test_resume_refuses_changed_classes(tmp_path):
    glob = _glob_plates(tmp_path, ["P1", "P2"], labels=("a", "b", "c"))
    config = config_from_dict({"plates": glob, "output": str(tmp_path / "out"), "stream": {"normalize": "none"},
                               "label": {"column": "Metadata_Label"},
                               "model": {"name": "milnet", "kwargs": {"width": [4, 4, 4]}},
                               "train": {"split": {"by": "plate", "val": 0.5, "test": 0.0}}})
    write_run_config(plan_run(config))
    _glob_plates(tmp_path, ["P0"], labels=("a", "b", "c", "d"))  # a new label value: the classes change
    with pytest.raises(ConfigError, match=r"train.run_name: .*classes \['a', 'b', 'c'\] -> \['a', 'b', 'c', 'd'\]"):
        plan_run(config)


def test_split_differences_name_each_changed_well():
    from rayscreen.train.plan import split_differences

    old = {"classes": ["neg", "pos"], "wells": [["P", "A01", "train", 0], ["P", "A02", "val", 1], ["P", "A03", "train", 1]]}
    new = {"classes": ["neg", "pos"], "wells": [["P", "A01", "val", 0], ["P", "A02", "val", 0], ["Q", "A01", "test", 1]]}
    assert split_differences(old, old) == []
    assert split_differences(old, new) == ["P/A01: train -> val", "P/A02: label 1 -> 0", "P/A03: gone", "Q/A01: new"]
    new["classes"] = ["a", "b"]
    new["wells"][1][2] = "train"  # val -> train: after the wells trained on that are now validated on
    assert split_differences(old, new)[:3] == ["classes ['neg', 'pos'] -> ['a', 'b']", "P/A01: train -> val",
                                               "P/A02: val -> train"]


def test_config_differences_ignore_resumable_and_later_stages():
    a = {"train": {"epochs": 1, "lr": 0.1, "split": {"seed": 0}}, "infer": {"batch_size": 1}, "model": {"kwargs": {"w": 1}},
         "stream": {"on_error": "raise", "override_num_blocks": None, "level": 0}}
    b = {"train": {"epochs": 5, "lr": 0.1, "split": {"seed": 1}}, "infer": {"batch_size": 9}, "model": {"kwargs": {"w": 2}},
         "stream": {"on_error": "skip", "override_num_blocks": 8, "level": 0}}  # how plates are read: resumable
    assert config_differences(a, b) == ["model.kwargs", "train.split.seed"]


def test_a_run_recorded_before_a_key_existed_resumes_at_that_keys_default():
    """A key the stored record lacks (a run started before rayscreen had it) counts as its
    default: an upgrade that adds keys does not make every run unresumable, while a key set
    away from its default is still a difference. Plates are compared by the split record, not
    by path (made absolute since: a run recorded with relative plates still resumes)."""
    current = config_from_dict({"plates": ["plates/*.zarr"], "output": "out"}).to_record()
    stored = {k: v for k, v in current.items()}
    stored["train"] = {k: v for k, v in current["train"].items() if k not in ("crop_centre", "deterministic",
                                                                             "distill")}
    stored["plates"] = ["plates/*.zarr"]  # as recorded before plates were made absolute
    assert current["plates"] != stored["plates"]
    assert config_differences(stored, current) == []
    changed = config_from_dict({"plates": ["p"], "output": "out", "train": {"deterministic": True}}).to_record()
    assert config_differences(stored, changed) == ["train.deterministic"]


def test_jobs_entry_point_reports_config_errors(plates, tmp_path, capsys):
    from rayscreen.cli import job_main

    path = tmp_path / "c.yaml"
    path.write_text(f"plates: [{plates['a']}]\noutput: {tmp_path / 'out'}\nstream: {{normalize: none}}\n"
                    "label: {column: Metadata_Label, positive: [pos]}\n")
    assert job_main("train", ["--config", str(path), "--set", "label.column=Metadata_Nope"]) == 2
    assert "label.column: 'Metadata_Nope' is not an annotation column" in capsys.readouterr().err
    assert job_main("train", [f"--config={path}", "--set", "label.column=Metadata_Nope"]) == 2  # --config=PATH too
    assert "label.column: 'Metadata_Nope' is not an annotation column" in capsys.readouterr().err
    assert job_main("train", ["--set", "train.epochs=1"]) == 2
    assert "usage: python jobs/" in capsys.readouterr().err


def test_balanced_plan_repeats_the_rare_class_to_about_the_common_ones_count(plates, tmp_path):
    import numpy as np

    from rayscreen.train.step import repeat_rows

    plan = plan_run(cfg(plates, tmp_path, train={"balanced": True, "split": {"val": 0.25, "test": 0.0}}))
    train = plan.wells[plan.wells["split"] == "train"]
    n_neg, n_pos = int((train["label_index"] == 0).sum()), int((train["label_index"] == 1).sum())
    assert n_neg > n_pos > 0  # 2 of 3 wells are negative
    assert plan.repeats == {0: 1, 1: int(round(n_neg / n_pos))}
    # the rows the training stream would see: every positive field repeated, negatives once
    out = repeat_rows({"y": train["label_index"].to_numpy(), "i": np.arange(len(train))}, "y", plan.repeats)
    counts = np.bincount(out["y"])
    assert counts[0] == n_neg and counts[1] == n_pos * plan.repeats[1]
    assert abs(int(counts[1]) - int(counts[0])) <= max(n_pos, 1)  # balanced to within one repeat
    assert plan_run(cfg(plates, tmp_path)).repeats is None  # off by default


def test_worker_threads_and_cpu_check():
    from rayscreen.train.loop import check_cpus, worker_threads

    assert [worker_threads(c) for c in (0.25, 0.5, 1.0, 1.5, 2.0)] == [1, 1, 1, 2, 2]
    assert worker_threads(1.0, torch_threads=2) == 2 and worker_threads(2.0, torch_threads=1) == 1  # train.torch_threads
    check_cpus(2, 0.5, 2.0)  # 1 CPU of workers + the reads: fits
    check_cpus(4, 1.0, 2.0)  # the workers do not fit yet: maybe an autoscaling cluster, Ray Train waits
    with pytest.raises(ConfigError, match="train.cpus_per_worker"):
        check_cpus(1, 1.5, 2.0)  # the workers fit, the reads never would (0.5 CPU left starves them)


def test_two_plates_split_by_plate_train_on_one_and_validate_on_the_other(plates, tmp_path):
    """With the default fractions two groups went to train and test, and training refused an
    empty validation split; validation (which picks the epoch) is served first."""
    from rayscreen.train.splits import _counts

    plan = plan_run(cfg(plates, tmp_path, train={"split": {"by": "plate"}}))  # val 0.2, test 0.2
    by_plate = plan.wells.groupby("Metadata_Plate")["split"].unique()
    assert sorted(s for [s] in by_plate) == ["train", "val"]
    assert _counts(2, 0.2, 0.2) == (1, 0) and _counts(3, 0.2, 0.2) == (1, 1) and _counts(1, 0.2, 0.2) == (0, 0)


def test_wells_without_a_split_column_value_are_named_in_a_warning(plates, tmp_path):
    import numpy as np

    from rayscreen.config import SplitConfig
    from rayscreen.train.splits import assign_splits

    wells = pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": [f"A{i:02d}" for i in range(1, 9)],
                          "Metadata_Conc": [1.0, 2.0, 3.0, None, 1.0, 2.0, 3.0, np.nan]})
    with pytest.warns(UserWarning, match=r"train.split.column 'Metadata_Conc': 2 labelled well\(s\) have no value"):
        out = assign_splits(wells, np.array([0, 1] * 4), SplitConfig(by="column", column="Metadata_Conc"))
    assert list(out[[3, 7]]) == ["none", "none"]


def test_a_deterministic_runs_read_tasks_come_from_the_data_not_the_cluster():
    """An ordered stream's batches follow where its blocks end; the default task count follows
    the cluster's CPUs at the start, so a deterministic run repeated only on the same cluster."""
    from rayscreen.train.loop import DETERMINISTIC_WELLS_PER_TASK, read_tasks

    assert read_tasks(None, True, 20) == -(-20 // DETERMINISTIC_WELLS_PER_TASK) == 3
    assert read_tasks(None, True, 1) == 1 and read_tasks(None, True, 0) == 1
    assert read_tasks(None, False, 20) is None  # Ray Data's default, from the cluster
    assert read_tasks(6, True, 20) == 6 and read_tasks(6, False, 20) == 6  # stream.override_num_blocks wins


def test_a_run_recorded_before_passwords_were_masked_everywhere_resumes(tmp_path):
    """Records written by an earlier rayscreen masked storage_options only; compared with
    today's record (a URI's password masked too) the run was refused as another config."""
    import json

    from rayscreen.train.plan import CONFIG_FILE, check_resume

    config = config_from_dict({"plates": ["https://user:pw@host/P.zarr"], "output": str(tmp_path / "out"),
                               "model": {"kwargs": {"trunk_weights": "https://user:pw@host/w.pt"}}})
    run = tmp_path / "runs" / "train"
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text(json.dumps(config.to_dict()))  # as an earlier version wrote it
    assert check_resume(config, str(tmp_path / "runs"), "train") is True


def test_a_run_under_a_new_name_warns_that_it_replaces_the_exported_model(plates, tmp_path, caplog):
    """model/, metrics.csv and split.csv are one per output: a run under a new train.run_name
    replaces the earlier run's export, which the plan says (naming both runs) before it starts;
    the same name (a resume or a rerun) does not warn."""
    import logging

    from rayscreen.models import create_model
    from rayscreen.models.artefact import ArtefactMeta, save_artefact
    from rayscreen.train.plan import exported_run

    first = cfg(plates, tmp_path, train={"run_name": "first", "split": {"val": 0.25, "test": 0.0}})
    run_dir = os.path.join(first.output, "train")
    assert exported_run(run_dir) is None
    model = create_model("milnet", in_channels=2, num_classes=2, width=[4, 4, 4])
    save_artefact(os.path.join(run_dir, "model"), model.state_dict(),
                  ArtefactMeta(model={"name": "milnet", "kwargs": {}}, channels=["DNA", "Actin"],
                               classes=["neg", "pos"], config=first.to_record()))
    assert exported_run(run_dir) == "first"
    with caplog.at_level(logging.WARNING, logger="rayscreen.train.plan"):
        plan_run(first)
        assert not [r for r in caplog.records if "replaces it" in r.getMessage()]
        plan_run(cfg(plates, tmp_path, train={"run_name": "second", "split": {"val": 0.25, "test": 0.0}}))
    [warning] = [r.getMessage() for r in caplog.records if "replaces it" in r.getMessage()]
    assert "run 'first'" in warning and "run 'second' replaces it" in warning


def test_milnet_trunk_weights_on_an_s3_endpoint_of_ones_own_are_read_with_the_configs_options(s3_bucket, tmp_path):
    """A milnet trunk's trunk_weights on a bucket behind storage_options.endpoint_url (MinIO,
    Ceph, moto): the plan's model check and the workers' model read them with the config's
    options (they went to the default AWS endpoint), and the options stay out of the kwargs
    recorded with the model."""
    import s3fs
    import torch
    import torchvision

    from rayscreen.models import create_model
    from rayscreen.train.plan import _check_model, model_kwargs

    bucket, options = s3_bucket
    init = torchvision.models.resnet18(weights=None).state_dict()  # our own weights, nothing downloaded
    init = {k: v + 0.01 if v.is_floating_point() else v for k, v in init.items()}
    local = tmp_path / "r18.pth"
    torch.save(init, local)
    s3fs.S3FileSystem(**options).put(str(local), f"{bucket}/w/r18.pth")
    config = config_from_dict({"plates": ["P.zarr"], "output": str(tmp_path / "out"), "storage_options": options,
                               "model": {"name": "milnet", "kwargs": {"trunk": "resnet18",
                                                                       "trunk_weights": f"{bucket}/w/r18.pth"}}})
    _check_model(config, in_channels=2, num_classes=2, field_size=(64, 64))
    model = create_model("milnet", in_channels=2, num_classes=2, **model_kwargs(config))
    assert torch.equal(model.trunk[1].weight, init["conv1.weight"])  # the bucket's file
    assert "storage_options" not in config.model.kwargs
    assert model_kwargs(config_from_dict({"plates": ["P.zarr"], "output": "o", "storage_options": options})) == {}
