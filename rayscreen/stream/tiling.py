"""Tiles over large fields, and random crops for training.

Tiling rule: tiles start every ``stride`` pixels (at most the tile) from the top-left
corner, and where the last regular tile stops short of the field's edge one more tile is
added flush with the edge (it overlaps its neighbour). So no pixel is lost and every tile
has the same shape, which lets tiles of many fields stack into one batch. A field smaller
than a tile is an error rather than a padded tile, so no tile holds invented pixels.
"""

from __future__ import annotations

import numpy as np


def _pair(v, what: str) -> tuple[int, int]:
    y, x = (v, v) if np.isscalar(v) else v
    if int(y) <= 0 or int(x) <= 0:
        raise ValueError(f"{what} {v}: expected positive pixel counts")
    return int(y), int(x)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if tile > size:
        raise ValueError(f"tile {tile} is larger than the field ({size} pixels)")
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tile_positions(shape: tuple[int, int], tile: int | tuple[int, int],
                   stride: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Top-left (y, x) of every tile of a (Y, X) field, row by row (see the tiling rule).

    ``stride`` defaults to the tile (no overlap but the edge tiles'); a stride larger than
    the tile is an error, since the pixels between two tiles would be in none.
    """
    ty, tx = _pair(tile, "tile")
    sy, sx = _pair(stride if stride is not None else (ty, tx), "stride")
    if sy > ty or sx > tx:
        raise ValueError(f"stride {(sy, sx)} is larger than the tile {(ty, tx)}: the pixels between "
                         "two tiles would be in none; expected a stride of at most the tile")
    return [(y, x) for y in _starts(shape[0], ty, sy) for x in _starts(shape[1], tx, sx)]


def tiles(image: np.ndarray, tile: int | tuple[int, int],
          stride: int | tuple[int, int] | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(C, Y, X) -> tiles (N, C, ty, tx) and their top-left (y, x) positions."""
    ty, tx = _pair(tile, "tile")
    positions = tile_positions(image.shape[-2:], (ty, tx), stride)
    stack = np.stack([image[:, y:y + ty, x:x + tx] for y, x in positions])
    return stack, positions


def random_crop(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (C, size_y, size_x) crop of a (C, Y, X) field at a uniformly random position (a view).

    Meant for the Ray Data CPU workers (a ``map_batches`` before the training worker): a
    crop is a slice there and shrinks what crosses the object store, unlike the geometric
    augmentation of :mod:`.augment`, which runs batched on the training worker's GPU."""
    sy, sx = _pair(size, "crop size")
    y, x = crop_position(image.shape[-2:], (sy, sx), rng)
    return image[:, y:y + sy, x:x + sx]


def crop_position(shape: tuple[int, int], size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """Uniformly random top-left (y, x) of a ``size`` crop inside a (Y, X) field."""
    sy, sx = size
    if sy > shape[0] or sx > shape[1]:
        raise ValueError(f"crop {(sy, sx)} is larger than the field {tuple(shape)}")
    return int(rng.integers(0, shape[0] - sy + 1)), int(rng.integers(0, shape[1] - sx + 1))


def random_crops(batch: dict, size: int | tuple[int, int], seed: int = 0) -> dict:
    """Crop every field of a stream batch at a random position: the ``map_batches`` function
    for training crops on the Ray Data CPU workers, ``ds.map_batches(random_crops,
    fn_kwargs={"size": 224, "seed": epoch})``.

    ``batch["image"]`` (N, C, Y, X) becomes (N, C, size_y, size_x) and columns ``crop_y``,
    ``crop_x`` (N,) give each crop's top-left corner. Each row's position comes from a
    generator keyed by ``seed`` and the row's plate/well/field(/tile), so the crops are the
    same whichever worker or block a row lands in, and change with ``seed`` (the epoch).
    """
    import zlib

    sy, sx = _pair(size, "crop size")
    images = batch["image"]
    n = len(images)
    keys = [batch[k] if k in batch else [""] * n for k in ("plate", "well", "field", "tile_y", "tile_x")]
    out = np.empty((n, images.shape[1], sy, sx), dtype=images.dtype)
    ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        row = "/".join(str(k[i]) for k in keys)
        rng = np.random.default_rng([int(seed), zlib.crc32(row.encode())])
        ys[i], xs[i] = crop_position(images.shape[-2:], (sy, sx), rng)
        out[i] = images[i, :, ys[i]:ys[i] + sy, xs[i]:xs[i] + sx]
    return {**batch, "image": out, "crop_y": ys, "crop_x": xs}
