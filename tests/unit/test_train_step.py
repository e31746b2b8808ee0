"""Training maths (rayscreen.train.step) and checkpoints on small tensors, no Ray."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from rayscreen.config import TrainConfig
from rayscreen.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from rayscreen.train.step import (balance_repeats, broadcast_buffers, classification_metrics, make_optimizer,
                                  make_scheduler, mixup, model_loss, predict, random_crops, repeat_rows,
                                  restore_scheduler, step_scheduler, train_step)


def test_metrics_binary_by_hand():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(labels, probs, loss_sum=5.0)
    # predictions 0 1 0 1 0: TP=1 FP=1 FN=1 TN=2
    assert m["val_loss"] == pytest.approx(1.0)
    assert m["val_accuracy"] == pytest.approx(3 / 5)
    assert m["val_balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["val_precision"] == pytest.approx(0.5)
    assert m["val_recall"] == pytest.approx(0.5)
    assert m["val_f1"] == pytest.approx(0.5)
    # positive scores 0.7, 0.4 vs negatives 0.1, 0.6, 0.2: pairs won 3 + 2 of 6
    assert m["val_roc_auc"] == pytest.approx(5 / 6)


def test_metrics_multiclass_macro_and_undefined_auc():
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(labels, probs)
    assert m["val_accuracy"] == pytest.approx(0.75)
    assert m["val_balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["val_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["val_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    one_class = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert math.isnan(one_class["val_roc_auc"])
    assert one_class["val_accuracy"] == 0.5


def test_balance_repeats_and_repeat_rows():
    assert balance_repeats({0: 90, 1: 10}) == {0: 1, 1: 9}
    assert balance_repeats({0: 10, 1: 10, 2: 4}) == {0: 1, 1: 1, 2: 2}  # round(2.5) = 2
    batch = {"image": np.arange(3)[:, None], "y": np.array([0, 1, 0])}
    out = repeat_rows(batch, "y", {0: 1, 1: 3})
    assert out["y"].tolist() == [0, 1, 1, 1, 0]
    assert out["image"][:, 0].tolist() == [0, 1, 1, 1, 2]


def test_random_crops_are_windows_of_each_image():
    images = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    crops = random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 4, 4)
    for i in range(2):
        y, x = divmod(int(crops[i, 0, 0, 0] - images[i, 0, 0, 0]), 8)
        assert torch.equal(crops[i], images[i, :, y:y + 4, x:x + 4])
    with pytest.raises(ValueError, match="larger than the fields"):
        random_crops(images, 7, torch.Generator())


def test_mixup_blends_pairs_of_the_batch_and_their_labels():
    # image i is the constant i and has class i, so each soft target tells which pair was mixed
    images = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    labels = torch.arange(4)
    mixed, targets = mixup(images, labels, 4, 0.4, torch.Generator().manual_seed(3))
    assert mixed.shape == (4, 1, 2, 2) and targets.shape == (4, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    lams = targets[torch.arange(4), labels]
    lam = lams.min().item()  # one lam per batch; an image the permutation maps to itself keeps 1
    assert 0 < lam < 1 and all(abs(v - lam) < 1e-6 or abs(v - 1) < 1e-6 for v in lams.tolist())
    partners = []
    for i in range(4):
        other = targets[i].clone()
        other[i] -= lam
        j = int(other.argmax())  # the class (= image) mixed in with weight 1 - lam (i itself if fixed)
        partners.append(j)
        torch.testing.assert_close(mixed[i], torch.full((1, 2, 2), lam * i + (1 - lam) * j))
    assert sorted(partners) == [0, 1, 2, 3]  # a permutation of the batch
    again = mixup(images, labels, 4, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], targets)  # seeded: a resumed epoch repeats
    # alpha -> 0: lam is ~0 or ~1, every image (nearly) one of the batch
    near, _ = mixup(images, labels, 4, 1e-3, torch.Generator().manual_seed(0))
    assert torch.allclose(near, near.round(), atol=1e-2)


def test_model_loss_soft_targets_and_label_smoothing():
    torch.manual_seed(0)
    model = Tiny()
    x, y = toy(8)
    hard = model_loss(model, x, y)
    one_hot = nn.functional.one_hot(y, 2).float()
    torch.testing.assert_close(model_loss(model, x, one_hot), hard)  # one-hot targets = class indices
    logp = nn.functional.log_softmax(model(x), 1)
    smoothed = -(0.9 * one_hot + 0.05) * logp  # smoothing 0.1 over 2 classes
    torch.testing.assert_close(model_loss(model, x, y, label_smoothing=0.1), smoothed.sum(1).mean())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))  # global max pooling: logits (B, 2)


def toy(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.1
    y = torch.arange(n) % 2
    x[y == 1, :, 3, 4] = 1.0  # one bright pixel marks a positive image
    return x, y


def test_train_step_learns_a_rare_bright_pixel():
    torch.manual_seed(0)
    x, y = toy()
    model = Tiny()
    opt = make_optimizer(model.parameters(), TrainConfig(optimizer="adamw", lr=0.05, weight_decay=0.0))
    losses = [train_step(model, opt, x, y) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    probs, labels, loss_sum, n = predict(model, [(x[:16], y[:16]), (x[16:], y[16:])])
    assert probs.shape == (32, 2) and n == 32 and labels.tolist() == y.tolist()
    assert (probs.argmax(1) == y.numpy()).mean() == 1.0
    assert loss_sum / n == pytest.approx(float(nn.functional.cross_entropy(model(x).detach(), y)), rel=1e-5)


def test_train_step_transform_grad_clip_and_nan_loss():
    """The step trains on what ``transform`` returns (images and labels), and grad_clip bounds
    the update: with plain SGD at lr 1 the parameter change is minus the (clipped) gradient."""
    import copy

    torch.manual_seed(0)
    model = Tiny()
    x, y = toy(8)

    def transform(a, b):  # new images and swapped labels: a step on the raw batch gives another loss
        return a.flip(-1) * 3.0, 1 - b

    sgd = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
    expected = float(model_loss(copy.deepcopy(model).train(), *transform(x, y)))
    raw = float(model_loss(copy.deepcopy(model).train(), x, y))
    assert abs(expected - raw) > 1e-3  # the transform matters for this batch
    trained = copy.deepcopy(model)
    loss = train_step(trained, make_optimizer(trained.parameters(), sgd), x, y, transform=transform)
    assert loss == pytest.approx(expected, rel=1e-6)

    def update_norm(grad_clip):
        m = copy.deepcopy(model)
        before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        train_step(m, make_optimizer(m.parameters(), sgd), x, y, transform=transform, grad_clip=grad_clip)
        after = torch.cat([p.detach().flatten() for p in m.parameters()])
        return float((after - before).norm())

    free = update_norm(None)  # lr 1, no momentum: the full gradient's norm
    clip = 0.25 * free
    assert free > 0.1
    assert update_norm(clip) <= clip * (1 + 1e-4)
    assert update_norm(clip) == pytest.approx(clip, rel=1e-3)  # clipped to the bound, not below it
    with pytest.raises(FloatingPointError, match="train.lr"):
        train_step(model, make_optimizer(model.parameters(), sgd), x * float("nan"), y)


def test_schedulers():
    model = Tiny()
    cfg = TrainConfig(lr=1.0, schedule="plateau", metric="val_loss")
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    for _ in range(5):  # no improvement after the first: patience 3, then x0.1
        step_scheduler(sched, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    step_scheduler(sched, float("nan"))  # ignored, not a crash
    cfg = TrainConfig(lr=1.0, schedule="cosine", epochs=4)
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    opt.step()
    for _ in range(2):
        step_scheduler(sched, None)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # half way down the cosine
    assert make_scheduler(opt, TrainConfig(schedule="none")) is None


def _lrs(cfg, epochs, opt, sched):
    """The lr of each epoch, stepped once per epoch as the loop does."""
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        step_scheduler(sched, 1.0)
    return out


@pytest.mark.parametrize("first, total", [(2, 4), (10, 20), (6, 8), (4, 3)])
def test_resumed_cosine_follows_the_new_epoch_count(first, total):
    """train.epochs may change on resume: the cosine continues on the curve of the new length
    (the stored T_max made the lr climb back up after the old end, or train at lr 0)."""
    import dataclasses

    cfg = TrainConfig(lr=0.1, momentum=0.0, schedule="cosine", epochs=first)
    opt = make_optimizer(Tiny().parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    _lrs(cfg, first, opt, sched)
    more = dataclasses.replace(cfg, epochs=total)
    opt2 = make_optimizer(Tiny().parameters(), more)
    opt2.load_state_dict(opt.state_dict())  # as the loop: the optimiser first (its lr), then the schedule
    sched2 = make_scheduler(opt2, more)
    restore_scheduler(sched2, sched.state_dict(), more)
    fresh_cfg = make_optimizer(Tiny().parameters(), more)
    fresh = _lrs(more, total, fresh_cfg, make_scheduler(fresh_cfg, more))
    resumed = _lrs(more, max(0, total - first), opt2, sched2)
    assert resumed == pytest.approx(fresh[first:], abs=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(resumed, resumed[1:]))  # never back up
    if total <= first:  # fewer epochs than already trained: at the curve's end, not lr 0.1 again
        assert opt2.param_groups[0]["lr"] == pytest.approx(sched2.eta_min, abs=1e-12)


def test_restore_scheduler_leaves_plateau_as_stored():
    cfg = TrainConfig(lr=1.0, schedule="plateau", metric="val_loss", epochs=3)
    opt = make_optimizer(Tiny().parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    for _ in range(5):
        step_scheduler(sched, 1.0)
    opt2 = make_optimizer(Tiny().parameters(), cfg)
    opt2.load_state_dict(opt.state_dict())
    sched2 = make_scheduler(opt2, cfg)
    restore_scheduler(sched2, sched.state_dict(), TrainConfig(lr=1.0, schedule="plateau", metric="val_loss",
                                                              epochs=30))
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1) and sched2.num_bad_epochs == sched.num_bad_epochs


def test_broadcast_buffers_without_a_process_group_changes_nothing():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model.train()(torch.rand(4, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broadcast_buffers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_round_trip_tensors_and_json(tmp_path):
    model = Tiny()
    cfg = TrainConfig(lr=0.5, schedule="cosine")
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg)
    x, y = toy(4)
    train_step(model, opt, x, y)
    step_scheduler(sched, None)
    state = TrainState(epoch=3, best_epoch=2, best_value=0.9,
                       history=[{"epoch": 1, "val_roc_auc": float("nan")}], meta={"classes": ["neg", "pos"]})
    save_checkpoint(str(tmp_path), state, model.state_dict(), opt.state_dict(), sched.state_dict())
    loaded = load_checkpoint(str(tmp_path))
    assert loaded["state"].epoch == 3 and loaded["state"].best_epoch == 2
    assert loaded["state"].history[0]["val_roc_auc"] is None  # NaN stored as JSON null
    assert loaded["state"].meta["classes"] == ["neg", "pos"]
    fresh = Tiny()
    fresh.load_state_dict(loaded["model"])
    assert torch.equal(fresh(x), model(x))
    opt2 = make_optimizer(fresh.parameters(), cfg)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    sched2 = make_scheduler(opt2, cfg)
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.last_epoch == 1


def test_checkpoint_load_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    save_checkpoint(str(tmp_path), TrainState(epoch=1), {"w": torch.zeros(1)})
    torch.save({"w": Evil()}, tmp_path / "model.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(str(tmp_path))


def test_batch_cache_replays_a_small_pass_and_holds_nothing_of_a_large_one():
    from rayscreen.train.loop import BatchCache

    batches = [(torch.full((2, 1, 2, 2), float(i)), torch.tensor([i, i])) for i in range(3)]
    nbytes = 2 * 4 * 4 + 2 * 8  # one batch: 8 float32 + 2 int64
    cache = BatchCache(3 * nbytes)
    first = list(cache.fill(iter(batches)))
    assert [b[1].tolist() for b in first] == [[0, 0], [1, 1], [2, 2]] and cache.full
    assert all(a[0] is b[0] for a, b in zip(cache.batches(), batches))
    small = BatchCache(3 * nbytes - 1)  # the third batch does not fit: every batch still passes through
    assert [b[1].tolist() for b in small.fill(iter(batches))] == [[0, 0], [1, 1], [2, 2]]
    assert not small.full and list(small.batches()) == []
    partial = BatchCache(10 * nbytes)
    it = partial.fill(iter(batches))
    next(it)  # an abandoned pass is not a complete one
    assert not partial.full
    # a set found too large is not held on later passes either (its size does not change)
    assert [b[1].tolist() for b in small.fill(iter(batches[:2]))] == [[0, 0], [1, 1]] and not small.full


def test_an_empty_pass_is_not_a_cache_to_replay():
    from rayscreen.train.loop import BatchCache

    cache = BatchCache(1 << 20)
    assert list(cache.fill(iter([]))) == [] and not cache.full


def test_batch_reservoir_keeps_a_uniform_seeded_sample_of_the_epoch():
    """train.precise_bn's fields of a streamed epoch: k batches drawn uniformly from the
    whole epoch (wells stream in plate order: the first k would be the first plates')."""
    from rayscreen.train.loop import BatchReservoir

    def kept(seed, n=100, k=10):
        r = BatchReservoir(k, seed)
        for i in range(n):
            r.offer(torch.tensor([i]))
        return sorted(int(b) for b in r.kept)

    one = kept(0)
    assert len(one) == 10 == len(set(one)) and one == kept(0) and one != kept(1)
    assert max(one) >= 10  # not the first ten
    means = [np.mean(kept(seed)) for seed in range(300)]
    assert 46 < np.mean(means) < 53  # 49.5 for a uniform sample of 0..99
    assert kept(0, n=4) == [0, 1, 2, 3]  # fewer batches than k: all of them


def test_cache_sample_gathers_distinct_rows_batch_by_batch():
    from rayscreen.train.loop import BatchCache

    cache = BatchCache(1 << 20)
    rows = torch.arange(20).float().reshape(20, 1, 1, 1)
    list(cache.fill((rows[i:i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 20, 4)))
    batches = list(cache.sample(7, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 1]
    drawn = torch.cat(batches).flatten().long().tolist()
    assert len(set(drawn)) == 7 and drawn != list(range(7))
    assert sorted(torch.cat(list(cache.sample(50, 8, torch.Generator().manual_seed(1)))).flatten().long().tolist()) \
        == list(range(20))  # more asked than held: every row once


def test_training_cache_replays_every_row_once_per_epoch_in_a_seeded_new_order():
    """train.cache_mb: later epochs take the held rows in a permutation of their own, seeded
    by (seed, rank, epoch); copies of a rare field (train.balanced repeats it in place) are
    spread over the epoch instead of sitting in one batch."""
    from rayscreen.train.loop import BatchCache, order_seed
    from rayscreen.train.step import repeat_rows

    rows = repeat_rows({"x": np.arange(12), "y": np.array([1] + [0] * 11)}, "y", {0: 1, 1: 9})
    assert rows["x"][:9].tolist() == [0] * 9  # the copies side by side, as they stream
    images = torch.from_numpy(rows["x"]).float().reshape(-1, 1, 1, 1)
    labels = torch.from_numpy(rows["y"])
    cache = BatchCache(1 << 20)
    list(cache.fill((images[i:i + 5], labels[i:i + 5]) for i in range(0, 20, 5)))
    assert cache.full

    def epoch(e):
        return list(cache.shuffled(6, torch.Generator().manual_seed(order_seed(0, 0, e))))

    one, again, two = epoch(2), epoch(2), epoch(3)
    assert [len(b[1]) for b in one] == [6, 6, 6, 2]
    ids = [b[0].flatten().long() for b in one]
    assert sorted(torch.cat(ids).tolist()) == sorted(rows["x"].tolist())  # every row once
    assert all(torch.equal(b[1], (b[0].flatten() == 0).long()) for b in one)  # labels travel with their rows
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))  # the same seed, the same order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, two))
    assert max(int((i == 0).sum()) for i in ids) <= 4  # 9 copies over 4 batches, not 9 in one
    assert order_seed(0, 0, 2) not in (order_seed(0, 1, 2), order_seed(0, 0, 3), order_seed(1, 0, 2))


def test_early_start_fetches_the_first_item_ahead_and_yields_everything_in_order():
    import threading

    from rayscreen.train.loop import EarlyStart

    fetched = threading.Event()

    def gen():
        fetched.set()
        yield from range(4)

    it = EarlyStart(gen())
    assert fetched.wait(5)  # started before anyone asked
    assert list(it) == [0, 1, 2, 3]
    assert list(EarlyStart(iter([]))) == []

    def bad():
        raise OSError("plate gone")
        yield

    with pytest.raises(OSError, match="plate gone"):
        next(EarlyStart(bad()))


def test_epoch_score_orders_epochs_and_never_keeps_a_collapsed_or_undefined_one():
    from rayscreen.train.loop import epoch_score

    assert epoch_score(0.8, "max") == 0.8 and epoch_score(0.3, "min") == -0.3
    assert epoch_score(0.2, "min") > epoch_score(0.3, "min")
    assert epoch_score(float("nan"), "max") == -math.inf and epoch_score(None, "min") == -math.inf
    # a collapsed teacher's loss may be the lowest of the run: it still scores -inf
    assert epoch_score(0.001, "min", collapsed="one prototype") == -math.inf


def test_ties_go_to_the_latest_epoch_in_the_loop_and_the_export():
    """The loop's best_epoch and the exported checkpoint agree on tied metrics: the latest
    tie, the one Ray keeps (it deletes the earliest of tied checkpoints first)."""
    from rayscreen.train.loop import best_checkpoint, epoch_score, is_new_best

    for mode, values in (("max", [0.5, 0.5, 0.4, 0.5, float("nan")]), ("min", [0.3, 0.2, 0.2, 0.25, 0.2])):
        best_value = best_epoch = None
        for epoch, v in enumerate(values, 1):
            if is_new_best(epoch_score(v, mode), v, best_value, mode):
                best_value, best_epoch = v, epoch
        assert best_epoch == (4 if mode == "max" else 5)
        kept = [(f"ckpt{e}", {"epoch": e, "score": epoch_score(v, mode)}) for e, v in enumerate(values, 1)]
        for k in (1, 2, len(kept)):  # whichever of the ties Ray still keeps: the latest of them
            survivors = sorted(kept, key=lambda p: (p[1]["score"], p[1]["epoch"]))[-k:]
            assert best_checkpoint(survivors) == f"ckpt{best_epoch}"
    assert not is_new_best(-math.inf, 0.9, None, "max")  # an undefined or collapsed epoch is never best
    # scores as read back (null for -inf): the latest epoch, never a crash
    assert best_checkpoint([("a", {"epoch": 1, "score": None}), ("b", {"epoch": 2, "score": None})]) == "b"
    assert best_checkpoint([]) is None


def test_no_finite_score_warning_condition_survives_the_checkpoint(tmp_path):
    """-inf scores are stored as JSON null: the warning that no epoch had a finite metric
    must still see them."""
    from rayscreen.train.loop import epoch_score, no_finite_score

    history = [{"epoch": e, "score": epoch_score(float("nan"), "max")} for e in (1, 2)]
    save_checkpoint(str(tmp_path), TrainState(epoch=2, history=history), {"w": torch.zeros(1)})
    stored = load_checkpoint(str(tmp_path))["state"].history
    assert no_finite_score(history) and no_finite_score(stored)
    assert not no_finite_score(stored + [{"epoch": 3, "score": 0.7}])
    assert not no_finite_score([])


def test_epoch_seeds_are_pure_and_the_global_stream_is_its_own():
    """Every random draw of an epoch comes from (train.seed, rank, epoch): a resumed epoch
    repeats it. torch's global generator (dropout) gets a seed no crop/augmentation stream
    of any nearby epoch or rank uses."""
    from rayscreen.train.loop import epoch_seed, global_seed

    assert global_seed(0, 0, 3) == global_seed(0, 0, 3) and epoch_seed(7, 1, 3) == epoch_seed(7, 1, 3)
    others = {epoch_seed(s, r, e) + k for s in (0, 1) for r in range(4) for e in range(60) for k in (0, 1)}
    globals_ = {global_seed(s, r, e) for s in (0, 1) for r in range(4) for e in range(60)}
    assert len(globals_) == 2 * 4 * 60 and not globals_ & others


def test_metrics_of_a_class_absent_from_validation():
    """A class of two wells goes to train and test, never to validation: perfect predictions
    scored F1 0.667 (the absent class counted as 0), and binary runs without a positive in
    validation read 0.0 where the metric is undefined."""
    import numpy as np

    from rayscreen.train.step import classification_metrics

    def probs(pred, k):
        p = np.full((len(pred), k), 0.01)
        p[np.arange(len(pred)), pred] = 1.0
        return p / p.sum(axis=1, keepdims=True)

    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(labels, probs(labels, 3))  # class 2 in no validation well
    assert m["val_f1"] == m["val_precision"] == m["val_recall"] == 1.0
    m = classification_metrics(np.array([0, 0, 0]), probs(np.array([0, 0, 0]), 2))
    assert np.isnan(m["val_precision"]) and np.isnan(m["val_recall"]) and np.isnan(m["val_f1"])
    m = classification_metrics(np.array([0, 1, 1]), probs(np.array([0, 1, 0]), 2))
    assert (m["val_precision"], m["val_recall"]) == (1.0, 0.5) and abs(m["val_f1"] - 2 / 3) < 1e-12


def test_label_smoothing_reaches_the_mil_branch_of_the_joint_loss():
    """Kraus' joint loss: the FC head's and the MIL layer's cross-entropies. Both must be
    trained towards the same (smoothed) targets."""
    import torch.nn.functional as F

    from rayscreen.models import create_model
    from rayscreen.train.step import classification_loss

    torch.manual_seed(0)
    model = create_model("milnet", in_channels=1, num_classes=3, trunk="small", pooling="max", fc_head=True)
    out = model.forward_maps(torch.rand(4, 1, 32, 32))
    labels = torch.tensor([0, 1, 2, 0])
    loss = classification_loss(model, out, labels, label_smoothing=0.2)
    expected = (F.cross_entropy(out["logits"].float(), labels, label_smoothing=0.2)
                + F.cross_entropy(out["mil_logits"].float(), labels, label_smoothing=0.2))
    torch.testing.assert_close(loss, expected)


def test_deterministic_cuda_sets_the_flags_that_make_gpu_kernels_repeatable(monkeypatch):
    """train.deterministic on a GPU: the data order alone does not make a run repeatable there
    (cuDNN's timed algorithm choice, atomics). Checked on the flags; no GPU here."""
    import os

    from rayscreen.train.loop import deterministic_cuda

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        deterministic_cuda()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_a_batch_of_one_field_is_left_out_of_a_batchnorm_model():
    """A torchvision ResNet trunk on 32 px crops ends in a 1 x 1 map: BatchNorm cannot train on
    one field there (torch raises), so the loop leaves such a batch out; a model without
    BatchNorm trains on it, and batches of two or more are always stepped on."""
    from rayscreen.models import create_model
    from rayscreen.train.step import has_batchnorm, trainable_batch

    torch.manual_seed(0)
    model = create_model("milnet", trunk="resnet18", in_channels=1, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    one, two = torch.rand(1, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        train_step(model, opt, one, torch.tensor([1]))
    assert np.isfinite(train_step(model, opt, two, torch.tensor([0, 1])))
    assert has_batchnorm(model) and not trainable_batch(1, True)
    assert trainable_batch(2, True) and trainable_batch(1, False)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert not has_batchnorm(plain)


# --------------------------------------------------------------------------- train.precise_bn


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                               torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2))


def test_recompute_batchnorm_averages_the_batch_statistics_under_the_current_weights():
    from rayscreen.train.step import recompute_batchnorm

    net = _bn_net()
    batches = [torch.randn(4, 1, 8, 8) * s + s for s in (1.0, 2.0, 3.0)]
    weights = [p.clone() for p in net.parameters()]
    bn = net[1]
    bn.running_mean.fill_(50.0)  # stale statistics, as after weights that moved
    net.eval()
    assert recompute_batchnorm(net, batches + [torch.randn(1, 1, 8, 8)]) == 12  # the 1-field batch left out
    with torch.no_grad():
        conv = [net[0](b) for b in batches]
    np.testing.assert_allclose(bn.running_mean, torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, torch.stack([c.var(dim=(0, 2, 3)) for c in conv]).mean(0), rtol=1e-5)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1 and not net.training
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))  # weights untouched
    # the point: fields of one distribution are normalised in eval mode as training mode
    # normalises them all together, where the stale statistics were far off
    same = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 + 3 for i in range(8)]
    whole = torch.cat(same)

    def eval_error():
        with torch.no_grad():  # train mode on a copy: its forward moves the running statistics
            train_out = copy.deepcopy(net).train()(whole)
            return float((net.eval()(whole) - train_out).abs().max())

    bn.running_mean.fill_(50.0)
    stale = eval_error()
    recompute_batchnorm(net, same)
    assert eval_error() < 0.05 * stale


def test_recompute_batchnorm_without_a_usable_batch_leaves_the_statistics():
    from rayscreen.train.step import recompute_batchnorm

    net = _bn_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recompute_batchnorm(net, [torch.randn(1, 1, 8, 8)]) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and net.training
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    assert recompute_batchnorm(no_bn, [torch.randn(4, 1, 8, 8)]) == 0


def test_precise_bn_settings_refused_by_key(tmp_path):
    from rayscreen.config import ConfigError, config_from_dict
    from rayscreen.train.plan import check_train_values

    base = {"plates": ["P.zarr"], "output": str(tmp_path)}
    with pytest.raises(ConfigError, match="train.precise_bn: -1; expected a number of training fields"):
        check_train_values(config_from_dict({**base, "train": {"precise_bn": -1}}))
    with pytest.raises(ConfigError, match="train.precise_bn: not with train.distill"):
        check_train_values(config_from_dict({**base, "train": {"precise_bn": 64, "distill": {"enabled": True}}}))
