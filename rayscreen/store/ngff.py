"""OME-NGFF HCS metadata (0.4 on Zarr v2, 0.5 on Zarr v3) as frozen dataclasses.

``from_dict`` accepts what other writers produce (ome-zarr-py, iohub, ngff-zarr,
Fractal) and says exactly what was expected where it cannot; ``to_dict`` writes
what the spec asks for. Version handling in one place:

- 0.4: attributes at the top level of ``.zattrs``; ``version`` inside ``plate``/``well``/
  each ``multiscales`` entry.
- 0.5: attributes under ``attributes.ome`` of ``zarr.json``, ``ome.version`` = "0.5". The
  0.5 text and its JSON schema disagree on whether ``plate.version`` is still written,
  so we write both and accept either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import NotAPlateError, RayscreenError

SUPPORTED_VERSIONS = ("0.4", "0.5")


def ome_attributes(attrs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the OME attributes, the version) of a group's attributes, whichever NGFF version."""
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        ome = attrs["ome"]
        return ome, ome.get("version")
    version = None
    for key in ("plate", "well"):
        if isinstance(attrs.get(key), dict):
            version = attrs[key].get("version")
    if isinstance(attrs.get("multiscales"), list) and attrs["multiscales"]:
        version = version or attrs["multiscales"][0].get("version")
    return attrs, version


def wrap_ome(payload: dict[str, Any], version: str) -> dict[str, Any]:
    """Group attributes holding ``payload`` in the layout of ``version``."""
    if version == "0.5":
        return {"ome": {"version": "0.5", **payload}}
    return payload


def _require(d: dict, key: str, what: str, where: str) -> Any:
    if key not in d:
        raise RayscreenError(f"{where}: {what} metadata has no {key!r} (found keys {sorted(d)})")
    return d[key]


@dataclass(frozen=True)
class WellRef:
    """A well listed in the plate metadata: ``path`` is ``"<row>/<column>"``."""

    path: str
    row_index: int
    column_index: int


@dataclass(frozen=True)
class Acquisition:
    id: int
    name: str | None = None
    maximumfieldcount: int | None = None


@dataclass(frozen=True)
class PlateMeta:
    name: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    wells: tuple[WellRef, ...]
    field_count: int | None = None
    acquisitions: tuple[Acquisition, ...] = ()
    version: str = "0.5"

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> "PlateMeta":
        ome, version = ome_attributes(attrs)
        if "plate" not in ome:
            kind = "a single image (multiscales)" if "multiscales" in ome else (
                "a well" if "well" in ome else f"a group with attribute keys {sorted(attrs)}")
            raise NotAPlateError(
                f"{where} is not an OME-Zarr HCS plate: expected 'plate' metadata "
                f"(NGFF 0.4 .zattrs or 0.5 zarr.json attributes.ome); found {kind}"
            )
        plate = ome["plate"]
        version = plate.get("version", version) or "0.4"
        if str(version) not in SUPPORTED_VERSIONS:
            raise NotAPlateError(f"{where}: NGFF version {version!r} is not supported; expected one of {SUPPORTED_VERSIONS}")
        rows = tuple(r["name"] for r in _require(plate, "rows", "plate", where))
        columns = tuple(c["name"] for c in _require(plate, "columns", "plate", where))
        wells = []
        for w in _require(plate, "wells", "plate", where):
            path = _require(w, "path", "plate.wells[]", where)
            row, _, col = path.partition("/")
            # rowIndex/columnIndex are required since 0.4 but some writers omit them
            ri = w.get("rowIndex", w.get("row_index"))
            ci = w.get("columnIndex", w.get("column_index"))
            wells.append(WellRef(path, rows.index(row) if ri is None else int(ri),
                                 columns.index(col) if ci is None else int(ci)))
        acqs = tuple(Acquisition(int(a["id"]), a.get("name"), a.get("maximumfieldcount"))
                     for a in plate.get("acquisitions", []) or [])
        return cls(plate.get("name") or "", rows, columns, tuple(wells), plate.get("field_count"), acqs, str(version))

    def to_attrs(self) -> dict[str, Any]:
        plate: dict[str, Any] = {
            "name": self.name,
            "rows": [{"name": r} for r in self.rows],
            "columns": [{"name": c} for c in self.columns],
            "wells": [{"path": w.path, "rowIndex": w.row_index, "columnIndex": w.column_index} for w in self.wells],
            "version": self.version,
        }
        if self.field_count is not None:
            plate["field_count"] = self.field_count
        if self.acquisitions:
            plate["acquisitions"] = [
                {k: v for k, v in (("id", a.id), ("name", a.name), ("maximumfieldcount", a.maximumfieldcount)) if v is not None}
                for a in self.acquisitions
            ]
        return wrap_ome({"plate": plate}, self.version)

    def well_names(self) -> dict[str, str]:
        """Canonical well name (``A01``) -> path (``A/1``), in metadata order."""
        out = {}
        for w in self.wells:
            row, col = w.path.split("/")
            out[f"{row.upper()}{int(col):02d}"] = w.path
        return out


@dataclass(frozen=True)
class WellImage:
    path: str
    acquisition: int | None = None


