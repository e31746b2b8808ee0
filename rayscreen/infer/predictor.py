"""Per-field inference as a plain callable: a dict of arrays in, a dict of arrays out.

:class:`Predictor` holds a model with ``forward_maps(x) -> {"logits" (B, K),
"class_maps" (B, K, h, w), "features" (B, D)}`` (``rayscreen.models`` class-map nets)
and turns a batch of fields into everything the results store keeps per field. It
never touches Ray or storage, so a unit test calls it on arrays; the Ray actor in
:mod:`rayscreen.infer.run` wraps it.

Well aggregation (:func:`aggregate_well`) is a pure function over a well's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..store.labels import downsampled_shape


@dataclass(frozen=True)
class PredictorSettings:
    batch_size: int = 16  # fields per forward pass
    saliency: str = "jacobian"  # jacobian | jacobian_relu | cam | none
    saliency_downsample: int = 4
    saliency_sigma: float = 2.0  # Gaussian smoothing, in field pixels (before downsampling)
    mask_threshold: float = 0.5  # of each field's saliency maximum
    mask_nms_size: int = 21  # local non-maximum suppression window, about the object size (px)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B, K) class probabilities (softmax; sigmoid when K == 1)."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def saliency_class(num_classes: int, predicted: np.ndarray) -> np.ndarray:
    """Which class each field's saliency explains: the positive class (1) of a binary
    model, the predicted class otherwise. (B,) int."""
    if num_classes == 2:
        return np.ones_like(predicted)
    return predicted if num_classes > 2 else np.zeros_like(predicted)


def map_peaks(class_maps: np.ndarray, field_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """class_maps (B, K, h, w) -> (max (B, K), y (B, K), x (B, K)): each map's maximum and
    its location in field pixels (centre of the map cell; first maximum on ties)."""
    b, k, h, w = class_maps.shape
    flat = class_maps.reshape(b, k, h * w)
    idx = flat.argmax(axis=2)
    iy, ix = np.divmod(idx, w)
    y = np.floor((iy + 0.5) * field_shape[0] / h).astype(np.int32)
    x = np.floor((ix + 0.5) * field_shape[1] / w).astype(np.int32)
    return np.take_along_axis(flat, idx[..., None], axis=2)[..., 0].astype(np.float32), y, x


def _blocks(images: np.ndarray, factor: int, fill) -> np.ndarray:
    """(B, Y, X) -> (B, ys, factor, xs, factor), the remainder padded with ``fill``."""
    b, y, x = images.shape
    ys, xs = downsampled_shape((y, x), factor)
    padded = np.pad(images, ((0, 0), (0, ys * factor - y), (0, xs * factor - x)), constant_values=fill)
    return padded.reshape(b, ys, factor, xs, factor)


def downsample_mean(images: np.ndarray, factor: int) -> np.ndarray:
    """(B, Y, X) -> (B, ceil(Y / factor), ceil(X / factor)) block means; a block of the
    remainder averages the pixels it has."""
    if images.shape[1] % factor == 0 and images.shape[2] % factor == 0:
        return _blocks(images, factor, 0).mean(axis=(2, 4))
    return np.nanmean(_blocks(images.astype(np.float32), factor, np.nan), axis=(2, 4))


def downsample_any(masks: np.ndarray, factor: int) -> np.ndarray:
    """(B, Y, X) bool -> (B, ceil(Y / factor), ceil(X / factor)) uint8: 1 where any pixel of
    the block is set."""
    return _blocks(np.asarray(masks, dtype=bool), factor, False).any(axis=(2, 4)).astype(np.uint8)


class Predictor:
    """Callable: ``batch`` dict with ``image`` (B, C, Y, X) -> dict of per-field outputs.

    Output keys (B = fields, K = classes, D = profile length, y, x = ceil(Y, X / downsample)):
    ``scores`` (B, K) float32 probabilities, ``map_max`` (B, K) float32, ``map_y``,
    ``map_x`` (B, K) int32 (field pixels), ``profile`` (B, D) float32, ``saliency``
    (B, y, x) float16 (of :func:`saliency_class`), ``mask`` (B, y, x) uint8, ``class_maps``
    (B, K, h, w) float32 (for model-pooled well scores); other input columns are passed
    through. Deterministic: same fields in the same batches give the same bytes.
    """

    def __init__(self, model: torch.nn.Module, settings: PredictorSettings | None = None, device: str = "cpu"):
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients only w.r.t. the input (saliency)
        self.settings = settings or PredictorSettings()
        self.device = device

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = np.asarray(batch["image"])
        if images.ndim != 4:
            raise ValueError(f"Predictor: image must be (B, C, Y, X), got shape {images.shape}")
        parts = [self._forward(images[i:i + self.settings.batch_size])
                 for i in range(0, len(images), self.settings.batch_size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for k, v in batch.items():
            if k != "image":
                out[k] = v
        return out

    def _forward(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from ..models.saliency import cam_saliency, jacobian_saliency, saliency_masks, smooth

        s = self.settings
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            out = self.model.forward_maps(x)
        probs = probabilities(out["logits"])
        cls = torch.from_numpy(saliency_class(probs.shape[1], probs.argmax(dim=1).cpu().numpy())).to(self.device)
        maps = out["class_maps"]
        field_shape = tuple(images.shape[-2:])
        d = max(1, int(s.saliency_downsample))
        # one saliency implementation for the whole project (rayscreen.models.saliency):
        # Jacobian of the class-specific map's evidence (WSCNN), Kraus' ReLU variant, or CAM
        if s.saliency in ("jacobian", "jacobian_relu"):
            sal = jacobian_saliency(self.model, x, class_index=cls, relu=s.saliency == "jacobian_relu")
        elif s.saliency == "cam":
            sal = cam_saliency(maps, field_shape, class_index=cls).clamp(min=0)
        if s.saliency == "none":
            small = np.zeros((len(images), *downsampled_shape(field_shape, d)), np.float32)
            mask = small.astype(np.uint8)
        else:
            sal = sal.detach().float()
            smoothed = smooth(sal, s.saliency_sigma) if s.saliency_sigma > 0 else sal
            small = downsample_mean(smoothed.cpu().numpy(), d)
            masks = saliency_masks(sal, sigma=s.saliency_sigma, threshold=s.mask_threshold, nms_size=s.mask_nms_size)
            mask = downsample_any(masks.cpu().numpy(), d)
        maps_np = maps.cpu().numpy().astype(np.float32)
        peak, py, px = map_peaks(maps_np, field_shape)
        return {"scores": probs.cpu().numpy().astype(np.float32), "map_max": peak, "map_y": py, "map_x": px,
                "profile": out["features"].cpu().numpy().astype(np.float32),
                "saliency": small.astype(np.float16), "mask": mask, "class_maps": maps_np}


def aggregate_well(scores: np.ndarray, method: str, class_maps: np.ndarray | None = None,
                   model: torch.nn.Module | None = None) -> np.ndarray:
    """Well scores (K,) from the (F, K) probabilities of its usable fields.

    ``max``/``mean`` over fields; ``model``: the model's own MIL pooling over every
    instance of the well (its fields' class maps (F, K, h, w) side by side as one bag),
    then its fc head if it has one, then probabilities. No fields: NaN.
    """
    k = scores.shape[1]
    if len(scores) == 0:
        return np.full(k, np.nan, np.float32)
    if method == "max":
        return scores.max(axis=0).astype(np.float32)
    if method == "mean":
        return scores.mean(axis=0).astype(np.float32)
    if method == "model":
        # on the model's device: an inference actor's model is on the GPU, and poolings with
        # parameters (noisy_and's thresholds, attention, fc) and the fc head cannot mix devices
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        maps = torch.from_numpy(np.ascontiguousarray(np.concatenate(list(class_maps), axis=-1)))[None].to(device)
        with torch.no_grad():
            logits = model.pooling(maps)
            if getattr(model, "fc", None) is not None:
                logits = model.fc(logits)
            return probabilities(logits)[0].cpu().numpy().astype(np.float32)
    raise ValueError(f"infer.aggregate={method!r}: expected max, mean or model")
