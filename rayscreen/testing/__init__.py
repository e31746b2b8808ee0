"""Seeded tiny plates and helpers shared by rayscreen's tests (and users' own tests)."""

from .memory import MemorySampler, tree_memory
from .plates import make_plate, random_field

__all__ = ["make_plate", "random_field", "MemorySampler", "tree_memory"]
