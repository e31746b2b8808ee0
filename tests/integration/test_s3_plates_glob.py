"""``plates:`` globs on S3 (``s3://bucket/screen/*.zarr``) expand through fsspec, against a
real S3-protocol server (moto) on 127.0.0.1."""

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
