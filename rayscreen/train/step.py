"""The training maths as pure torch functions, unit-tested on arrays (no Ray).

:mod:`.loop` wires them to Ray Train; the plain-PyTorch baseline of
``benchmarks/train.py`` calls the same functions.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugmentSection, TrainConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (the WSCNN paper's) or AdamW, from ``train.*``."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """``plateau``: lr x0.1 after 3 epochs without improvement of ``train.metric``;
    ``cosine``: cosine annealing over ``train.epochs``; ``none``: None. Stepped once per epoch."""
    if train.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=metric_mode(train.metric),
                                                          factor=0.1, patience=3)
    if train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, train.epochs))
    return None


def restore_scheduler(scheduler, state: dict, train: TrainConfig) -> None:
    """Load a checkpoint's scheduler ``state`` into ``scheduler`` (made by :func:`make_scheduler`
    for ``train``), after the optimiser's state has been loaded.

    ``train.epochs`` may change on resume (``plan.RESUMABLE``), but a cosine schedule's
    state holds the old ``T_max``: past it the lr would climb back up (cosine annealing is
    periodic). So ``T_max`` becomes the new epoch count and the lr is set to the closed form
    at the epochs done, continuing on the cosine of the new length (torch's recursive step
    from there follows that curve). ``plateau`` does not depend on the epoch count."""
    scheduler.load_state_dict(state)
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        return
    scheduler.T_max = max(1, train.epochs)
    done = min(scheduler.last_epoch, scheduler.T_max)  # past the end (fewer epochs now): the bottom
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * done / scheduler.T_max)) / 2
           for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def step_scheduler(scheduler, metric_value: float | None) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if metric_value is not None and math.isfinite(metric_value):
            scheduler.step(metric_value)
    else:
        scheduler.step()


def metric_mode(metric: str) -> str:
    """"min" for losses, "max" for every other metric."""
    return "min" if metric.endswith("loss") else "max"


def augment_config(section: AugmentSection, *, always: bool = False):
    """The stream's :class:`~rayscreen.stream.augment.AugmentConfig` for ``train.augment``,
    or None when it is off; ``always``: built even then (its bounds check every config)."""
    if not (section.enabled or always):
        return None
    from ..stream.augment import ANGLES, AugmentConfig

    scale = (1.0, 1.0) if section.scale is None else tuple(section.scale)
    return AugmentConfig(flips=section.flips, rot90=section.rot90,
                         angles=ANGLES if section.rotate else ((0.0, 0.0),),
                         translate=section.translate, scale=scale, intensity=section.intensity,
                         noise=section.noise)


def _crop_check(images: torch.Tensor, size: int) -> tuple[int, int, int]:
    """(B, H, W) of (B, C, H, W) ``images``, which must hold ``size`` x ``size`` crops."""
    b, _, h, w = images.shape
    if size > h or size > w:
        raise ValueError(f"train.crop {size} is larger than the fields ({h}, {w})")
    return b, h, w


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A (B, C, size, size) random crop of each image of (B, C, H, W); positions drawn on the CPU."""
    b, h, w = _crop_check(images, size)
    ys = torch.randint(0, h - size + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=generator).tolist()
    return torch.stack([images[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys, xs))])


def nucleus_crops(images: torch.Tensor, size: int, generator: torch.Generator, channel: int = 0,
                  jitter: int = 4) -> torch.Tensor:
    """A (B, C, size, size) crop of each image of (B, C, H, W) centred on one of its nuclei,
    drawn at random (:func:`~rayscreen.stream.cells.nucleus_centres` on channel ``channel``),
    moved by up to ``jitter`` px; an image without nuclei gets a random crop. A crop that
    would reach over the border is moved inside the field (cells at the edge sit off-centre)."""
    from ..stream.cells import nucleus_centres

    b, h, w = _crop_check(images, size)
    dna = images[:, channel].detach().float().cpu().numpy()
    crops = []
    for i in range(b):
        centres = nucleus_centres(dna[i])
        if len(centres):
            k = int(torch.randint(len(centres), (1,), generator=generator))
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
            y, x = int(centres[k][0]) + dy - size // 2, int(centres[k][1]) + dx - size // 2
        else:
            y, x = (int(torch.randint(0, n - size + 1, (1,), generator=generator)) for n in (h, w))
        y, x = min(max(y, 0), h - size), min(max(x, 0), w - size)
        crops.append(images[i, :, y:y + size, x:x + size])
    return torch.stack(crops)


