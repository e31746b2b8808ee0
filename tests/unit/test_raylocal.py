"""Small pieces of the Ray glue that need no Ray: finding a worker's own error in a chain."""

from rayscreen.raylocal import cause_of
from rayscreen.store import RayscreenError


class Wrapper(Exception):
    """Like Ray's RayTaskError: holds the worker's exception in ``.cause``."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


def _raised(make):
    try:
        make()
    except Exception as e:  # noqa: BLE001 -- the chain is what the test looks at
        return e


def test_cause_of_finds_the_worker_error_through_wrappers_and_causes():
    ours = RayscreenError("plate 'P1' well A02 field 1: cannot decode a chunk")
    assert cause_of(Wrapper(ours), RayscreenError) is ours
    outer = _raised(lambda: _chain(RuntimeError("batch failed"), ours))
    assert cause_of(outer, RayscreenError) is ours
    plain = ValueError("nothing of ours")
    assert cause_of(plain, RayscreenError) is plain


def _chain(outer, cause):
    raise outer from cause


def test_cause_of_ignores_an_error_that_was_only_being_handled():
    """A worker that caught our error and then failed otherwise (raise ... from None) failed
    for that other reason: reporting the stale RayscreenError would hide it."""
    def worker():
        try:
            raise RayscreenError("a read that was retried")
        except RayscreenError:
            raise OSError("disk full") from None

    failure = _raised(worker)
    assert failure.__context__ is not None  # Python keeps the handled error, suppressed
    assert cause_of(failure, RayscreenError) is failure
    wrapped = Wrapper(failure)
    assert cause_of(wrapped, RayscreenError) is wrapped  # nothing of ours: the error as given
