"""Seeded tiny plates and helpers shared by rayscreen's tests (and users' own tests)."""

from .plates import make_plate, random_field

__all__ = ["make_plate", "random_field"]
