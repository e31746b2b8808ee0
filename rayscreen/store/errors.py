"""Errors of the plate store. Each message names the plate/well/field/file and says
what was expected and what was found, so a user can fix the input without a debugger."""


def preview(items, limit: int = 10) -> str:
    """A list for a message: all of it when short, else the first ``limit`` and how many more
    (a message naming 1000 features helps no one)."""
    items = list(items)
    return f"{items[:limit]} and {len(items) - limit} more" if len(items) > limit else f"{items}"


class RayscreenError(ValueError):
    """Base class of rayscreen's input errors (a ValueError: bad input, not a bug)."""


class NotAPlateError(RayscreenError):
    """The URI holds no OME-Zarr HCS plate (a single image, a plain group, nothing)."""


class MissingWellError(RayscreenError, KeyError):
    """A well listed in the plate metadata is absent on disk (sparse plates are valid)."""

    __str__ = ValueError.__str__  # KeyError would quote the message


class IncompleteWellError(MissingWellError):
    """A well of a plate rayscreen wrote that its writer never completed: ``create_plate``
    lists every well up front and a well's metadata is written last, so in such a plate an
    absent well is an ingest cut short, not a sparse plate. Streams raise it (unless told to
    skip), and stages do not record its well as done."""


class MissingChunkError(RayscreenError):
    """A chunk of a field is absent: it must not read back as fill values."""


class CorruptDataError(RayscreenError):
    """A chunk is present but cannot be decoded (garbled or truncated bytes)."""


class BadImageError(RayscreenError):
    """An image has the wrong shape, dtype or channel count, or holds NaN/Inf."""
