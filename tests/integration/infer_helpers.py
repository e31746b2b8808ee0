"""Shared setup of the inference integration tests: tiny plates and an untrained, seeded artefact."""

import os

import torch

from rayscreen.config import config_from_dict
from rayscreen.models import create_model
from rayscreen.models.artefact import ArtefactMeta, save_artefact
from rayscreen.testing.plates import make_plate

WELLS = ("A01", "A02", "B01", "B02", "C01", "C02")


def make_screen(root, n_plates=2, wells=WELLS, fields=3, shape=(48, 48)):
    """``n_plates`` plates (2 channels, uint16) and a wscnn artefact; returns (plate URIs, checkpoint)."""
    uris = [make_plate(os.path.join(root, f"P{i + 1}.zarr"), name=f"P{i + 1}", wells=wells, fields=fields,
                       field_shape=shape, seed=i) for i in range(n_plates)]
    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=2, num_classes=2, width=0.25)
    ckpt = os.path.join(root, "model")
    save_artefact(ckpt, model.state_dict(), ArtefactMeta(
        model={"name": "wscnn", "kwargs": {"in_channels": 2, "num_classes": 2, "width": 0.25}},
        channels=["DNA", "Actin"], classes=["neg", "pos"], input={"level": 0}))
    return uris, ckpt


def infer_config(uris, ckpt, output, **infer):
    return config_from_dict({"plates": list(uris), "output": str(output),
                             "stream": {"normalize": "none"},
                             "infer": {"checkpoint": ckpt, "batch_size": 4, "saliency_downsample": 4, **infer}})


def chunk_bytes(store_dir):
    """{relative path: bytes} of every data chunk (metadata documents carry times, so left out)."""
    out = {}
    for dirpath, _, files in os.walk(store_dir):
        for f in files:
            if f != "zarr.json":
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, store_dir)] = open(p, "rb").read()
    return out


def differing_chunks(a_dir, b_dir):
    """Paths of the data chunks whose bytes differ between two stores (or exist in one only)."""
    a, b = chunk_bytes(a_dir), chunk_bytes(b_dir)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# storage_options a user may pass (ignored by local paths): never to be written out
FAKE_CREDENTIALS = {"key": "AKIAFAKEKEY123", "secret": "not-a-real-secret"}


def files_holding(root, text: str) -> list[str]:
    """Files under ``root`` whose bytes contain ``text``."""
    needle = text.encode()
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
            if needle in open(os.path.join(d, f), "rb").read()]