@dataclass(frozen=True)
class WellMeta:
    images: tuple[WellImage, ...]
    version: str = "0.5"

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> "WellMeta | None":
        """None when the group carries no well metadata (absent or not yet complete)."""
        ome, version = ome_attributes(attrs)
        if "well" not in ome:
            return None
        well = ome["well"]
        images = tuple(WellImage(str(_require(i, "path", "well.images[]", where)), i.get("acquisition"))
                       for i in _require(well, "images", "well", where))
        return cls(images, str(well.get("version", version) or "0.4"))

    def to_attrs(self) -> dict[str, Any]:
        images = [{"path": i.path, **({"acquisition": i.acquisition} if i.acquisition is not None else {})}
                  for i in self.images]
        return wrap_ome({"well": {"images": images, "version": self.version}}, self.version)


@dataclass(frozen=True)
class Axis:
    name: str
    type: str | None = None
    unit: str | None = None


@dataclass(frozen=True)
class Multiscale:
    """The first ``multiscales`` entry of an image group: axes and level paths."""

    axes: tuple[Axis, ...]
    paths: tuple[str, ...]
    scales: tuple[tuple[float, ...], ...] = ()
    channel_names: tuple[str, ...] = ()
    version: str = "0.5"

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> "Multiscale":
        ome, version = ome_attributes(attrs)
        ms = ome.get("multiscales")
        if not ms:
            raise RayscreenError(f"{where}: expected 'multiscales' image metadata, found attribute keys {sorted(ome)}")
        ms0 = ms[0]
        raw_axes = ms0.get("axes")
        if raw_axes is None:
            raise RayscreenError(f"{where}: multiscales has no 'axes' (NGFF >= 0.4 requires them)")
        # 0.3 wrote axes as plain strings
        axes = tuple(Axis(a) if isinstance(a, str) else Axis(a["name"], a.get("type"), a.get("unit")) for a in raw_axes)
        names = [a.name for a in axes]
        if "y" not in names or "x" not in names or any(n not in "tczyx" for n in names):
            raise RayscreenError(f"{where}: axes {names} are not a subset of t, c, z, y, x containing y and x")
        datasets = _require(ms0, "datasets", "multiscales", where)
        paths = tuple(str(d["path"]) for d in datasets)
        scales = []
        for d in datasets:
            scale = next((t["scale"] for t in d.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
            scales.append(tuple(scale) if scale else tuple(1.0 for _ in axes))
        channels = tuple(c.get("label", f"c{i}") for i, c in enumerate((ome.get("omero") or {}).get("channels", [])))
        return cls(axes, paths, tuple(scales), channels, str(ms0.get("version", version) or "0.4"))

    def to_attrs(self, name: str = "", windows: Sequence[dict[str, float]] | None = None) -> dict[str, Any]:
        """NGFF attributes; ``windows``: omero display window of each channel
        (``{"start", "end", "min", "max"}``; default 0-65535, the 16-bit range)."""
        entry: dict[str, Any] = {
            "name": name,
            "axes": [{k: v for k, v in (("name", a.name), ("type", a.type), ("unit", a.unit)) if v} for a in self.axes],
            "datasets": [
                {"path": p, "coordinateTransformations": [{"type": "scale", "scale": list(s)}]}
                for p, s in zip(self.paths, self.scales)
            ],
        }
        if self.version == "0.4":
            entry["version"] = "0.4"
        payload: dict[str, Any] = {"multiscales": [entry]}
        if self.channel_names:
            payload["omero"] = {
                "channels": [{"label": c, "active": True, "color": _DEFAULT_COLOURS[i % len(_DEFAULT_COLOURS)],
                              "window": dict(windows[i]) if windows else
                              {"start": 0, "end": 65535, "min": 0, "max": 65535}}
                             for i, c in enumerate(self.channel_names)],
                "rdefs": {"model": "color"},
            }
            if self.version == "0.4":
                payload["omero"]["version"] = "0.4"
        return wrap_ome(payload, self.version)

    @property
    def axis_names(self) -> str:
        return "".join(a.name for a in self.axes)


_DEFAULT_COLOURS = ["0000FF", "00FF00", "FF0000", "FFFF00", "FF00FF", "00FFFF", "FFFFFF"]


def display_windows(image: np.ndarray) -> list[dict[str, float]]:
    """omero display windows of a (C, Y, X) field: ``min``/``max`` the range of its dtype
    (of its values for floats), ``start``/``end`` its 0.1 and 99.9 percentiles per channel
    (on every 4th pixel: a viewer's contrast, not a measurement), so that a viewer shows a
    uint8 or a 0-1 float plate instead of black."""
    image = np.asarray(image)
    sample = image[:, ::4, ::4].reshape(image.shape[0], -1).astype(np.float64)
    lows, highs = np.percentile(sample, [0.1, 99.9], axis=1)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        vmin, vmax = float(info.min), float(info.max)
    elif image.dtype == bool:
        vmin, vmax = 0.0, 1.0
    else:
        vmin, vmax = float(np.min(image)), float(np.max(image))
    out = []
    for low, high in zip(lows, highs):
        start, end = float(low), float(high)
        if end <= start:  # a flat channel: any window that holds its value
            end = start + 1
        out.append({"start": start, "end": end, "min": min(vmin, start), "max": max(vmax, end)})
    return out


def sort_wells(wells: list[WellRef]) -> list[WellRef]:
    return sorted(wells, key=lambda w: (w.row_index, w.column_index))


__all__ = ["PlateMeta", "WellMeta", "WellImage", "WellRef", "Multiscale", "Axis", "Acquisition",
           "ome_attributes", "wrap_ome"]
