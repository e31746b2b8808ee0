"""Shared setup of the training integration tests (test_train*.py): a small synthetic
WSCNN screen and the config every run there starts from."""

from rayscreen.config import config_from_dict

EPOCHS = 3


def wscnn_screen(root):
    """80 wells x 2 fields (96 x 128), half positive, under ``root``; percentile normalisation
    fitted and stored with the plate (what `rayscreen illum` does), so stream.normalize is
    honoured. Returns the plate URIs."""
    from rayscreen.stream.normalize import PercentileScaler, fit_plate_normalizer
    from rayscreen.synth import synth_wscnn

    # few, clearly elongated ellipses and many circles: learnable in a few CPU epochs
    uris = synth_wscnn(str(root / "plates"), n_images=160, rare_fraction=0.5, fields_per_well=2, seed=1,
                       shape=(96, 128), grid=(3, 4), n_objects=(8, 12), ellipse_aspect=(0.3, 0.45))
    for uri in uris:
        fit_plate_normalizer(uri, PercentileScaler(), save=True, max_fields=32)
    return uris


def make_config(uris, output, **train):
    return config_from_dict({
        "plates": uris, "output": output,
        "stream": {"normalize": "percentile"},
        "label": {"column": "Metadata_Label", "positive": ["positive"], "negative": ["negative"]},
        "model": {"name": "wscnn", "kwargs": {"width": 0.25}},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": EPOCHS, "batch_size": 8,
                  "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "schedule": "none", "seed": 0,
                  "max_failures": 1,
                  "augment": {"enabled": True, "flips": True, "rot90": True, "rotate": False, "translate": 0.0},
                  # the simulation's split hint; test wells join training here (more data, fewer epochs)
                  "split": {"by": "column", "column": "Metadata_Split",
                            "column_values": {"train": ["train", "test"], "val": ["val"]}},
                  **train},
    })
