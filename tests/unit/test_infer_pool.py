"""How infer sets up its actor pool: GPU or not, blocks, read-ahead, what each actor is sent."""

import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pandas as pd
import pytest

from rayscreen.infer.run import (READ_AHEAD, InferPlan, WellScoring, read_ahead, store_attrs,
                                 well_blocks, wells_per_call)


def test_blocks_hold_one_call_of_wells_so_a_retry_redoes_at_most_that():
    """Ray Data retries a lost actor's task -- a whole block -- so a block must not hold more
    wells than one call: 384k wells in 16 x concurrency blocks made a retry redo ~6000."""
    for n, per_call in ((12, 6), (13, 6), (1, 6), (5, 6), (384_000, 8), (7, 1)):
        blocks = well_blocks(n, per_call)
        sizes = [s.stop - s.start for s in blocks]
        assert len(blocks) == -(-n // per_call)  # ceil(n / per_call)
        assert all(size == per_call for size in sizes[:-1]) and 0 < sizes[-1] <= per_call
        assert [i for s in blocks for i in range(n)[s]] == list(range(n))  # every well once, in order
    assert well_blocks(0, 6) == []


def test_wells_per_call_is_four_forward_batches():
    assert wells_per_call(16, 9) == 8  # ceil(64 / 9)
    assert wells_per_call(4, 3) == 6
    assert wells_per_call(4, 100) == 1


def _slow_reads(delay_read=0.01):
    """A read function that records how many reads run at once and how many items were
    started and not yet consumed (the consumer marks consumption with ``consumed``)."""
    state = SimpleNamespace(lock=threading.Lock(), running=0, max_running=0, started=0, consumed=0, max_held=0,
                            started_at={})

    def read(i):
        with state.lock:
            state.running += 1
            state.started += 1
            state.started_at[i] = state.consumed
            state.max_running = max(state.max_running, state.running)
            state.max_held = max(state.max_held, state.started - state.consumed)
        time.sleep(delay_read)
        with state.lock:
            state.running -= 1
        return i * 10

    return state, read


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_read_ahead_bounds_the_wells_held_keeps_order_and_overlaps(threads):
    """However many wells a call has, at most READ_AHEAD + 1 are read and not yet scored
    (each can be ~0.5 GB), in order, and the next well's read runs while one is scored."""
    state, read = _slow_reads()
    got = []
    with ThreadPoolExecutor(threads) as pool, read_ahead(pool, read, range(20), READ_AHEAD) as results:
        for i, value in enumerate(results):
            got.append(value)
            # the model's work on this well: the next well's read starts meanwhile, unasked
            deadline = time.monotonic() + 5
            while i < 19 and state.started < i + 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.01)
            with state.lock:
                state.consumed += 1
    assert got == [i * 10 for i in range(20)]
    assert state.max_held <= READ_AHEAD + 1, state.max_held
    assert state.max_running <= min(threads, READ_AHEAD + 1)
    # overlap: well i + 1's read started before well i was scored (consumed)
    assert all(state.started_at[i + 1] <= i for i in range(19)), state.started_at


def test_read_ahead_raises_a_read_error_at_its_item_and_leaves_no_read_running():
    state, read = _slow_reads()

    def failing(i):
        if i == 3:
            raise ValueError("unreadable well 3")
        return read(i)

    got = []
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ValueError, match="well 3"):
            with read_ahead(pool, failing, range(50), 2) as results:
                for value in results:
                    got.append(value)
        assert state.running == 0  # no read outlives the block
    assert got == [0, 10, 20]
    assert state.started <= 3 + 2  # the failing one's followers only, not all 50


def test_an_error_of_the_caller_cancels_the_reads_not_started():
    state, read = _slow_reads(0.05)
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(RuntimeError):
            with read_ahead(pool, read, range(50), 2) as results:
                next(results)
                raise RuntimeError("model failed")
        assert state.running == 0
    assert state.started <= 3


def _plan(n_wells, checkpoint="/m/model"):
    from rayscreen.infer.predictor import PredictorSettings
    from rayscreen.stream.datasource import StreamOptions

    wells = pd.DataFrame({"plate": ["P"] * n_wells, "plate_uri": ["/p/P.zarr"] * n_wells,
                          "well": [f"W{i:06d}" for i in range(n_wells)],
                          "Metadata_Compound": [f"compound number {i}" for i in range(n_wells)]})
    return InferPlan(checkpoint=checkpoint, results_uri="/o/results.zarr", wells=wells, n_fields=9,
                     field_shape=(64, 64), classes=["neg", "pos"], feature_dim=8,
                     options=StreamOptions(channels=("DNA",), dtype="float32"), settings=PredictorSettings(),
                     meta=SimpleNamespace(model={"name": "wscnn"}), labels=None)


def test_each_actor_is_sent_what_it_uses_not_the_screens_wells():
    """The actor's constructor argument is pickled into every actor: it must not grow with
    the screen (the plan's wells table has a row per well of every plate)."""
    from rayscreen.config import config_from_dict

    config = config_from_dict({"plates": ["/p/P.zarr"], "output": "/o", "infer": {"num_cpus": 2, "aggregate": "mean"}})
    small, large = (WellScoring.of(_plan(n), config, use_gpu=True) for n in (10, 100_000))
    assert len(pickle.dumps(large)) == len(pickle.dumps(small)) < 4000
    assert not any(isinstance(v, pd.DataFrame) for v in vars(large).values())
    assert (large.aggregate, large.num_cpus, large.use_gpu, large.n_fields) == ("mean", 2, True, 9)


def test_store_attrs_mask_a_checkpoint_urls_password():
    from rayscreen.config import config_from_dict

    secret = "https://alice:s3cr3t-pw@models.example.org/screen/model"
    config = config_from_dict({"plates": ["/p/P.zarr"], "output": "/o", "infer": {"checkpoint": secret}})
    attrs = store_attrs(_plan(2, checkpoint=secret), config)
    assert "s3cr3t-pw" not in repr(attrs)
    assert attrs["checkpoint"] == "https://alice:***@models.example.org/screen/model"
    assert store_attrs(_plan(2), config)["checkpoint"] == "/m/model"  # a path is kept as it is
