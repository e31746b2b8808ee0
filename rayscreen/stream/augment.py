"""Data augmentation of WSCNN (Kraus et al., section 3.3) on batched torch tensors.

Augmentations, each drawn independently per image:

(i)   horizontal and vertical flips, and 90-degree rotations (exact permutations of pixels);
(ii)  rotation by an angle drawn uniformly from [-20, 20] U [160, 200] degrees;
(iii) translation by up to +-40 pixels in y and in x;
(iv)  scaling by a factor in [0.8, 1.2] (the paper's "+-50 pixels" on its ~250-pixel
      images), about the image centre;
(v)   optional, not in WSCNN: a random gain per image and channel, ``exp(N(0, intensity))``
      (:func:`random_gain`), which simulates the plate-to-plate differences in stain and
      exposure that per-plate normalisation leaves, so that features learned across
      plates lean less on them (off by default);
(vi)  optional: additive Gaussian noise with a standard deviation drawn per image from
      [0, ``noise``] (:func:`random_noise`), in the stream's normalised units: exposure
      and gain also change the shot noise a network can see (off by default).

(ii)-(iv) are one affine map per image, applied in a single ``affine_grid``/``grid_sample``
pass, so each pixel is interpolated once. Pixels that come from outside the image are 0
(``padding_mode="zeros"``): reflection would mirror cells across the border and could
duplicate the rare cells a weakly supervised model must find.

Plus the WSCNN cell-data mosaic: 2x2 grids of four fields of one class
(:func:`mosaic`, :func:`class_mosaics`), which puts more cells, from several fields, into
each training image.

Where each runs:

- Ray Data CPU workers decode chunks, correct illumination, normalise, tile and take
  random crops (:mod:`.illumination`, :mod:`.normalize`, :mod:`.tiling`,
  :func:`.tiling.random_crop`): per-field work that needs the plate's stored functions,
  and (tiles, crops) shrinks the data before it crosses the object store and the network,
  so a crop costs a slice there but would cost shipping the whole field here.
- This module runs on the training worker, on its GPU, on a collated batch (B, C, H, W):
  flips, 90-degree turns and the affine pass (rotation, translation, scale) as batched
  torch ops.
  Flips and rotations are cheap per-pixel geometric operations that batch into one kernel
  on the GPU but cost a CPU worker milliseconds per field, time it should spend on
  decompression. Augmenting after the stream also means every epoch sees fresh draws
  without re-reading the plate. Mosaics need several fields of the same class, which only
  exist together where a batch with its labels does: in the training step, before the
  geometric augmentation (the paper augments the mosaics).

Seeding: random parameters are drawn on the CPU from a ``torch.Generator`` (or an int
seed) and then moved to the images' device, so a seed gives the same augmentation on CPU
and GPU, whatever the device's own generator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ANGLES = ((-20.0, 20.0), (160.0, 200.0))


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment` does. Angles in degrees (intervals, drawn uniformly from their
    union), ``translate`` the largest shift in pixels, ``scale`` a (min, max) factor.
    Bounds are checked here only; ``train.augment`` errors name their key from these
    messages, which start with the field name."""

    flips: bool = True
    rot90: bool = True
    angles: tuple[tuple[float, float], ...] = ANGLES
    translate: float = 40.0
    scale: tuple[float, float] = (0.8, 1.2)
    mode: str = "bilinear"
    padding_mode: str = "zeros"
    intensity: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if not self.angles or any(lo > hi for lo, hi in self.angles):
            raise ValueError(f"angles: {self.angles}; expected (low, high) intervals with low <= high")
        if not self.translate >= 0:
            raise ValueError(f"translate: {self.translate}; expected the largest shift, >= 0 pixels")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale: {list(self.scale)}; expected [low, high] with 0 < low <= high")
        if not 0 <= self.intensity <= 1:
            raise ValueError(f"intensity: {self.intensity}; expected a log-gain standard deviation in [0, 1] "
                             "(0: off; 0.2 is a +-20 % gain per image and channel)")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise: {self.noise}; expected the largest noise standard deviation, in [0, 1] "
                             "(the stream's normalised units; 0: off)")


def as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator``: the one given, one seeded with an int, or a fresh random one."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


# -- exact permutations


