"""Masks as NGFF label images inside a plate's field images, so a viewer overlays them.

Layout written into an image group ``<well>/<field>/`` (NGFF 0.4 on Zarr v2, 0.5 on
Zarr v3, following the image's own version)::

    labels/                 "labels": [..., <name>]   (names already there are kept)
      <name>/               multiscales + "image-label" (colour, source "../../")
        0, 1, ...           one uint8 array per level of the image, same y/x shape

The label image has the image's axes without ``c`` (``t`` and ``z`` of size 1: a mask is
made from one 2-D field) and the image's scales, so napari, ome-zarr-py or any NGFF
reader puts it on the pixels it was computed from. Rewriting a field's label gives the
same bytes; writing one of a well's fields never touches another well.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np
import zarr
import zarr.api.asynchronous
from zarr.core.sync import sync  # zarr's own event loop, where its stores' async I/O runs

from .errors import MissingWellError, RayscreenError
from .ngff import Axis, Multiscale, ome_attributes, wrap_ome
from .plate import open_plate
from .uri import make_store
from .wells import well_name
from .writer import _compressor

LABEL_RGBA = [255, 0, 255, 160]  # magenta, semi-transparent: visible over any channel colour


def check_label_name(name: str) -> str:
    """A label name is one path segment (it becomes ``labels/<name>``)."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name in ("labels",):
        raise RayscreenError(f"label name {name!r}: expected one path segment such as 'saliency'")
    return name