def mixup(images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018): each image blended with another of the batch.

    images (B, C, H, W), labels (B,) class indices -> images (B, C, H, W) and soft targets
    (B, K): ``lam * x + (1 - lam) * x[perm]`` and the same mix of one-hot labels, with one
    ``lam ~ Beta(alpha, alpha)`` per batch and ``perm`` a random permutation, both drawn
    from ``generator`` (so a resumed epoch draws the same).
    """
    # torch's Beta has no generator argument: draw a seed from the generator for numpy's
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    one_hot = F.one_hot(labels, num_classes).to(images.dtype)
    return lam * images + (1 - lam) * images[perm], lam * one_hot + (1 - lam) * one_hot[perm]


def balance_repeats(counts: dict[int, int]) -> dict[int, int]:
    """Class-balanced sampling by repetition: each class's rows are repeated
    ``round(max_count / count)`` times per epoch, so every class contributes about as
    many rows as the largest. ``{0: 90, 1: 10} -> {0: 1, 1: 9}``."""
    top = max(counts.values())
    return {k: max(1, int(round(top / n))) if n else 1 for k, n in counts.items()}


def repeat_rows(batch: dict[str, np.ndarray], label_col: str, repeats: dict[int, int]) -> dict[str, np.ndarray]:
    """A batch of rows (dict of equal-length columns) with each row repeated by its class's factor."""
    n = np.array([repeats.get(int(k), 1) for k in batch[label_col]], dtype=np.int64)
    return {k: np.repeat(v, n, axis=0) for k, v in batch.items()}


def _autocast(device: torch.device, amp: bool):
    # bf16 needs no loss scaling; on CPU autocast would only slow the small models down
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               amp: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the model's logits (B, K) for ``labels`` (B,) class indices or
    (B, K) class probabilities (mixup), plus the model's auxiliary loss where it defines
    one (``model.aux_loss(logits, labels)``)."""
    with _autocast(images.device, amp):
        logits = model(images)
    return classification_loss(model, logits, labels, label_smoothing)


def classification_loss(model: torch.nn.Module, out: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the logits (B, K) (``out``, or ``out["logits"]`` of ``forward_maps``)
    plus ``model.aux_loss(out, labels, label_smoothing)`` where the model defines one (both
    heads trained towards the same targets)."""
    logits = out["logits"] if isinstance(out, dict) else out
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    aux = getattr(unwrap(model), "aux_loss", None)
    if callable(aux):
        extra = aux(out, labels, label_smoothing=label_smoothing)
        if extra is not None:
            loss = loss + extra
    return loss


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   grad_clip: float | None = None) -> None:
    """Backward, optional gradient clipping, step; a non-finite loss raises first."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}; lower train.lr or set train.grad_clip")
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (the model itself when it has none)."""
    return getattr(model, "module", model)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether ``model`` normalises by batch statistics (BatchNorm of any dimension, SyncBN)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor], amp: bool = False) -> int:
    """PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): every BatchNorm's
    running mean and variance replaced by the mean of its batch statistics over ``batches``
    (each (B, C, H, W), B >= 2) under the model's current weights; returns the fields seen.

    The running averages (momentum 0.1) mix statistics of the last ~10 steps' weights; when
    the weights move fast the eval-mode network, which is validated and exported, is not the
    one that was trained, and its accuracy jumps between epochs. Training itself is unchanged:
    in train mode BatchNorm normalises by each batch's own statistics. With no usable batch
    the statistics are left as they were. Batches count equally (torch's cumulative average).
    """
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    kept = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    n = 0
    try:
        for images in batches:
            if len(images) < 2:  # one field has no batch variance
                continue
            with _autocast(images.device, amp):
                model(images)
            n += len(images)
    finally:
        for m, (momentum, mean, var, count) in zip(norms, kept):
            m.momentum = momentum
            if n == 0:
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        model.train(was_training)
    return n


