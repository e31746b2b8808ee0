"""Plates on S3, against a real S3-protocol server (moto) on 127.0.0.1: ``plates:`` globs
(``s3://bucket/screen/*.zarr``) expand through fsspec; label images write and read back."""

import re

import pytest

from rayscreen.store import RayscreenError, open_plate
from rayscreen.stream import expand_uris
from rayscreen.testing import make_plate

pytestmark = pytest.mark.integration


def test_s3_glob_expands_to_the_plates_sorted_with_their_protocol(s3_bucket):
    bucket, options = s3_bucket
    # written out of order, beside an object the glob must not match
    b = make_plate(f"{bucket}/screen/PB.zarr", "PB", wells=("A01",), fields=1, field_shape=(8, 8),
                   storage_options=options)
    a = make_plate(f"{bucket}/screen/PA.zarr", "PA", wells=("A01",), fields=1, field_shape=(8, 8),
                   storage_options=options)
    make_plate(f"{bucket}/other/PC.zarr", "PC", wells=("A01",), fields=1, field_shape=(8, 8),
               storage_options=options)
    assert (a, b) == (f"{bucket}/screen/PA.zarr", f"{bucket}/screen/PB.zarr")

    uris = expand_uris(f"{bucket}/screen/*.zarr", options)
    assert uris == [a, b]
    assert [open_plate(u, options).name for u in uris] == ["PA", "PB"]  # real plates, readable as listed
    # globs and plain URIs mix, in the order given
    assert expand_uris([f"{bucket}/other/PC.zarr/", f"{bucket}/screen/P?.zarr"], options) == [
        f"{bucket}/other/PC.zarr", a, b]


def test_s3_glob_matching_nothing_names_the_pattern(s3_bucket):
    bucket, options = s3_bucket
    make_plate(f"{bucket}/screen/PA.zarr", "PA", wells=("A01",), fields=1, field_shape=(8, 8),
               storage_options=options)
    pattern = f"{bucket}/screen/*.ome.zarr"
    with pytest.raises(RayscreenError, match=re.escape(f"plate glob '{pattern}' matches nothing")):
        expand_uris([pattern], options)


def test_label_images_on_s3(s3_bucket):
    """Label images written into an s3:// plate read back through our reader and ome-zarr-models."""
    import numpy as np
    import zarr

    from rayscreen.store.labels import LabelWriter, read_label
    from rayscreen.store.uri import make_store

    bucket, options = s3_bucket
    uri = make_plate(f"{bucket}/screen/PL.zarr", "PL", wells=("A01", "B02"), fields=2, field_shape=(16, 24),
                     levels=2, storage_options=options)
    mask = np.zeros((4, 6), np.uint8)
    mask[1, 2] = 1
    LabelWriter(uri, options).write("B02", 1, mask, "saliency", downsample=4)
    np.testing.assert_array_equal(read_label(uri, "B02", 1, "saliency", storage_options=options),
                                  np.kron(mask, np.ones((4, 4), np.uint8)))
    assert read_label(uri, "B02", 1, "saliency", level=1, storage_options=options).shape == (8, 12)
    models = pytest.importorskip("ome_zarr_models.v05")
    group = zarr.open_group(store=make_store(uri, options, read_only=True, strict=False), mode="r")
    assert models.Labels.from_zarr(group["B/2/1/labels"]).attributes.ome.labels == ["saliency"]
    with pytest.raises(RayscreenError, match="well A01 field 0: no label image"):
        read_label(uri, "A01", 0, "saliency", storage_options=options)


def test_verbose_output_never_holds_the_credentials(s3_bucket):
    """`rayscreen -v` on an S3 plate: botocore's request logs carry the session token
    (X-Amz-Security-Token) and the access key id; -v must not turn them on (job logs keep them)."""
    import json
    import os
    import subprocess
    import sys

    bucket, options = s3_bucket
    uri = make_plate(f"{bucket}/PV.zarr", "PV", wells=("A01",), fields=1, field_shape=(8, 8), storage_options=options)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAVERBOSETEST", AWS_SECRET_ACCESS_KEY="verbose-secret-value",
               AWS_SESSION_TOKEN="SessionTokenVerboseTest")
    run = subprocess.run([sys.executable, "-c", "import sys; from rayscreen.cli import main; sys.exit(main())",
                          "-v", "info", uri, "--storage-options", json.dumps(options)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "PV" in run.stdout
    for secret in ("AKIAVERBOSETEST", "verbose-secret-value", "SessionTokenVerboseTest"):
        assert secret not in run.stdout + run.stderr, secret


def test_streaming_fields_from_s3_sends_one_get_per_object_and_no_size_requests(s3_bucket, s3_log):
    """Each field costs its image group's and array's metadata and one GET per chunk: no
    HEAD before each GET (s3fs's default does one to decide on a split download)."""
    import re

    from rayscreen.stream.datasource import StreamOptions, plan_wells, read_wells

    bucket, options = s3_bucket
    uri = make_plate(f"{bucket}/reqs.zarr", "R", wells=("A01", "A02"), fields=3, storage_options=options)
    with open(s3_log) as f:
        start = len(f.readlines())
    rows = [w for b in read_wells(plan_wells([uri], options), StreamOptions(storage_options=options))
            for w in b["well"]]
    assert len(rows) == 6
    with open(s3_log) as f:
        lines = f.readlines()[start:]
    requests = [m.groups() for m in (re.search(r'"(GET|HEAD|PUT|POST) (/[^ ?]*)', line) for line in lines) if m]
    field_objects = [path for method, path in requests if re.search(r"/reqs\.zarr/A/[12]/\d/", path)]
    assert [m for m, _ in requests if m == "HEAD"] == []
    # per field: image group zarr.json, array zarr.json, one chunk per channel (2): 4 GETs
    assert len(field_objects) == 6 * 4, requests
