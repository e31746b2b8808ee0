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

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import NotAPlateError, RayscreenError, preview

SUPPORTED_VERSIONS = ("0.4", "0.5")
AXIS_NAMES = ("t", "c", "z", "y", "x")


def ome_attributes(attrs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the OME attributes, the version) of a group's attributes, whichever NGFF version."""
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        ome = attrs["ome"]
        return ome, ome.get("version")
    version = None
    for key in ("plate", "well"):
        if isinstance(attrs.get(key), dict):
            version = attrs[key].get("version")
    if isinstance(attrs.get("multiscales"), list) and attrs["multiscales"] and isinstance(attrs["multiscales"][0], dict):
        version = version or attrs["multiscales"][0].get("version")
    return attrs, version


def wrap_ome(payload: dict[str, Any], version: str) -> dict[str, Any]:
    """Group attributes holding ``payload`` in the layout of ``version``."""
    if version == "0.5":
        return {"ome": {"version": "0.5", **payload}}
    return payload


_LIST = (list, tuple)
_NAME = (str, int)  # NGFF names are strings; a writer that wrote 1 for "1" is read as "1"
_KINDS = {_LIST: "a list", dict: "an object", _NAME: "a string"}


def _found(value: Any) -> str:
    """A JSON value for a message: its type and (the start of) its text."""
    if value is None:
        return "null"
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else
            "a string" if isinstance(value, str) else "a list" if isinstance(value, _LIST) else
            "an object" if isinstance(value, dict) else type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 80 else text[:77] + '...'}"


def _require(d: Any, key: str, what: str, where: str, kind: Any = None) -> Any:
    """``d[key]``, or a :class:`RayscreenError` naming ``where`` (the plate, well or field
    URI), the metadata key ``what`` (``plate.wells[3]``) and what was found there instead.
    ``kind``: the type the value must have (``_LIST``, ``dict``, ``_NAME``)."""
    if not isinstance(d, dict):
        raise RayscreenError(f"{where}: {what} metadata should be an object with a {key!r}; found {_found(d)}")
    if key not in d:
        raise RayscreenError(f"{where}: {what} metadata has no {key!r} (found keys {sorted(d)})")
    value = d[key]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise RayscreenError(f"{where}: {what}.{key} should be {_KINDS[kind]}; found {_found(value)}")
    return value


def _list(d: dict, key: str, what: str, where: str) -> list:
    """The optional list ``d[key]`` (empty when absent or null), or an error naming it."""
    value = d.get(key)
    if value is None:
        return []
    if not isinstance(value, _LIST):
        raise RayscreenError(f"{where}: {what}.{key} should be a list; found {_found(value)}")
    return list(value)


