"""Per-plate, per-channel intensity normalisation of fields, fitted by streaming over a plate.

Fit/transform objects in the pycytominer / scikit-learn style, all of them a per-channel
affine map ``(x - offset) / scale`` (optionally clipped to [0, 1]):

- :class:`PercentileScaler`: ``low``/``high`` percentiles map to 0/1, clipped,
- :class:`MeanStdScaler`: zero mean and unit standard deviation,
- :class:`ControlScaler`: either of the two, fitted on control wells' fields only, so
  treated wells are expressed relative to the plate's own controls.

Fitting streams: a :class:`ChannelStats` accumulator keeps exact per-channel moments
(merged with Chan's parallel formula) and a bounded uniform sample of pixels for
percentiles, never a plate's pixels. Accumulators from parallel Ray tasks ``merge``; a
scaler is then fitted from the merged stats (:meth:`IntensityScaler.fit_stats`).

The fitted state is plain JSON numbers (``to_dict``/``from_dict``), stored in the plate's
``rayscreen.normalization`` attribute (:func:`save_normalization`) and in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..store import RayscreenError, open_plate
from ..store.extras import update_plate_attrs
from .illumination import ATTR_KEY as ILLUM_KEY
from .illumination import illumination_entry, select_fields

VERSION = 1
ATTR_KEY = "normalization"


class ChannelStats:
    """Streaming per-channel statistics of (C, Y, X) fields.

    Exact count, mean and sum of squared deviations per channel, plus a uniform random
    sample of at most ``max_samples`` pixels per channel (``pixels_per_field`` drawn from
    each field) for percentiles. The sample is a bottom-k sample: every drawn pixel gets a
    random key and the ``max_samples`` smallest keys are kept, which stays uniform over all
    fields however the accumulators are split and merged.
    """

    def __init__(self, pixels_per_field: int = 4096, max_samples: int = 262144, seed: int = 0):
        self.pixels_per_field = pixels_per_field
        self.max_samples = max_samples
        self.rng = np.random.default_rng(seed)
        self.count = 0  # pixels per channel
        self.fields = 0
        self.mean: np.ndarray | None = None  # (C,) float64
        self.m2: np.ndarray | None = None  # (C,) float64, sum of squared deviations
        self.sample: np.ndarray | None = None  # (C, K) float32
        self.keys: np.ndarray | None = None  # (K,) float64

    @property
    def channels(self) -> int:
        return 0 if self.mean is None else len(self.mean)

    def add(self, image: np.ndarray) -> "ChannelStats":
        """Add one field (C, Y, X)."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"field shape {image.shape}: expected (C, Y, X)")
        flat = image.reshape(image.shape[0], -1)
        n = flat.shape[1]
        # one channel at a time: a float64 copy of a whole 5 x 2160 x 2560 uint16 field and
        # its squared deviations peaked at 8x the field (440 MB), in every read task at once
        mean, m2 = np.empty(len(flat)), np.empty(len(flat))
        for c, plane in enumerate(flat):
            values = plane.astype(np.float64)
            mean[c] = values.mean()
            values -= mean[c]
            m2[c] = np.dot(values, values)
        k = min(self.pixels_per_field, n)
        idx = self.rng.choice(n, size=k, replace=False)
        self._combine(n, mean, m2, flat[:, idx].astype(np.float32), self.rng.random(k))
        self.fields += 1
        return self

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Add another accumulator's fields into this one."""
        if other.count:
            self._combine(other.count, other.mean, other.m2, other.sample, other.keys)
            self.fields += other.fields
        return self

    def _combine(self, n, mean, m2, sample, keys) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean.copy(), m2.copy()
            self.sample, self.keys = sample, keys
        else:
            if len(mean) != len(self.mean):
                raise ValueError(f"fields with {len(mean)} channels after fields with {len(self.mean)}")
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
            self.count = total
            self.sample = np.concatenate([self.sample, sample], axis=1)
            self.keys = np.concatenate([self.keys, keys])
        if len(self.keys) > self.max_samples:
            keep = np.argpartition(self.keys, self.max_samples)[: self.max_samples]
            self.sample, self.keys = self.sample[:, keep], self.keys[keep]

    def _require(self) -> None:
        if not self.count:
            raise ValueError("no field was added; nothing to fit on")

    def std(self) -> np.ndarray:
        """Population standard deviation per channel (C,)."""
        self._require()
        return np.sqrt(self.m2 / self.count)

    def percentiles(self, q: float | list[float]) -> np.ndarray:
        """Percentiles per channel from the pixel sample: (C,) for a scalar ``q``, else (len(q), C)."""
        self._require()
        return np.percentile(self.sample, q, axis=1)