def random_flips(images: torch.Tensor, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Flip each image (B, C, H, W) horizontally and/or vertically, each with probability 1/2."""
    g = as_generator(generator)
    flip = (torch.rand(2, images.shape[0], generator=g) < 0.5).to(images.device)
    out = torch.where(flip[0, :, None, None, None], images.flip(-1), images)
    return torch.where(flip[1, :, None, None, None], out.flip(-2), out)


def random_rot90(images: torch.Tensor, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Rotate each image (B, C, H, W) by k x 90 degrees, k uniform in 0..3; for non-square
    images k is 0 or 2, so the batch keeps its shape."""
    g = as_generator(generator)
    k = torch.randint(0, 4, (images.shape[0],), generator=g)
    if images.shape[-1] != images.shape[-2]:
        k = (k % 2) * 2
    out = images.clone()
    for turns in (1, 2, 3):
        idx = (k == turns).nonzero().flatten().to(images.device)
        if len(idx):
            out[idx] = torch.rot90(images[idx], turns, dims=(-2, -1))
    return out


def random_gain(images: torch.Tensor, sigma: float, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Multiply each channel of each image (B, C, H, W) by ``exp(N(0, sigma))``, drawn per
    (image, channel): a multiplicative change of stain or exposure, as between plates."""
    g = as_generator(generator)
    b, c = images.shape[:2]
    gain = torch.exp(sigma * torch.randn(b, c, generator=g, dtype=torch.float64))
    return images * gain.to(images.device, images.dtype)[:, :, None, None]


def random_noise(images: torch.Tensor, max_sd: float, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Add Gaussian noise to each image (B, C, H, W), its standard deviation drawn per image
    uniformly from [0, ``max_sd``] (the same for its channels)."""
    g = as_generator(generator)
    sd = max_sd * torch.rand(images.shape[0], generator=g, dtype=torch.float64)
    # drawn on the CPU like every draw here (the same noise for a seed on CPU and GPU), at
    # the cost of a host-to-device copy the size of the batch
    noise = torch.randn(images.shape, generator=g, dtype=torch.float32)
    return images + (sd.to(torch.float32)[:, None, None, None] * noise).to(images.device, images.dtype)


# -- one affine pass


def sample_angles(n: int, intervals: Sequence[tuple[float, float]] = ANGLES,
                  generator: int | torch.Generator | None = None) -> torch.Tensor:
    """(n,) angles in degrees, uniform over the union of ``intervals`` (float64)."""
    g = as_generator(generator)
    bounds = torch.tensor(intervals, dtype=torch.float64)
    lengths = bounds[:, 1] - bounds[:, 0]
    # pick an interval in proportion to its length: uniform over the union
    which = torch.multinomial(lengths if lengths.sum() > 0 else torch.ones(len(bounds), dtype=torch.float64),
                              n, replacement=True, generator=g)
    return bounds[which, 0] + lengths[which] * torch.rand(n, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class AffineParams:
    """Per-image affine parameters: ``angle`` (B,) degrees, counter-clockwise as displayed;
    ``translate`` (B, 2) pixels as (dx, dy), content moving right/down; ``scale`` (B,)."""

    angle: torch.Tensor
    translate: torch.Tensor
    scale: torch.Tensor


def sample_affine(n: int, config: AugmentConfig = AugmentConfig(),
                  generator: int | torch.Generator | None = None) -> AffineParams:
    """Draw ``n`` images' rotation, translation and scale from ``config`` (on the CPU)."""
    g = as_generator(generator)
    angle = sample_angles(n, config.angles, g)
    translate = _uniform(2 * n, -config.translate, config.translate, g).reshape(n, 2)
    scale = _uniform(n, config.scale[0], config.scale[1], g)
    return AffineParams(angle, translate, scale)


def affine_theta(params: AffineParams, size: tuple[int, int]) -> torch.Tensor:
    """(B, 2, 3) float64 ``affine_grid`` matrices for images of (H, W) = ``size``.

    The forward map in pixel coordinates about the centre (x right, y down) is
    ``p_out = scale * R(angle) @ p_in + translate``; ``affine_grid`` wants its inverse in
    normalised coordinates (-1..1 along each axis, ``align_corners=False``), hence the
    conjugation by ``D = diag(2/W, 2/H)``, which keeps rotations of non-square images rigid.
    """
    h, w = size
    a = torch.deg2rad(params.angle.to(torch.float64))
    c, s = torch.cos(a), torch.sin(a)
    # inverse rotation R^T of R = [[c, s], [-s, c]] (counter-clockwise on screen, y down)
    rinv = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    d = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)
    linear = d[None, :, None] * rinv / d[None, None, :] / params.scale.to(torch.float64)[:, None, None]
    shift = -(d[None, :, None] * rinv) @ params.translate.to(torch.float64)[:, :, None] \
        / params.scale.to(torch.float64)[:, None, None]
    return torch.cat([linear, shift], dim=-1)


def affine(images: torch.Tensor, params: AffineParams, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Rotate, scale and translate each image (B, C, H, W) in one ``grid_sample`` pass."""
    theta = affine_theta(params, images.shape[-2:]).to(images.device, images.dtype
                                                       if images.is_floating_point() else torch.float32)
    x = images if images.is_floating_point() else images.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def augment(images: torch.Tensor, config: AugmentConfig = AugmentConfig(),
            generator: int | torch.Generator | None = None) -> torch.Tensor:
    """All of WSCNN's augmentation on a batch (B, C, H, W) -> (B, C, H, W) float, on its device."""
    g = as_generator(generator)
    out = images if images.is_floating_point() else images.float()
    if config.flips:
        out = random_flips(out, g)
    if config.rot90:
        out = random_rot90(out, g)
    out = affine(out, sample_affine(out.shape[0], config, g), config.mode, config.padding_mode)
    if config.intensity > 0:  # drawn last: configs without it keep their draws
        out = random_gain(out, config.intensity, g)
    if config.noise > 0:
        out = random_noise(out, config.noise, g)
    return out


class Augmenter:
    """``augment`` with a fixed config and one generator that advances with every batch:
    the callable a training step holds. ``Augmenter(seed=rank * 1000 + epoch)``."""

    def __init__(self, config: AugmentConfig = AugmentConfig(), seed: int | None = None):
        self.config = config
        self.generator = as_generator(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return augment(images, self.config, self.generator)


# -- WSCNN cell-data mosaics


def mosaic(images):
    """Four fields (4, C, H, W) -> one (C, 2H, 2W) in a 2x2 grid:
    ``[[images[0], images[1]], [images[2], images[3]]]``. numpy arrays or torch tensors."""
    n, c, h, w = images.shape
    if n != 4:
        raise ValueError(f"mosaic of {n} images: expected 4 (a 2x2 grid)")
    grid = images.reshape(2, 2, c, h, w)
    grid = grid.permute(2, 0, 3, 1, 4) if isinstance(grid, torch.Tensor) else grid.transpose(2, 0, 3, 1, 4)
    return grid.reshape(c, 2 * h, 2 * w)


def class_mosaics(images: torch.Tensor, labels, generator: int | torch.Generator | None = None,
                  out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mosaic per image of a batch (B, C, H, W) with class ``labels`` (B,).

    Mosaic i holds image i at a random corner and three other images of the same class
    (drawn without replacement when the batch has three, else with; image i alone
    repeated if it is its class's only member), as WSCNN builds its training images.
    Returns mosaics (B, C, 2H, 2W) (or ``out_size``, resized with anti-aliasing) and the
    labels (B,), unchanged: a mosaic has its members' class.
    """
    g = as_generator(generator)
    labels = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if labels.ndim != 1 or len(labels) != images.shape[0]:
        raise ValueError(f"labels shape {tuple(labels.shape)}: expected ({images.shape[0]},), one class per image")
    cpu_labels = labels.cpu()
    members = []
    for i in range(len(cpu_labels)):
        others = ((cpu_labels == cpu_labels[i]).nonzero().flatten())
        others = others[others != i]
        if len(others) >= 3:
            picks = others[torch.randperm(len(others), generator=g)[:3]]
        else:
            pool = others if len(others) else torch.tensor([i])
            picks = pool[torch.randint(0, len(pool), (3,), generator=g)]
        slot = int(torch.randint(0, 4, (1,), generator=g))
        members.append(torch.cat([picks[:slot], torch.tensor([i]), picks[slot:]]))
    index = torch.stack(members).to(images.device)  # (B, 4)
    out = torch.stack([mosaic(images[row]) for row in index])
    if out_size is not None:
        out = F.interpolate(out if out.is_floating_point() else out.float(), size=tuple(out_size),
                            mode="bilinear", antialias=True, align_corners=False)
    return out, labels