def downsampled_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """(Y, X) of a field downsampled ``factor`` times by blocks: ceil(Y / factor),
    ceil(X / factor); the last row and column of blocks cover the field's remainder, so no
    strip of the field goes unmapped (infer's saliency tiles and masks, label images)."""
    return -(-int(shape[0]) // factor), -(-int(shape[1]) // factor)


def label_levels(mask: np.ndarray, step: float, shapes: list[tuple[int, int]],
                 level_scales: list[float]) -> list[np.ndarray]:
    """Nearest-neighbour copies of ``mask`` on every pyramid level of the image.

    mask : (h, w) uint8; one mask pixel covers ``step`` x ``step`` level-0 pixels.
    shapes : (Y_k, X_k) of each image level k; ``level_scales[k]``: level-0 pixels per
        level-k pixel (1, 2, 4, ... for a 2x pyramid).
    Returns one (Y_k, X_k) uint8 array per level; pixels the mask did not cover (the
    remainder when the field is not a multiple of ``step``) are 0.

    Written by hand rather than with ``skimage.transform.resize(order=0)``: that maps
    pixel centres through a continuous scale and can shift an edge by one pixel, where a
    level-k pixel must take the mask pixel holding its level-0 corner.
    """
    mask = np.asarray(mask, dtype=np.uint8)
    h, w = mask.shape
    out = []
    for (yk, xk), s in zip(shapes, level_scales):
        rows = np.floor(np.arange(yk) * s / step).astype(np.int64)
        cols = np.floor(np.arange(xk) * s / step).astype(np.int64)
        level = np.zeros((yk, xk), np.uint8)
        ry, cx = rows < h, cols < w
        level[np.ix_(ry, cx)] = mask[np.ix_(rows[ry], cols[cx])]
        out.append(level)
    return out


class LabelWriter:
    """Writes label images into the fields of one plate (open once, write many fields).

    A well's fields are written concurrently on zarr's event loop (one round of metadata
    reads, checks, then one round of writes): a field is ~8 small requests, which one by
    one through zarr's synchronous API cost ~2 ms each locally and a round trip each on S3.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.plate = open_plate(uri, storage_options)
        self.uri = self.plate.uri
        self._store = make_store(self.uri, storage_options, read_only=False, strict=False)
        self._root: Any = None  # zarr AsyncGroup, opened on first use (on zarr's loop)

    def write(self, well: str, field: str | int, mask: np.ndarray, name: str, **kwargs: Any) -> None:
        """Write ``mask`` (h, w) as label image ``name`` of one field (see :meth:`write_fields`)."""
        self.write_fields(well, [field], np.asarray(mask)[np.newaxis], name, **kwargs)

    def write_fields(self, well: str, fields: Sequence[str | int], masks: np.ndarray, name: str, *,
                     level: int = 0, downsample: int = 1, description: str = "") -> None:
        """Write ``masks`` (F, h, w), each computed on level ``level`` of its field and
        downsampled ``downsample`` times, as label image ``name`` of ``fields`` of ``well``,
        on every level of the image. Every field is checked before any is written."""
        check_label_name(name)
        well = well_name(well)
        if len(fields) != len(masks):
            raise RayscreenError(f"plate {self.plate.name!r} well {well}: {len(fields)} fields but "
                                 f"{len(masks)} masks")
        sync(self._write_well(well, [str(f) for f in fields], masks, name, level, downsample, description))

    async def _write_well(self, well, fields, masks, name, level, downsample, description) -> None:
        if self._root is None:
            self._root = await zarr.api.asynchronous.open_group(store=self._store, mode="r+")
        plans = await asyncio.gather(*(self._plan(well, f, m, level, downsample) for f, m in zip(fields, masks)))
        await asyncio.gather(*(self._write_field(plan, name, description) for plan in plans))

    async def _plan(self, well: str, field: str, mask: np.ndarray, level: int, downsample: int) -> dict[str, Any]:
        """Read the field's image metadata and check ``mask`` against it (no writes)."""
        where = f"plate {self.plate.name!r} well {well} field {field}"
        path = f"{self.plate.well_path(well)}/{field}"
        try:
            image = await self._root.getitem(path)
        except KeyError:
            raise MissingWellError(f"{where}: image group {path} is missing") from None
        ms = Multiscale.from_attrs(dict(image.attrs), where=f"{self.uri}/{path}")
        axes = ms.axis_names
        iy, ix = axes.index("y"), axes.index("x")
        scales = [s[iy] / ms.scales[0][iy] for s in ms.scales]
        if not 0 <= level < len(scales):
            raise RayscreenError(f"{where}: no level {level} (the image has {len(scales)})")
        arrays = await asyncio.gather(*(image.getitem(p) for p in ms.paths))
        shapes = [(a.shape[iy], a.shape[ix]) for a in arrays]
        expected = downsampled_shape(shapes[level], downsample)
        if tuple(mask.shape) != expected:
            raise RayscreenError(f"{where}: mask shape {tuple(mask.shape)}; expected {expected} (level {level} "
                                 f"{shapes[level]} downsampled {downsample}x)")
        return {"image": image, "ms": ms, "iy": iy, "ix": ix, "chunks": arrays[0].chunks,
                "planes": label_levels(mask, scales[level] * downsample, shapes, scales)}

    async def _write_field(self, plan: dict[str, Any], name: str, description: str) -> None:
        ms, iy, ix = plan["ms"], plan["iy"], plan["ix"]
        version = ms.version if ms.version in ("0.4", "0.5") else ("0.5" if self.plate.zarr_format == 3 else "0.4")
        keep = [i for i, a in enumerate(ms.axes) if a.name != "c"]
        label_axes = tuple(Axis(ms.axes[i].name, ms.axes[i].type, ms.axes[i].unit) for i in keep)
        label_ms = Multiscale(axes=label_axes, paths=tuple(str(k) for k in range(len(plan["planes"]))),
                              scales=tuple(tuple(s[i] for i in keep) for s in ms.scales), version=version)
        image_label: dict[str, Any] = {"colors": [{"label-value": 1, "rgba": LABEL_RGBA}],
                                       "source": {"image": "../../"}}
        if description:
            image_label["properties"] = [{"label-value": 1, "description": description}]
        attrs = label_ms.to_attrs(name=name)
        if version == "0.5":
            attrs["ome"]["image-label"] = image_label
        else:
            attrs["image-label"] = {"version": "0.4", **image_label}
        labels = await plan["image"].require_group("labels")
        # the label's own group is replaced whole: a rewrite leaves nothing of an older one
        group = await labels.create_group(name, overwrite=True, attributes=attrs)
        writes = []
        for k, plane in enumerate(plan["planes"]):
            shape = tuple(plane.shape[0] if a.name == "y" else plane.shape[1] if a.name == "x" else 1
                          for a in label_axes)
            chunks = tuple(min(plan["chunks"][iy], shape[i]) if a.name == "y" else
                           min(plan["chunks"][ix], shape[i]) if a.name == "x" else 1 for i, a in enumerate(label_axes))
            kwargs: dict[str, Any] = dict(data=plane.reshape(shape), chunks=chunks, fill_value=0, overwrite=True,
                                          compressors=_compressor(self.plate.zarr_format),
                                          # every chunk stored, as in the images: a missing one is an error
                                          config={"write_empty_chunks": True})
            if self.plate.zarr_format == 3:
                kwargs["dimension_names"] = [a.name for a in label_axes]
            else:
                kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
            writes.append(group.create_array(str(k), **kwargs))
        await asyncio.gather(*writes)
        # the listing last: a reader never finds a listed label without its arrays
        listed, _ = ome_attributes(dict(labels.attrs))
        if name not in listed.get("labels", []):
            names = [*listed.get("labels", []), name]
            # other keys another tool keeps there survive (0.5: inside "ome")
            extra = {k: v for k, v in listed.items() if k not in ("labels", "version")}
            await labels.update_attributes(wrap_ome({**extra, "labels": names}, version))


def read_label(uri: str, well: str, field: str | int, name: str, level: int = 0,
               storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Label image ``name`` of a field as (Y, X) (t/z of size 1 squeezed); raises naming what is missing."""
    plate = open_plate(uri, storage_options)
    path = f"{plate.well_path(well)}/{field}/labels/{name}/{level}"
    root = zarr.open_group(store=make_store(plate.uri, storage_options, read_only=True, strict=False), mode="r")
    try:
        arr = root[path]
    except KeyError:
        raise RayscreenError(f"plate {plate.name!r} well {well_name(well)} field {field}: no label image "
                             f"{name!r} level {level} ({path})") from None
    return np.asarray(arr[...]).reshape(arr.shape[-2:])