def _index(value: Any, what: str, where: str) -> int:
    """An integer of the metadata (``rowIndex``, an acquisition ``id``), or an error naming it."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise RayscreenError(f"{where}: {what} should be a non-negative integer; found {_found(value)}")


_ROW_RE = re.compile(r"^[A-Za-z]{1,2}$")
_COL_RE = re.compile(r"^\d{1,3}$")


def _match_name(name: str, names: tuple[str, ...], axis: str, what: str, where: str) -> int:
    """Index of a well path's row or column ``name`` among the plate's ``names``.

    The spec makes the path ``<row name>/<column name>``, but writers disagree on zero
    padding (a path ``A/1`` under columns ``01``) and case: an exact match first, then the
    one name that is the same number (columns) or letters in another case (rows); several
    or none is an error."""
    if name in names:
        return names.index(name)
    if axis == "column" and _COL_RE.match(name):
        same = [i for i, n in enumerate(names) if _COL_RE.match(n) and int(n) == int(name)]
    else:
        same = [i for i, n in enumerate(names) if n.upper() == name.upper()]
    if len(same) == 1:
        return same[0]
    found = f"{len(same)} that match it: {[names[i] for i in same]}" if same else f"{len(names)}: {preview(names)}"
    raise RayscreenError(f"{where}: {what} names {axis} {name!r} and gives no {axis}Index, but plate.{axis}s "
                         f"should then list it once; it lists {found}")


def _well_name(path: str, what: str, where: str) -> str:
    """The canonical name (``A01``) of a well path ``A/1``, or an error: rayscreen names wells by
    row letters and a column number, so a path it cannot read so cannot be addressed."""
    parts = path.split("/")
    if len(parts) != 2 or not _ROW_RE.match(parts[0]) or not _COL_RE.match(parts[1]) or int(parts[1]) == 0:
        raise RayscreenError(
            f"{where}: {what} is {path!r}; expected '<row>/<column>' with row letters and a column number "
            f"from 1 (e.g. 'A/1' or 'B/03'), by which rayscreen names the well (A01)")
    return f"{parts[0].upper()}{int(parts[1]):02d}"


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
        if not isinstance(plate, dict):
            raise NotAPlateError(f"{where}: the 'plate' metadata should be an object; found {_found(plate)}")
        version = plate.get("version", version) or "0.4"
        if str(version) not in SUPPORTED_VERSIONS:
            raise NotAPlateError(f"{where}: NGFF version {version!r} is not supported; expected one of {SUPPORTED_VERSIONS}")
        rows = tuple(str(_require(r, "name", f"plate.rows[{i}]", where, _NAME))
                     for i, r in enumerate(_require(plate, "rows", "plate", where, _LIST)))
        columns = tuple(str(_require(c, "name", f"plate.columns[{i}]", where, _NAME))
                        for i, c in enumerate(_require(plate, "columns", "plate", where, _LIST)))
        wells = []
        named: dict[str, str] = {}
        for i, w in enumerate(_require(plate, "wells", "plate", where, _LIST)):
            what = f"plate.wells[{i}]"
            path = str(_require(w, "path", what, where, _NAME))
            name = _well_name(path, f"{what}.path", where)
            if name in named:
                raise RayscreenError(f"{where}: {what}.path {path!r} and the well path {named[name]!r} before it "
                                     f"both name well {name}; expected each well listed once")
            named[name] = path
            row, col = path.split("/")
            # rowIndex/columnIndex are required since 0.4 but some writers omit them
            ri = w.get("rowIndex", w.get("row_index"))
            ci = w.get("columnIndex", w.get("column_index"))
            wells.append(WellRef(
                path,
                _match_name(row, rows, "row", f"{what}.path {path!r}", where) if ri is None
                else _index(ri, f"{what}.rowIndex", where),
                _match_name(col, columns, "column", f"{what}.path {path!r}", where) if ci is None
                else _index(ci, f"{what}.columnIndex", where)))
        acqs = tuple(Acquisition(_index(_require(a, "id", f"plate.acquisitions[{i}]", where), f"plate.acquisitions[{i}].id", where),
                                 a.get("name"), a.get("maximumfieldcount"))
                     for i, a in enumerate(_list(plate, "acquisitions", "plate", where)))
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
        return {_well_name(w.path, "well path", f"plate {self.name!r}"): w.path for w in self.wells}


def _field_path(value: Any, what: str, where: str) -> str:
    """A field's image path as a well lists it: one path segment (``"0"``), or an error. The
    path is joined under the well's (``A/1/<path>``), so ``'../../B/1/0'`` would read another
    well's field (or, with zarr, fail as a bare ValueError) and ``'0/0'`` a level array."""
    path = str(value)
    if not path or "/" in path or path in (".", ".."):
        raise RayscreenError(f"{where}: {what} is {path!r}; expected the name of one image group inside the "
                             f"well (a single path segment such as '0': not empty, no '/', not '.' or '..')")
    return path


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
        images = tuple(WellImage(_field_path(_require(i, "path", f"well.images[{k}]", where, _NAME),
                                             f"well.images[{k}].path", where), i.get("acquisition"))
                       for k, i in enumerate(_require(well, "images", "well", where, _LIST)))
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
        if not isinstance(ms, _LIST):
            raise RayscreenError(f"{where}: multiscales should be a list of objects; found {_found(ms)}")
        ms0 = ms[0]
        if not isinstance(ms0, dict):
            raise RayscreenError(f"{where}: multiscales[0] should be an object; found {_found(ms0)}")
        raw_axes = ms0.get("axes")
        if raw_axes is None:
            raise RayscreenError(f"{where}: multiscales has no 'axes' (NGFF >= 0.4 requires them)")
        if not isinstance(raw_axes, _LIST):
            raise RayscreenError(f"{where}: multiscales[0].axes should be a list; found {_found(raw_axes)}")
        # 0.3 wrote axes as plain strings
        written = [a if isinstance(a, str) else _require(a, "name", f"multiscales[0].axes[{i}]", where, _NAME)
                   for i, a in enumerate(raw_axes)]
        # names in any case, read as lower case: iohub writes 'T', 'C', 'Z', 'Y', 'X'
        axes = tuple(Axis(str(n).lower()) if isinstance(a, str) else Axis(str(n).lower(), a.get("type"), a.get("unit"))
                     for n, a in zip(written, raw_axes))
        names = [a.name for a in axes]
        # whole names: a substring test would let 'zy' or 'cz' through
        unknown = [w for w, n in zip(written, names) if n not in AXIS_NAMES]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if unknown or repeated or "y" not in names or "x" not in names:
            problem = (f"unknown axis names {unknown}" if unknown else
                       f"repeated axes {repeated}{'' if written == names else ' (names compared ignoring case)'}"
                       if repeated else "no " + " and no ".join(n for n in ("y", "x") if n not in names))
            raise RayscreenError(f"{where}: multiscales[0].axes are {written}; expected each of t, c, z, y, x at most "
                                 f"once (in any case), y and x among them ({problem})")
        datasets = _require(ms0, "datasets", "multiscales[0]", where, _LIST)
        if not datasets:
            raise RayscreenError(f"{where}: multiscales[0].datasets is empty; expected at least one resolution level")
        paths = tuple(str(_require(d, "path", f"multiscales[0].datasets[{i}]", where, _NAME))
                      for i, d in enumerate(datasets))
        scales = []
        for i, d in enumerate(datasets):
            what = f"multiscales[0].datasets[{i}]"
            transforms = _list(d, "coordinateTransformations", what, where)
            scale = next((_require(t, "scale", f"{what}.coordinateTransformations[{k}]", where, _LIST)
                          for k, t in enumerate(transforms) if not isinstance(t, dict) or t.get("type") == "scale"),
                         None)
            if scale is not None and (len(scale) != len(axes) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)):
                raise RayscreenError(f"{where}: {what} scale should be {len(axes)} numbers, one per axis {names}; "
                                     f"found {_found(scale)}")
            scales.append(tuple(scale) if scale else tuple(1.0 for _ in axes))
        omero = ome.get("omero") or {}
        if not isinstance(omero, dict):
            raise RayscreenError(f"{where}: omero should be an object; found {_found(omero)}")
        channels = _list(omero, "channels", "omero", where)
        for i, c in enumerate(channels):
            if not isinstance(c, dict):
                raise RayscreenError(f"{where}: omero.channels[{i}] should be an object; found {_found(c)}")
        labels = tuple(str(c.get("label", f"c{i}")) for i, c in enumerate(channels))
        return cls(axes, paths, tuple(scales), labels, str(ms0.get("version", version) or "0.4"))

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
