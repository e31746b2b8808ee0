"""Small pieces of the Ray glue that need no Ray: finding a worker's own error in a chain."""

import pytest

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


def test_ray_data_finished_lines_are_dropped_inside_a_stage():
    """Ray Data logs one 'execution finished' line per dataset (per epoch in training);
    rayscreen's stages drop them and keep the logger's other lines and its warnings."""
    import logging

    import importlib

    importlib.import_module("ray.data")  # configures Ray Data's loggers, as in a stage

    from rayscreen.raylocal import DATA_EXECUTOR_LOGGER, DROP_DATA_CHATTER, stage_data_context

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    log, handler = logging.getLogger(DATA_EXECUTOR_LOGGER), Keep()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    finished = "\u2714\ufe0f  Dataset train_0_1 execution finished in 1.83 seconds"
    try:
        with stage_data_context():
            log.info(finished)
            log.info("Starting execution of Dataset x")
            log.warning("Dataset y execution finished in 2 s, with warnings")
            log.warning("Progress bars disabled. To enable, set ...")  # the stages' own choice
        log.info(finished)  # outside a stage: Ray's own behaviour again
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert handler.messages == ["Starting execution of Dataset x", "Dataset y execution finished in 2 s, with warnings",
                                finished]
    assert DROP_DATA_CHATTER not in log.filters


def test_local_init_starts_its_own_ray_with_a_dashboard_port_of_its_own():
    """A local Ray never joins a `ray start` cluster (address "local"), and one without a
    dashboard records a free port of its own, not the default 8265 that another cluster's
    dashboard may hold (its workers' state API would ask that cluster)."""
    from rayscreen.raylocal import local_init_kwargs

    kw = local_init_kwargs(include_dashboard=False)
    assert kw["address"] == "local"
    assert kw["dashboard_port"] != 8265 and 1024 < kw["dashboard_port"] < 65536
    assert local_init_kwargs(include_dashboard=False, dashboard_port=9000)["dashboard_port"] == 9000
    assert "dashboard_port" not in local_init_kwargs()  # with a dashboard, Ray finds a free port itself


@pytest.mark.parametrize("key", ["train.use_gpu", "infer.use_gpu", "profile.use_gpu"])
def test_use_gpu_follows_the_setting_and_says_what_it_chose(key):
    """true reserves GPUs the cluster does not have yet (an autoscaling cluster whose GPU
    nodes start at 0: the autoscaler starts them for the pending workers); false is CPU even
    with GPUs up; null follows the cluster now and, on CPU, names what to set."""
    from rayscreen.raylocal import resolve_use_gpu

    use, line = resolve_use_gpu(key, True, 0)
    assert use is True and "no GPU now" in line and "waiting" in line
    assert resolve_use_gpu(key, True, 4) == (True, f"{key.split('.')[0]}: one GPU each ({key}: true)")
    assert resolve_use_gpu(key, False, 8)[0] is False and resolve_use_gpu(key, False, 0)[0] is False
    use, line = resolve_use_gpu(key, None, 2)
    assert use is True and "2 GPU(s) now" in line
    use, line = resolve_use_gpu(key, None, 0)
    assert use is False and f"set {key}: true" in line and "autoscaling" in line
    for setting, gpus in ((True, 0), (False, 1), (None, 1), (None, 0)):
        assert "\n" not in resolve_use_gpu(key, setting, gpus)[1]
