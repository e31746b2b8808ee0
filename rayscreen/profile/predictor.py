"""Transfer-learning profiles of fields: a callable class on a dict of arrays.

Pawlowski et al. (2016), "Automating morphological profiling with generic deep
convolutional networks": an ImageNet network cut before its classifier embeds each field.
Microscopy channels are not RGB, so two channel modes:

- ``concat`` (the paper's best variant): every channel alone, as a greyscale image
  replicated to three channels, resized to the network's input and ImageNet-normalised;
  the C per-channel feature vectors are concatenated: (B, C * D).
- ``rgb``: three named channels mapped to R, G, B (a missing name leaves that colour
  black): one pass, (B, D).

With ``tiles``, a field is cut into full-resolution tiles of the network's input size
(the stream's tiling rule: edge tiles flush with the border) and the tiles' features are
averaged, instead of downsampling the whole field.

:class:`ProfilePredictor` works on a batch ``{"image": (B, C, Y, X), "plate", "well",
"field", ...}`` without Ray (unit tests) and is what the profile stage maps over the
stream with a Ray Data actor pool (the model loads once per actor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..store.errors import RayscreenError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised (per-colour mean/std of ImageNet)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def feature_names(backbone: str, feature_dim: int, channels: Sequence[str], channel_mode: str = "concat") -> list[str]:
    """Names of the profile features: ``{channel}_{backbone}_{i}`` (concat) or ``rgb_{backbone}_{i}``."""
    prefixes = list(channels) if channel_mode == "concat" else ["rgb"]
    return [f"{p}_{backbone}_{i}" for p in prefixes for i in range(feature_dim)]


# the window of z-scores (mean/std normalisation) mapped onto the network's [0, 1] input:
# +-3 standard deviations, the usual display window; brighter or darker pixels saturate
Z_RANGE = (-3.0, 3.0)


def to_unit_range(images: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(B, C, Y, X) -> float32 in [0, 1], what an ImageNet network expects.

    ``value_range`` (low, high) is mapped to (0, 1), values outside clipped: (0, 65535) for
    flat-field-corrected uint16 counts, :data:`Z_RANGE` for z-scores. ``None``: integer
    images divided by their dtype's maximum, float images taken as already in [0, 1] (the
    percentile-normalised stream) and clipped.
    """
    if value_range is None:
        value_range = (0, np.iinfo(images.dtype).max) if np.issubdtype(images.dtype, np.integer) else (0, 1)
    low, high = (np.float32(v) for v in value_range)
    out = np.subtract(images, low, dtype=np.float32)
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)


