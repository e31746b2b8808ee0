"""Tiles over large fields, and random crops for training.

The last tile in each direction is aligned to the field's edge (it may overlap its
neighbour) so that no pixel is lost and every tile has the same shape.
"""

from __future__ import annotations

import numpy as np


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if tile > size:
        raise ValueError(f"tile {tile} is larger than the field ({size} pixels)")
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tile_positions(shape: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left (y, x) of every tile of a (Y, X) field, row by row."""
    return [(y, x) for y in _starts(shape[0], tile[0], stride[0]) for x in _starts(shape[1], tile[1], stride[1])]


def tiles(image: np.ndarray, tile: tuple[int, int], stride: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(C, Y, X) -> tiles (N, C, ty, tx) and their top-left positions."""
    positions = tile_positions(image.shape[-2:], tile, stride)
    stack = np.stack([image[:, y:y + tile[0], x:x + tile[1]] for y, x in positions])
    return stack, positions


def random_crop(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (C, size_y, size_x) crop at a uniformly random position."""
    y = int(rng.integers(0, image.shape[-2] - size[0] + 1))
    x = int(rng.integers(0, image.shape[-1] - size[1] + 1))
    return image[:, y:y + size[0], x:x + size[1]]