def _to_list(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


class IntensityScaler:
    """Base: a per-channel ``(x - offset) / scale``, fitted on fields of a plate.

    ``fit(images)`` takes an iterable of (C, Y, X) fields; ``transform(image)`` maps a
    (C, Y, X) field to float32. A channel whose spread is 0 gets ``scale = 1``.
    """

    method = ""
    clip = False

    def __init__(self):
        self.offset: np.ndarray | None = None  # (C,)
        self.scale: np.ndarray | None = None  # (C,)

    # subclasses: the parameters (JSON) and how stats become offset, scale
    def params(self) -> dict[str, Any]:
        return {}

    def _offset_scale(self, stats: ChannelStats) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def fitted(self) -> bool:
        return self.offset is not None

    def new_stats(self, seed: int = 0) -> ChannelStats:
        """An empty accumulator of the kind this scaler fits from (for parallel fitting)."""
        return ChannelStats(seed=seed)

    def fit(self, images: Iterable[np.ndarray], seed: int = 0) -> "IntensityScaler":
        stats = self.new_stats(seed)
        for image in images:
            stats.add(image)
        return self.fit_stats(stats)

    def fit_stats(self, stats: ChannelStats) -> "IntensityScaler":
        offset, scale = self._offset_scale(stats)
        scale = np.where(scale > 0, scale, 1.0)
        self.offset, self.scale = np.asarray(offset, np.float64), np.asarray(scale, np.float64)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """(C, Y, X) -> (C, Y, X) float32."""
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} is not fitted; call fit() first")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] != len(self.offset):
            raise ValueError(f"field shape {image.shape}: expected (C, Y, X) with C = {len(self.offset)} "
                             "channels, as fitted")
        offset = self.offset.astype(np.float32)[:, None, None]
        scale = self.scale.astype(np.float32)[:, None, None]
        # in place after one float32 subtraction: the same numbers as
        # (image.astype(float32) - offset) / scale, with one allocation per field
        out = np.subtract(image, offset, dtype=np.float32)
        out /= scale
        return np.clip(out, 0.0, 1.0, out=out) if self.clip else out

    def select(self, channels: list[int]) -> "IntensityScaler":
        """The same scaler restricted to ``channels`` (indices), for reads of a channel subset."""
        out = self.from_dict(self.to_dict())
        if self.fitted:
            out.offset, out.scale = self.offset[list(channels)], self.scale[list(channels)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: method, version, parameters and fitted ``offset``/``scale`` (or ``None``)."""
        return {"method": self.method, "version": VERSION, **self.params(),
                "offset": None if self.offset is None else _to_list(self.offset),
                "scale": None if self.scale is None else _to_list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityScaler":
        """Any scaler from its ``to_dict`` (dispatching on ``method``)."""
        d = dict(d)
        for key in ("fit", "fields"):  # how it was fitted (stored with the plate), not a parameter
            d.pop(key, None)
        method = d.pop("method", None)
        if method not in NORMALIZERS:
            raise ValueError(f"normaliser method {method!r}: expected one of {sorted(NORMALIZERS)}")
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"normaliser version {version}: this rayscreen reads version {VERSION}")
        offset, scale = d.pop("offset", None), d.pop("scale", None)
        out = NORMALIZERS[method](**d)
        if offset is not None:
            out.offset, out.scale = np.asarray(offset, np.float64), np.asarray(scale, np.float64)
        return out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params}){'' if self.fitted else ' (not fitted)'}"


class PercentileScaler(IntensityScaler):
    """Maps the ``low`` and ``high`` percentiles of each channel to 0 and 1, clipping outside."""

    method = "percentile"
    clip = True

    def __init__(self, low: float = 1.0, high: float = 99.8):
        super().__init__()
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles low={low}, high={high}: expected 0 <= low < high <= 100")
        self.low, self.high = float(low), float(high)

    def params(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    def _offset_scale(self, stats):
        lo, hi = stats.percentiles([self.low, self.high])
        return lo, hi - lo


class MeanStdScaler(IntensityScaler):
    """Zero mean, unit standard deviation per channel."""

    method = "meanstd"

    def _offset_scale(self, stats):
        return stats.mean.copy(), stats.std()


class ControlScaler(IntensityScaler):
    """Mean/std (``stat="meanstd"``) or percentile (``stat="percentile"``) scaling fitted on
    the fields of control wells only.

    ``fit(images)`` expects control fields (the caller selects them);
    :func:`fit_plate_normalizer` selects them with :func:`control_wells` and ``controls``
    (a pandas query on the plate's annotations; ``None``: ``Metadata_Control`` is True or
    ``"negative"``).
    """

    method = "control"

    def __init__(self, stat: str = "meanstd", controls: str | None = None, low: float = 1.0,
                 high: float = 99.8):
        super().__init__()
        if stat not in ("meanstd", "percentile"):
            raise ValueError(f"stat {stat!r}: expected 'meanstd' or 'percentile'")
        self.stat, self.controls, self.low, self.high = stat, controls, float(low), float(high)
        self._inner = MeanStdScaler() if stat == "meanstd" else PercentileScaler(low, high)
        self.clip = self._inner.clip

    def params(self) -> dict[str, Any]:
        return {"stat": self.stat, "controls": self.controls, "low": self.low, "high": self.high}

    def _offset_scale(self, stats):
        return self._inner._offset_scale(stats)


NORMALIZERS: dict[str, type[IntensityScaler]] = {
    "percentile": PercentileScaler, "meanstd": MeanStdScaler, "control": ControlScaler}


def make_normalizer(name: str, **kwargs: Any) -> IntensityScaler:
    """A scaler by name: ``"percentile"``, ``"meanstd"`` or ``"control"``."""
    if name not in NORMALIZERS:
        raise ValueError(f"normaliser {name!r}: expected one of {sorted(NORMALIZERS)}")
    return NORMALIZERS[name](**kwargs)


# -- plates


def control_wells(annotations: pd.DataFrame, controls: str | None = None) -> list[str]:
    """Wells (``Metadata_Well``) of the control wells of a plate's annotations.

    ``controls``: a pandas query such as ``"Metadata_Compound == 'DMSO'"``; ``None`` uses
    ``Metadata_Control`` (True or ``"negative"``, as in :mod:`rayscreen.analysis`).
    """
    if controls is not None:
        try:
            return list(annotations.query(controls)["Metadata_Well"])
        except Exception as e:  # pandas raises NameError subclasses, SyntaxError, ValueError... for a bad query
            columns = [c for c in annotations.columns if c != "Metadata_Well"]
            raise RayscreenError(f"the control query {controls!r} (analysis.control_column / control_value) does "
                                 f"not apply to the annotations ({type(e).__name__}: {e}); their columns are "
                                 f"{columns}") from None
    if "Metadata_Control" not in annotations.columns:
        raise RayscreenError("no Metadata_Control column to find the control wells; pass controls= "
                             "(a query such as \"Metadata_Compound == 'DMSO'\")")
    is_control = [v is True or v == 1 or str(v).strip().lower() in ("true", "negative")
                  for v in annotations["Metadata_Control"]]
    return list(annotations.loc[is_control, "Metadata_Well"])


def fit_wells(plate, normalizer: IntensityScaler) -> list[str]:
    """The wells a scaler is fitted on: the control wells for a :class:`ControlScaler`
    (raises naming the plate when there is none), else every well."""
    if not isinstance(normalizer, ControlScaler):
        return plate.wells
    try:
        wells = control_wells(plate.annotations, normalizer.controls)
    except RayscreenError as e:
        raise RayscreenError(f"plate {plate.name!r} ({plate.uri}): {e}") from None
    if not wells:
        raise RayscreenError(f"plate {plate.name!r} ({plate.uri}): no control well matches "
                             f"{normalizer.controls or 'Metadata_Control'}")
    return wells


def fit_params(max_fields: int | None = None, seed: int = 0,
               illumination: dict[str, Any] | None = None, wells: Sequence[str] | None = None,
               level: int = 0) -> dict[str, Any]:
    """How a scaler was fitted (JSON), stored beside it as ``fit``: the field subsample, the
    parameters of the illumination function the fields were corrected with first (``None``:
    raw fields), a digest of the wells it was fitted on (:func:`fit_wells`: a new platemap
    can make other wells the controls) and the pyramid level of the fields (a coarser level
    averages pixels, which narrows their percentiles and spread). A resumed job refits when
    any of these changed."""
    digest = None if wells is None else hashlib.sha256("\n".join(sorted(wells)).encode()).hexdigest()[:16]
    return {"max_fields": None if max_fields is None else int(max_fields), "seed": int(seed),
            "illumination": None if illumination is None else dict(illumination), "level": int(level),
            "wells": digest}


def fit_plate_normalizer(plate_uri: str, normalizer: IntensityScaler, storage_options: dict[str, Any] | None = None,
                         *, max_fields: int | None = None, seed: int = 0, illum: np.ndarray | None = None,
                         save: bool = False, platemap=None) -> IntensityScaler:
    """Fit ``normalizer`` on a plate's fields (control wells only for a :class:`ControlScaler`),
    read one after another; ``illum`` corrects each field first, as the stream will.
    The distributed version, over many plates, is :func:`rayscreen.stream.fit.fit_normalization`."""
    plate = open_plate(plate_uri, storage_options, platemap=platemap)
    wells = fit_wells(plate, normalizer)
    pairs = select_fields(plate, max_fields, seed, wells)
    if not pairs:
        raise RayscreenError(f"plate {plate_uri}: no field to fit {normalizer!r} on")

    def images():
        for well, field in pairs:
            image = plate.read(well, field)
            yield image if illum is None else image.astype(np.float32) / illum

    normalizer.fit(images(), seed=seed)
    if save:
        stored = illumination_entry(plate_uri, storage_options) if illum is not None else None
        save_normalization(plate_uri, normalizer, storage_options,
                           fit=fit_params(max_fields, seed, stored["params"] if stored else None, wells),
                           fields=len(pairs))
    return normalizer


def save_normalization(plate_uri: str, normalizer: IntensityScaler, storage_options: dict[str, Any] | None = None,
                       *, fit: dict[str, Any] | None = None, fields: int | None = None) -> None:
    """Store a fitted scaler in the plate's ``rayscreen.normalization`` attribute: its
    ``to_dict()`` plus ``fit`` (:func:`fit_params`) and ``fields`` (how many it saw)."""
    if not normalizer.fitted:
        raise ValueError(f"{normalizer!r} is not fitted; fit it before saving")
    entry = {**normalizer.to_dict(), "fit": dict(fit) if fit is not None else None, "fields": fields}
    update_plate_attrs(plate_uri, storage_options, **{ATTR_KEY: entry})


def normalization_entry(plate_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The plate's ``rayscreen.normalization`` attribute (scaler, ``fit``, ``fields``) or ``None``."""
    return open_plate(plate_uri, storage_options).rayscreen_attrs().get(ATTR_KEY) or None


def load_normalization(plate_uri: str, storage_options: dict[str, Any] | None = None) -> IntensityScaler | None:
    """The plate's stored scaler, or ``None`` if it has none."""
    return _scaler_of(plate_uri, normalization_entry(plate_uri, storage_options))


def _scaler_of(plate_uri: str, entry: dict[str, Any] | None) -> IntensityScaler | None:
    """The scaler of a stored normalisation entry (``None`` for none), errors naming the plate."""
    if not entry:
        return None
    try:
        return IntensityScaler.from_dict(entry)
    except (TypeError, ValueError) as e:
        raise RayscreenError(f"plate {plate_uri}: stored normalisation {entry.get('method')!r} cannot be read "
                             f"({e}); refit it with `rayscreen illum`") from None


def corrections_version(plate_uri: str, storage_options: dict[str, Any] | None = None, *,
                        illumination: bool, normalize: str) -> str | None:
    """A digest of the corrections the stream applies to a plate's fields: its stored
    illumination function (when ``illumination``; the entry carries a digest of the array)
    and normalisation (unless ``normalize`` is "none"; the entry holds the scaler's values).
    ``None`` when the stream applies neither. Results stores record it per plate, so that
    wells scored before a refit (``rayscreen illum`` once an ingest has finished) are
    scored again rather than mixed with wells corrected otherwise."""
    if not illumination and normalize == "none":
        return None
    attrs = open_plate(plate_uri, storage_options).rayscreen_attrs()  # one read: both entries
    return corrections_digest(attrs, illumination=illumination, normalize=normalize != "none")


def corrections_digest(attrs: dict[str, Any], *, illumination: bool, normalize: bool) -> str:
    """The digest of :func:`corrections_version` from a plate's ``rayscreen`` attributes
    (``Plate.rayscreen_attrs()``, already read): its stored illumination entry (which carries
    a digest of the array) and normalisation entry, each where the stream applies it."""
    used = {"illumination": attrs.get(ILLUM_KEY) if illumination else None,
            "normalization": attrs.get(ATTR_KEY) if normalize else None}
    return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()[:16]


def corrections_versions(plate_uris: dict[str, str], storage_options: dict[str, Any] | None = None, *,
                         illumination: bool, normalize: str) -> dict[str, str | None]:
    """``{plate name: corrections_version}`` of ``{plate name: URI}``, read in the planning
    threads (:func:`~.datasource.in_threads`: on S3 each plate's attributes are a request)."""
    from .datasource import in_threads

    def version(uri: str) -> str | None:
        return corrections_version(uri, storage_options, illumination=illumination, normalize=normalize)

    return dict(zip(plate_uris, in_threads(version, list(plate_uris.values()))))


def stream_normalizer(plate_uri: str, storage_options: dict[str, Any] | None = None, *,
                      illumination: bool, method: str | None = None, level: int | None = None) -> IntensityScaler:
    """The plate's stored scaler, checked for a stream with ``illumination`` on or off (and,
    when given, fitted by ``method``: the config's ``stream.normalize``, and on fields of
    pyramid ``level``: the config's ``stream.level``).

    Raises, naming the plate, when none is stored, when it is another method's, when it was
    fitted on fields corrected differently from what the stream feeds it (statistics of
    corrected fields applied to raw ones, or the reverse, are silently wrong by the
    illumination's factor), or when it was fitted after another illumination function than
    the one stored now.
    """
    from .illumination import illumination_entry

    entry = normalization_entry(plate_uri, storage_options)  # read once: a remote plate's attrs are a GET
    norm = _scaler_of(plate_uri, entry)
    if norm is None:
        raise RayscreenError(f"plate {plate_uri}: no normalisation stored; fit one with `rayscreen illum` "
                             "(stream.normalize) first, or set stream.normalize: none")
    if method is not None and norm.method != method:
        raise RayscreenError(f"plate {plate_uri}: stores a {norm.method!r} normalisation but stream.normalize is "
                             f"{method!r}; rerun `rayscreen illum` or change stream.normalize")
    fit = entry.get("fit") or {}
    if level is not None and int(fit.get("level", 0)) != int(level):
        raise RayscreenError(
            f"plate {plate_uri}: its normaliser was fitted on level {fit.get('level', 0)} fields but stream.level is "
            f"{level}; rerun `rayscreen illum` with stream.level: {level} (a coarser level averages pixels, so "
            "its intensity percentiles and spread differ)")
    if "illumination" in fit and (fit["illumination"] is not None) != illumination:
        raise RayscreenError(
            f"plate {plate_uri}: its normaliser was fitted on "
            f"{'illumination-corrected' if fit['illumination'] is not None else 'uncorrected'} fields "
            f"but the stream has illumination={illumination}; refit with the same setting")
    if illumination and fit.get("illumination") not in (None, illumination_entry(
            plate_uri, storage_options).get("params")):
        raise RayscreenError(f"plate {plate_uri}: its normaliser was fitted after another illumination "
                             "function than the one stored now; rerun `rayscreen illum`")
    return norm