class ProfilePredictor:
    """Deep (and optionally classical and QC) features of a batch of fields.

    Parameters
    ----------
    backbone : registry name (``resnet18``, ``resnet50``, ``vgg16``, ``inception_v3``,
        ``convnext_tiny``, ``vit_b_16``), built by ``rayscreen.models.create_model(backbone,
        weights=weights)`` as a feature extractor (B, 3, H, W) -> (B, D) with
        ``.feature_dim`` and ``.input_size``.
    weights : local path or URI of the backbone's weights (no hub downloads); ``None``
        leaves the backbone randomly initialised (tests, baselines).
    channels : channel names of the images, in order (C,).
    channel_mode : ``"concat"`` or ``"rgb"`` (then ``rgb`` names the R, G, B channels).
    input_size : side of the network input; ``None``: the backbone's own.
    tiles : average full-resolution tiles of ``input_size`` instead of resizing the field.
    classical, qc : also compute :func:`~rayscreen.profile.classical.classical_features`
        (on the normalised image) and :func:`~rayscreen.profile.image_qc.field_qc` (on the
        image as streamed, before ``normalizers``; the saturation fractions are the batch's
        ``saturation`` column when it has one, measured by the stream on the raw pixels,
        before any illumination correction: clipping at the detector, not at a percentile).
    normalizers : ``{plate name: IntensityScaler.to_dict()}`` (restricted to the streamed
        channels) applied per row after QC, before the deep and classical features; a
        batch row of a plate without one is an error. ``None``: images used as streamed.
    qc_max_value : saturation level of the QC metrics; ``None``: the dtype's maximum for
        integer images, 1.0 for float images (a clipped normalised stream).
    value_range : (low, high) of the (normalised) images mapped to the network's [0, 1]
        input (:func:`to_unit_range`); ``None``: integer images by their dtype, float
        images taken as [0, 1].
    model : an already built extractor (skips the registry; tests).
    check_input_size : probe the network with one blank input of ``input_size`` (see
        :meth:`_check_input_size`); the profile actors pass False, as the driver's probe
        has already checked the same backbone and size.

    ``__call__(batch)`` returns ``plate``, ``well``, ``field`` (passed through), ``profile``
    float32 (B, n_features), and ``classical`` (B, K) / ``qc`` (B, Q) float32 when enabled.
    """

    def __init__(self, backbone: str = "resnet18", weights: str | None = None, *, channels: Sequence[str],
                 channel_mode: str = "concat", rgb: Sequence[str | None] | None = None,
                 input_size: int | None = None, tiles: bool = False, classical: bool = False, qc: bool = False,
                 batch_size: int = 16, device: str | None = None, storage_options: dict | None = None,
                 model: torch.nn.Module | None = None, normalizers: dict[str, dict] | None = None,
                 qc_max_value: float | None = None, value_range: tuple[float, float] | None = None,
                 check_input_size: bool = True):
        if channel_mode not in ("concat", "rgb"):
            raise RayscreenError(f"profile.channel_mode {channel_mode!r}: expected 'concat' or 'rgb'")
        self.channels = [str(c) for c in channels]
        self.channel_mode = channel_mode
        if channel_mode == "rgb":
            if not rgb or len(rgb) != 3:
                raise RayscreenError(f"profile.rgb must name 3 channels (R, G, B; null for black) for "
                                     f"channel_mode: rgb, got {rgb!r}")
            unknown = [c for c in rgb if c is not None and c not in self.channels]
            if unknown:
                raise RayscreenError(f"profile.rgb names channel(s) {unknown} that the plates do not have; "
                                     f"channels are {self.channels}")
            self.rgb_index = [None if c is None else self.channels.index(c) for c in rgb]
        if model is None:
            from ..models import create_model

            kwargs: dict[str, Any] = {"weights": weights} if weights else {}
            if storage_options:
                kwargs["storage_options"] = storage_options
            model = create_model(backbone, **kwargs)
        self.backbone = backbone
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.feature_dim = int(model.feature_dim)
        self.input_size = int(input_size or getattr(model, "input_size", 224))
        if check_input_size:
            self._check_input_size(getattr(model, "input_size", None))
        self.tiles = bool(tiles)
        self.classical = bool(classical)
        self.qc = bool(qc)
        self.batch_size = int(batch_size)
        self.qc_max_value = qc_max_value
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise RayscreenError(f"profile: value_range {value_range}: expected (low, high) with low < high")
        self.normalizers = None
        if normalizers is not None:
            from ..stream.normalize import IntensityScaler

            self.normalizers = {str(k): IntensityScaler.from_dict(v) for k, v in normalizers.items()}
        self.features = feature_names(backbone, self.feature_dim, self.channels, channel_mode)

    def _check_input_size(self, default: int | None) -> None:
        """One forward pass of a blank input of ``input_size``: a size the network's pooling
        stages cannot take (e.g. 64 for inception_v3, which needs 75) fails here, on the
        driver before any work, naming the key, rather than in every actor mid-run. (Asked
        of the network rather than a table of minimums, which would go stale.)"""
        s = self.input_size
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, 3, s, s, device=self.device))
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but not a size the network refuses
            raise
        except RuntimeError as e:
            raise RayscreenError(f"profile.input_size {s}: too small for backbone {self.backbone!r} "
                                 f"({str(e).splitlines()[0][:200]}); expected a larger side"
                                 + (f", e.g. its default {default}" if default else "")) from None

    # -- pure maths on arrays

    def _network_inputs(self, images: np.ndarray) -> tuple[torch.Tensor, int]:
        """(B, C, Y, X) -> (B * P * V, 3, S, S) network inputs and V, the number of views
        per field (P = channels for concat, 1 for rgb; V = tiles per field, or 1)."""
        x = torch.from_numpy(to_unit_range(images, self.value_range))
        b, c, h, w = x.shape
        if self.channel_mode == "concat":
            x = x.reshape(b * c, 1, h, w).expand(-1, 3, -1, -1)  # grey -> RGB, per channel
        else:
            zero = torch.zeros(b, h, w)
            x = torch.stack([zero if i is None else x[:, i] for i in self.rgb_index], dim=1)
        s = self.input_size
        if self.tiles:
            from ..stream.tiling import tile_positions

            if h < s or w < s:
                raise RayscreenError(f"profile.tiles: fields of {h} x {w} px are smaller than the "
                                     f"network input {s}; set profile.input_size lower or tiles: false")
            pos = tile_positions((h, w), s)
            x = torch.stack([x[:, :, y:y + s, x0:x0 + s] for y, x0 in pos], dim=1)  # (N, V, 3, s, s)
            views = len(pos)
            x = x.reshape(-1, 3, s, s)
        else:
            views = 1
            if (h, w) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return imagenet_normalize(x.contiguous()), views

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """Deep profiles of fields (B, C, Y, X) -> float32 (B, n_features)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != len(self.channels):
            raise RayscreenError(f"profile: expected images shaped (B, {len(self.channels)}, Y, X) for channels "
                                 f"{self.channels}, got {images.shape}")
        b = images.shape[0]
        step = max(1, self.batch_size * max(1, len(self.channels)))  # network inputs per forward pass
        # fields a few at a time (tiles: one): the float, 3-colour, normalised copies of a whole
        # batch of full-resolution tiles took ~15x the batch's own memory (3.4 GB for 0.22 GB)
        per_chunk = 1 if self.tiles else max(1, self.batch_size)
        out, views = [], 1
        for first in range(0, b, per_chunk):
            x, views = self._network_inputs(images[first:first + per_chunk])
            for start in range(0, len(x), step):
                out.append(self.model(x[start:start + step].to(self.device)).float().cpu())
        feats = torch.cat(out)  # (B * P * V, D)
        parts = len(self.channels) if self.channel_mode == "concat" else 1
        feats = feats.reshape(b, parts, views, self.feature_dim).mean(dim=2)  # tiles averaged
        return feats.reshape(b, parts * self.feature_dim).numpy().astype(np.float32)

    def normalize(self, images: np.ndarray, plates) -> np.ndarray:
        """Raw fields (B, C, Y, X) of ``plates`` (B,) -> float32 (B, C, Y, X) through each
        plate's scaler (the stream's own ``transform``); unchanged without ``normalizers``."""
        if self.normalizers is None:
            return images
        if plates is None:
            raise RayscreenError("profile: normalizers given but the batch has no 'plate' column")
        out = np.empty(images.shape, np.float32)
        for j, (im, plate) in enumerate(zip(images, plates)):
            scaler = self.normalizers.get(str(plate))
            if scaler is None:
                raise RayscreenError(f"profile: no intensity normalisation for plate {plate!r} "
                                     f"(have {sorted(self.normalizers)})")
            out[j] = scaler.transform(im)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.asarray(batch["image"])
        out: dict[str, Any] = {k: np.asarray(batch[k]) for k in ("plate", "well", "field") if k in batch}
        if self.qc:
            from .image_qc import field_qc

            # QC before normalisation: a percentile-normalised stream is clipped at 1.0, where
            # a bright normal field and an overexposed one look alike
            max_value = self.qc_max_value
            if max_value is None and not np.issubdtype(images.dtype, np.integer):
                max_value = 1.0
            # saturation as the stream measured it on the raw pixels (``read_plates(saturation=
            # True)``): an illumination-corrected field is divided by a function >= 1, and its
            # clipped pixels fall below the detector's maximum
            saturation = batch.get("saturation")
            rows = []
            for j, im in enumerate(images):
                q = field_qc(im, max_value=max_value)
                if saturation is not None:
                    for c, value in enumerate(np.asarray(saturation[j], dtype=float)):
                        q[f"qc_saturation_c{c}"] = float(value)
                rows.append(np.array(list(q.values())))
            out["qc"] = np.stack(rows).astype(np.float32)
        images = self.normalize(images, out.get("plate"))
        out["profile"] = self.embed(images)
        if self.classical:
            from .classical import classical_features

            out["classical"] = np.stack([classical_features(im) for im in images]).astype(np.float32)
        return out
