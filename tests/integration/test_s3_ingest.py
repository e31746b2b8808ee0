"""Ingest on a real local Ray into a real S3-protocol server (moto) on 127.0.0.1, and back."""

import numpy as np
import pytest

from rayscreen.ingest import ingest
from rayscreen.store import open_plate
from rayscreen.testing import make_plate, random_field

from ..conftest import S3_SECRET
from ..unit.test_ingest import CHANNELS, plane, write_screen

pytestmark = pytest.mark.integration


def test_ingest_on_ray_to_s3_and_read_back(tmp_path, ray_local, s3_bucket, capsys):
    bucket, options = s3_bucket
    csv = write_screen(tmp_path, plates=("PA", "PB"), wells=("A01", "A02", "B03", "H12"), sites=2)
    uris = ingest(str(csv), f"{bucket}/screen", wells_per_task=1, storage_options=options)
    assert uris == [f"{bucket}/screen/PA.zarr", f"{bucket}/screen/PB.zarr"]
    for uri, name in zip(uris, ("PA", "PB")):
        plate = open_plate(uri, storage_options=options)
        assert plate.wells == ["A01", "A02", "B03", "H12"] and plate.channels == list(CHANNELS)
        assert plate.present_wells()[1] == []
        for c in range(2):
            np.testing.assert_array_equal(plate.read("H12", 1)[c], plane(name, "H12", 2, c))
    # credentials came from the environment and went nowhere else
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    for key in fs.find(bucket.removeprefix("s3://")):
        if key.endswith("zarr.json"):
            assert S3_SECRET not in fs.cat(key).decode()
    out = capsys.readouterr()
    assert S3_SECRET not in out.out + out.err


def test_open_plate_on_s3_reads_metadata_only(s3_bucket):
    """Opening is lazy: it works even when every well object is gone, until a well is read."""
    import s3fs

    bucket, options = s3_bucket
    uri = make_plate(f"{bucket}/lazy.zarr", storage_options=options, wells=("A01", "P24"))
    np.testing.assert_array_equal(open_plate(uri, options).read("P24", 1), random_field(0, "P24", 1, (2, 32, 40)))
    fs = s3fs.S3FileSystem(**options)
    fs.rm(f"{bucket.removeprefix('s3://')}/lazy.zarr/A", recursive=True)
    fs.rm(f"{bucket.removeprefix('s3://')}/lazy.zarr/P", recursive=True)
    plate = open_plate(uri, options)
    assert plate.wells == ["A01", "P24"] and plate.rows[-1] == "P"  # a 384-well plate
    assert plate.present_wells() == ([], ["A01", "P24"])