def trainable_batch(n_fields: int, batchnorm: bool) -> bool:
    """Whether a training batch of ``n_fields`` is stepped on. A batch of one field is left out
    of a BatchNorm model: a trunk whose last map is 1 x 1 (a torchvision ResNet on 32-63 px
    crops) cannot normalise one value per channel and raises, and otherwise one field would
    set 10% of the running statistics that are validated and exported. An epoch ends in such a
    batch when a rank's rows % batch_size == 1; Ray's equal split gives every rank the same
    rows, so every rank leaves out the same step and DDP stays in step."""
    return n_fields > 1 or not batchnorm


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, *, transform: Callable[[torch.Tensor, torch.Tensor],
                                                            tuple[torch.Tensor, torch.Tensor]] | None = None,
               grad_clip: float | None = None, amp: bool = False, label_smoothing: float = 0.0) -> float:
    """One optimisation step on a batch (B, C, H, W) with labels (B,); returns the loss.

    ``transform(images, labels) -> (images, labels)`` runs first (mosaics, crops,
    augmentation, mixup: it may turn the labels into (B, K) soft targets).
    """
    model.train()
    if transform is not None:
        images, labels = transform(images, labels)
    optimizer.zero_grad(set_to_none=True)
    loss = model_loss(model, images, labels, amp, label_smoothing)
    optimizer_step(loss, model, optimizer, grad_clip)
    return float(loss.detach())


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Every rank's buffers (BatchNorm running statistics) set to rank ``src``'s; a no-op
    without an initialised process group of two or more.

    Called on every rank before validation: only rank 0's model is checkpointed and
    exported, but each rank validates its own share of the wells. DDP copies rank 0's
    buffers only at the start of each forward, so after an epoch's last step each rank's
    statistics are those of its own batches, and a WS-DINO teacher (not wrapped in DDP) has
    its own all epoch; without this the metrics were not the exported model's."""
    import torch.distributed as dist

    if _world() < 2:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src)


@torch.no_grad()
def average_batchnorm(model: torch.nn.Module) -> None:
    """Every rank's BatchNorm running mean and variance set to their mean over the ranks (a
    collective: every rank calls it); a no-op without a process group of two or more. After
    :func:`recompute_batchnorm` on each rank's own fields, so the statistics that are
    validated and exported come from every rank's share of the epoch, not rank 0's alone."""
    import torch.distributed as dist

    world = _world()
    if world < 2:
        return
    for m in unwrap(model).modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer /= world


def every_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (a collective); ``flag`` itself on one rank."""
    import torch.distributed as dist

    if _world() < 2:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            amp: bool = False) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Class probabilities (N, K) and labels (N,) over batches of (images, labels), plus the
    summed cross-entropy and N (so workers' shards combine exactly)."""
    model = unwrap(model)  # no DDP collectives: ranks may see different numbers of batches
    model.eval()
    probs, ys, loss_sum, n = [], [], 0.0, 0
    for images, labels in batches:
        with _autocast(images.device, amp):
            logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        ys.append(labels.cpu().numpy())
    if probs:
        return np.concatenate(probs), np.concatenate(ys), loss_sum, n
    return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), 0.0, 0


def classification_metrics(labels: np.ndarray, probs: np.ndarray, loss_sum: float | None = None,
                           prefix: str = "val_") -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, precision, recall, F1 and ROC-AUC.

    ``labels`` (N,) class indices, ``probs`` (N, K). Binary (K = 2): precision/recall/F1 of
    class 1 and the ROC-AUC of its probability; multiclass: macro averages and one-vs-rest
    macro ROC-AUC. A metric that is undefined (one class present) is NaN.
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels)
    probs = np.asarray(probs)
    n, k = probs.shape if probs.ndim == 2 else (0, 0)
    out = {f"{prefix}loss": (loss_sum / n) if (loss_sum is not None and n) else float("nan")}
    if n == 0:
        for name in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc"):
            out[prefix + name] = float("nan")
        return out
    pred = probs.argmax(axis=1)
    # binary: of class 1, NaN where undefined (no class-1 well, or none predicted), as the
    # docstring says; multiclass: macro over the classes present in labels or predictions
    # (sklearn's default): a class absent from validation (one of two wells went to test) is
    # no class the model got wrong
    kw = dict(average="binary", zero_division=np.nan) if k == 2 else dict(average="macro", zero_division=0)
    out[f"{prefix}accuracy"] = float(skm.accuracy_score(labels, pred))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out[f"{prefix}balanced_accuracy"] = float(skm.balanced_accuracy_score(labels, pred))
    out[f"{prefix}precision"] = float(skm.precision_score(labels, pred, **kw))
    out[f"{prefix}recall"] = float(skm.recall_score(labels, pred, **kw))
    out[f"{prefix}f1"] = float(skm.f1_score(labels, pred, **kw))
    present = np.unique(labels)
    if len(present) < 2:
        out[f"{prefix}roc_auc"] = float("nan")
    elif k == 2:
        out[f"{prefix}roc_auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
    else:
        # one-vs-rest over the classes present (sklearn needs every column's class present)
        p = probs[:, present]
        p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
        out[f"{prefix}roc_auc"] = float(skm.roc_auc_score(labels, p, multi_class="ovr", labels=present)) \
            if len(present) > 2 else float(skm.roc_auc_score(labels == present[1], p[:, 1]))
    return out
