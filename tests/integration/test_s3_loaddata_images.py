"""Ingest whose inputs live on S3: the LoadData CSV and its TIFF/PNG images on a real
S3-protocol server (moto) on 127.0.0.1, read through s3fs by Ray workers, as on a cluster."""

import io

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from rayscreen.ingest import ingest
from rayscreen.store import RayscreenError, open_plate

from ..unit.test_ingest import CHANNELS, plane

pytestmark = pytest.mark.integration

WELLS = ("A01", "B02")


def _put_screen(fs, bucket: str) -> str:
    """Plate "001" (a name that looks like a number), two wells of two sites, tiny images.

    DNA is a TIFF in ``images/`` relative to the CSV (which sits in ``csv/``: ``../images``);
    Actin is a PNG named by an absolute ``s3://`` PathName. Returns the CSV's URI.
    """
    root = f"{bucket}/screen"
    rows = []
    for w in WELLS:
        for s in (1, 2):
            tif, png = io.BytesIO(), f"{w}_s{s}_Actin.png"
            tifffile.imwrite(tif, plane("001", w, s, 0, shape=(12, 10), dtype=np.uint8))
            fs.pipe(f"{root}/images/{w}_s{s}_DNA.tif".removeprefix("s3://"), tif.getvalue())
            fs.pipe(f"{root}/png/{png}".removeprefix("s3://"),
                    iio.imwrite("<bytes>", plane("001", w, s, 1, shape=(12, 10), dtype=np.uint8), extension=".png"))
            rows.append({"Metadata_Plate": "001", "Metadata_Well": w, "Metadata_Site": s,
                         "Metadata_Compound": f"c{w}",
                         "FileName_DNA": f"{w}_s{s}_DNA.tif", "PathName_DNA": "../images",
                         "FileName_Actin": png, "PathName_Actin": f"{root}/png"})
    csv = f"{root}/csv/load_data.csv"
    fs.pipe(csv.removeprefix("s3://"), pd.DataFrame(rows).to_csv(index=False).encode())
    return csv


def test_ingest_loaddata_and_images_from_s3_on_ray(ray_local, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    csv = _put_screen(fs, bucket)
    # Ray workers read the images: storage_options travel with the LoadData
    uri, = ingest(csv, f"{bucket}/out", wells_per_task=1, storage_options=options, progress=False)
    assert uri == f"{bucket}/out/001.zarr"
    plate = open_plate(uri, storage_options=options)
    assert plate.name == "001" and plate.wells == list(WELLS) and plate.channels == list(CHANNELS)
    assert plate.present_wells() == (list(WELLS), [])
    for c in range(2):
        np.testing.assert_array_equal(plate.read("B02", 1)[c], plane("001", "B02", 2, c, shape=(12, 10), dtype=np.uint8))
    assert plate.annotations.set_index("Metadata_Well").loc["B02", "Metadata_Compound"] == "cB02"


def test_missing_image_on_s3_names_plate_well_site_and_uri(s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    csv = _put_screen(fs, bucket)
    fs.rm(f"{bucket}/screen/images/B02_s2_DNA.tif".removeprefix("s3://"))
    with pytest.raises(RayscreenError, match=rf"plate '001' well B02 site 2 channel DNA: image file "
                                             rf"{bucket}/screen/images/B02_s2_DNA.tif is missing"):
        ingest(csv, str(tmp_path / "out"), use_ray=False, storage_options=options, progress=False)
