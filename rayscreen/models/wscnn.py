"""Class-specific-map networks: WSCNN (the paper's nets) and a generic MIL net (Kraus et al.).

All share :class:`ClassMapNet`: ``trunk`` (convolutions, (B, C, H, W) -> (B, D, h', w'))
-> ``head`` (a convolution to one map per class, (B, K, h, w)) -> MIL ``pooling``
(-> logits (B, K)) -> optional ``fc_head`` (Linear K -> K over the pooled class scores,
Kraus' joint model; its output is then the model's logits and the MIL logits get the
auxiliary loss, see :meth:`ClassMapNet.aux_loss`).

``width`` (every builder): a float multiplier of the paper's filter counts (``0.25``
gives 12/25/25 filters for ``wscnn``, enough to train on a CPU), or an explicit list
of filter counts, one per hidden convolution (``[50, 100, 100]`` for ``wscnn``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import POOLING_CLASSES, MILPooling


def _filters(base: Sequence[int], width: float | Sequence[int] | None, where: str) -> list[int]:
    """Filter counts of the hidden convolutions from ``width`` (multiplier or explicit list)."""
    if width is None:
        return list(base)
    if isinstance(width, (int, float)) and not isinstance(width, bool):
        if width <= 0:
            raise ValueError(f"{where}: width={width}, expected a positive multiplier or a list of filter counts")
        return [max(1, int(round(b * width))) for b in base]
    width = [int(w) for w in width]
    if len(width) != len(base) or min(width) < 1:
        raise ValueError(f"{where}: width={width}, expected {len(base)} positive filter counts "
                         f"(one per hidden convolution, the paper's are {list(base)}) or a multiplier")
    return width


def min_input_size(layers: Sequence[nn.Module], out: int = 1) -> int:
    """Smallest input side for which ``layers`` (Conv2d/MaxPool2d/others shape-preserving)
    give an output side of at least ``out``: walks the layers backwards."""
    need = out
    for m in reversed(list(layers)):
        if isinstance(m, nn.Conv2d):
            k, p, s, d = m.kernel_size[0], m.padding[0], m.stride[0], m.dilation[0]
            need = (need - 1) * s + d * (k - 1) + 1 - 2 * p
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            need = (need - 1) * s + k
        need = max(need, 1)
    return need


def conv_block(cin: int, cout: int, kernel: int, padding: int = 0, pool: bool = True) -> list[nn.Module]:
    """Conv -> BatchNorm -> ReLU (-> 2x2 max pool). ReLU is a module (not F.relu) so that
    saliency hooks can find it; not in-place, so backward hooks stay legal."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class ClassMapNet(nn.Module):
    """trunk -> class-map head -> MIL pooling (-> optional fc head over pooled scores).

    Parameters
    ----------
    trunk : (B, C, H, W) -> (B, D, h', w') feature maps.
    head : (B, D, h', w') -> (B, K, h, w) class-specific maps.
    pooling : a :class:`MILPooling`, (B, K, h, w) -> logits (B, K).
    fc_head : add Kraus' fully connected layer over the pooled class scores.
    feature_pool : how ``features`` (the profile) pools the trunk output (B, D, h', w') over
        locations: "mean" or "max" (B, D), or "meanstd" (B, 2 D: the mean, then the standard
        deviation, which keeps how a phenotype varies across the field, not only its level).
    min_size : smallest H and W accepted (checked in forward, with a clear error).
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, pooling: MILPooling, *, in_channels: int,
                 num_classes: int, feature_dim: int, fc_head: bool = False, feature_pool: str = "mean",
                 min_size: int = 1, name: str = "model"):
        super().__init__()
        if feature_pool not in ("mean", "max", "meanstd"):
            raise ValueError(f"{name}: feature_pool={feature_pool!r}, expected 'mean', 'max' or 'meanstd'")
        self.trunk, self.head, self.pooling = trunk, head, pooling
        self.fc = nn.Linear(num_classes, num_classes) if fc_head else None
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.feature_dim = int(feature_dim) * (2 if feature_pool == "meanstd" else 1)
        self.feature_pool, self.min_size, self.name = feature_pool, int(min_size), name
        self._last_mil_logits: torch.Tensor | None = None

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.name}: input must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"{self.name}: input {tuple(x.shape[-2:])} is smaller than the minimum "
                             f"{self.min_size}x{self.min_size} of this network (use larger fields or tiles)")

    def forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, H, W) float -> dict with ``logits`` (B, K), ``class_maps`` (B, K, h, w),
        ``features`` (B, D) (pooled trunk output, the profile vector), ``mil_logits``
        (B, K) (the pooling's output; equals ``logits`` without the fc head)."""
        self._check(x)
        feats = self.trunk(x)
        maps = self.head(feats)
        mil = self._pool(maps)
        logits = self.fc(mil) if self.fc is not None else mil
        self._last_mil_logits = mil if self.fc is not None else None
        return {"logits": logits, "class_maps": maps, "features": self._pool_features(feats), "mil_logits": mil}

    def _pool(self, maps: torch.Tensor) -> torch.Tensor:
        """class maps (B, K, h, w) -> MIL logits (B, K), in float32 even under autocast: in
        bfloat16 an instance probability rounds to 1.0 from a logit of ~5.5 (and the bag
        probability with it), so probability-space poolings gave infinite or saturated
        logits; the pooling is a small share of the model's work."""
        kind = maps.device.type
        # a device without autocast (the "meta" device of shape checks) refuses even enabled=False
        off = torch.autocast(device_type=kind, enabled=False) if torch.amp.is_autocast_available(kind) \
            else contextlib.nullcontext()
        with off:
            return self.pooling(maps.float())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float -> the profile vector (B, D): the pooled trunk output alone."""
        self._check(x)
        return self._pool_features(self.trunk(x))

    def _pool_features(self, feats: torch.Tensor) -> torch.Tensor:
        if self.feature_pool == "max":
            return feats.amax(dim=(2, 3))
        if self.feature_pool == "meanstd":  # a 1 x 1 map has no spread: 0, not torch's NaN
            std = feats.std(dim=(2, 3)) if feats.shape[2] * feats.shape[3] > 1 else torch.zeros_like(feats[:, :, 0, 0])
            return torch.cat([feats.mean(dim=(2, 3)), std], dim=1)
        return feats.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float -> logits (B, K)."""
        self._check(x)
        mil = self._pool(self.head(self.trunk(x)))
        if self.fc is None:
            self._last_mil_logits = None
            return mil
        self._last_mil_logits = mil
        return self.fc(mil)

    def aux_loss(self, out: dict[str, torch.Tensor] | torch.Tensor, target: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
        """Kraus' joint loss term: cross-entropy of the MIL layer's logits (0 without fc head).

        ``out`` is the dict of :meth:`forward_maps` (preferred), or the logits of the last
        ``forward`` call (the MIL logits of that call are kept for this). ``target``: (B,)
        class indices or (B, K) class probabilities. Total loss:
        ``F.cross_entropy(logits, target, label_smoothing=s) + model.aux_loss(out, target, s)``:
        the same ``label_smoothing`` as the main term, or the two heads would be trained
        towards different targets.
        """
        if self.fc is None:
            ref = out["logits"] if isinstance(out, dict) else out
            return ref.new_zeros(())
        mil = out["mil_logits"] if isinstance(out, dict) else self._last_mil_logits
        if mil is None or (not isinstance(out, dict) and mil.shape[0] != out.shape[0]):
            raise RuntimeError(f"{self.name}.aux_loss: pass the dict of forward_maps(x) "
                               "(no MIL logits of a matching forward call are available)")
        return F.cross_entropy(mil.float(), target, label_smoothing=label_smoothing)


# ---------------------------------------------------------------- WSCNN

def _wscnn(*, kernels: Sequence[int], paddings: Sequence[int], base: Sequence[int], last_kernel: int,
           last_padding: int, name: str, in_channels: int = 1, num_classes: int = 2,
           width: float | Sequence[int] | None = None, pooling: str = "max",
           pooling_kwargs: dict[str, Any] | None = None, fc_head: bool = False,
           feature_pool: str = "mean") -> ClassMapNet:
    filters = _filters(base, width, name)
    layers: list[nn.Module] = []
    cin = in_channels
    for k, p, f in zip(kernels, paddings, filters):
        layers += conv_block(cin, f, k, p, pool=True)
        cin = f
    trunk = nn.Sequential(*layers)
    head = nn.Conv2d(cin, num_classes, last_kernel, padding=last_padding)
    pool = create_pooling(pooling, num_classes=num_classes, **(pooling_kwargs or {}))
    return ClassMapNet(trunk, head, pool, in_channels=in_channels, num_classes=num_classes, feature_dim=cin,
                       fc_head=fc_head, feature_pool=feature_pool, min_size=min_input_size(layers + [head]),
                       name=name)


def wscnn(**kw: Any) -> ClassMapNet:
    """The WSCNN paper's network: conv 11x11 (50) -> 3x3 (100) -> 5x5 pad 1 (100) -> 5x5 pad 1 (K);
    BN + ReLU + 2x2 max pool after every convolution but the last; global ``pooling``
    (default "max"; "mean" = WSCNN-Avg, "fc" = WSCNN-FC, any MIL pooling name).

    kwargs: ``in_channels`` (1), ``num_classes`` (2), ``width`` (multiplier or 3 filter
    counts), ``pooling``, ``pooling_kwargs`` (e.g. ``{"r": 10}``), ``fc_head`` (False),
    ``feature_pool`` ("mean"). Minimum input 46x46; a 210x280 field gives 21x30 class maps.
    """
    return _wscnn(kernels=(11, 3, 5), paddings=(0, 0, 1), base=(50, 100, 100), last_kernel=5, last_padding=1,
                  name="wscnn", **kw)


def wscnn6(**kw: Any) -> ClassMapNet:
    """The paper's deeper WSCNN (six convolutions). The paper gives no layer list; ours adds
    two 3x3 pad-1 convolutions (100 filters) after the third: 11x11 (50), 3x3 (100),
    5x5 p1 (100), 3x3 p1 (100), 3x3 p1 (100), 5x5 p1 (K), pooling after all but the last
    (``width``: multiplier or 5 filter counts). Minimum input 118x118."""
    return _wscnn(kernels=(11, 3, 5, 3, 3), paddings=(0, 0, 1, 1, 1), base=(50, 100, 100, 100, 100), last_kernel=5,
                  last_padding=1, name="wscnn6", **kw)


def wscnn_cell(**kw: Any) -> ClassMapNet:
    """The paper's model for the multinucleate cell images: ``wscnn`` with a 7x7 second
    convolution. Minimum input 54x54."""
    return _wscnn(kernels=(11, 7, 5), paddings=(0, 0, 1), base=(50, 100, 100), last_kernel=5, last_padding=1,
                  name="wscnn_cell", **kw)


# ---------------------------------------------------------------- generic MIL net

def _small_trunk(in_channels: int, filters: Sequence[int]) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    cin = in_channels
    for f in filters:
        layers += conv_block(cin, f, 3, padding=1, pool=True)
        cin = f
    return nn.Sequential(*layers), cin


def milnet(*, in_channels: int = 1, num_classes: int = 2, width: float | Sequence[int] | None = None,
           pooling: str = "noisy_and", pooling_kwargs: dict[str, Any] | None = None, fc_head: bool = False,
           trunk: str = "small", trunk_weights: str | None = None, feature_pool: str = "mean",
           storage_options: dict[str, Any] | None = None) -> ClassMapNet:
    """Kraus et al.'s class-specific-feature-map net: trunk -> 1x1 conv (one map per class)
    -> MIL ``pooling`` (default "noisy_and") -> optional ``fc_head`` (joint loss).

    ``trunk``: "small" (default: three 3x3 conv-BN-ReLU-maxpool blocks of 32/64/128 filters
    times ``width``, or ``width`` = 3 explicit counts; minimum input 8x8) or a torchvision
    name ("resnet18", "resnet50", "vgg16", "convnext_tiny": its convolutional part, with
    ``trunk_weights`` a local path/URI of the torchvision state dict, see
    :mod:`rayscreen.models.backbones`, read with ``storage_options`` (an S3 endpoint and
    credentials; never recorded); inputs with ``in_channels != 3`` pass a learned
    1x1 convolution to 3 channels first).
    """
    if trunk == "small":
        body, dim = _small_trunk(in_channels, _filters((32, 64, 128), width, "milnet"))
        min_size = min_input_size(list(body))
    else:
        from .backbones import conv_trunk

        # a random trunk drawn from torch's generator, like every other layer here, so that
        # train.seed (which seeds it before the model is built) gives each seed its own trunk;
        # conv_trunk alone would start every trunk from one fixed seed (profiles need that)
        seed = None if trunk_weights else int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())
        body, dim, min_size = conv_trunk(trunk, in_channels=in_channels, weights=trunk_weights, seed=seed,
                                         storage_options=storage_options)
    head = nn.Conv2d(dim, num_classes, 1)
    pool = create_pooling(pooling, num_classes=num_classes, **(pooling_kwargs or {}))
    return ClassMapNet(body, head, pool, in_channels=in_channels, num_classes=num_classes, feature_dim=dim,
                       fc_head=fc_head, feature_pool=feature_pool, min_size=min_size, name=f"milnet[{trunk}]")


def create_pooling(name: str, num_classes: int, **kwargs: Any) -> MILPooling:
    """A MIL pooling by name (see :func:`rayscreen.models.list_poolings`)."""
    from . import POOLINGS

    return POOLINGS.create(name, num_classes=num_classes, **kwargs)


__all__ = ["ClassMapNet", "wscnn", "wscnn6", "wscnn_cell", "milnet", "min_input_size", "POOLING_CLASSES"]
