"""WS-DINO: self-distillation with weak labels, as pure torch (no Ray).

DINO (Caron et al. 2021) trains a student network to match, on every view of an image,
the output of a teacher (an exponential moving average of the student) on the other
global views; a running centre and a low teacher temperature keep the output from
collapsing. WS-DINO (Cross-Zamirski et al. 2022) takes the views from *different* images
that share a weak label (treatment or compound): what the network must become
invariant to is then everything that differs between fields of one compound (the
plate, the well, the cells in view), which is what a profile should ignore. The paper
fine-tunes a ViT; here the student is a class-map network (:class:`~rayscreen.models.
wscnn.ClassMapNet`) whose pooled trunk output (the profile) feeds a small projection
head, optionally with the weak-label cross-entropy beside it (``train.distill.classify``).

Shapes: B fields per batch, C channels, K classes, D profile features, P prototypes.
:mod:`.loop` wires this to Ray Train; every function here is unit-tested on tensors.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DistillSection
from .step import _autocast, classification_loss, has_batchnorm, optimizer_step, random_crops, unwrap


class ProjectionHead(nn.Module):
    """DINO's head: features (B, D) -> MLP -> L2-normalised bottleneck -> cosine to P
    prototypes (B, P).

    ``batch_norm`` (DINO's ``use_bn_in_head``, on by default here): the globally pooled
    features of a small CNN differ little between fields, and without it the projections
    of all fields became one (mean cosine 0.86 -> 0.995 in 100 steps on the synthetic MOA
    screen) and the loss went to log P, the uniform collapse; with it they stayed apart
    (cosine 0.3-0.5). Measured with teacher_temp 0.02; at DINO's 0.04 both collapsed.

    The cosine to unit-norm prototypes is DINO's weight-normalised last layer with its
    norm fixed at 1, written out because torch's ``weight_norm`` parametrisation would
    train that norm too.
    """

    def __init__(self, in_dim: int, out_dim: int = 256, hidden: int = 512, bottleneck: int = 128,
                 batch_norm: bool = True):
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Linear(i, o), *([nn.BatchNorm1d(o)] if batch_norm else []), nn.GELU()]

        self.mlp = nn.Sequential(*block(in_dim, hidden), *block(hidden, hidden), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cosines in float32 even under autocast: bf16 resolves ~0.004 near 1, which the
        # teacher's division by its low temperature (0.01) would blow up to ~0.4 logits
        z = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(F.normalize(z.float(), dim=-1), F.normalize(self.prototypes.float(), dim=-1))


class DistillNet(nn.Module):
    """A class-map net and its projection head in one ``forward``, so DDP sees a single
    forward per step however many views there are (as DINO's multi-crop wrapper)."""

    def __init__(self, net: nn.Module, head: ProjectionHead):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None):
        """global_views (G, C, H, W), local_views (L, C, h, w) or None -> (the net's
        ``forward_maps`` dict of the global views (``logits`` (G, K), ...), projections
        of the global views (G, P), of the local views (L, P) or None)."""
        out = self.net.forward_maps(global_views)
        if local_views is None:
            return out, self.head(out["features"]), None
        # one head pass over all views, as DINO: its batch norm sees every view together
        # (and never a batch of one local view)
        g = global_views.shape[0]
        proj = self.head(torch.cat([out["features"], self.net.features(local_views)]))
        return out, proj[:g], proj[g:]


def sync_batchnorm(student: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The student with every BatchNorm a SyncBatchNorm (DINO does this to the student and
    the teacher, its copy), so that with several GPU workers the statistics are those of
    the whole global batch: per-GPU batches of a few fields give noisy statistics, and the
    teacher's centring and sharpening act on outputs that they shift. torch's SyncBatchNorm
    runs on CUDA only, and one worker has nothing to synchronise: there (and for a net
    without BatchNorm) the student is returned unchanged."""
    if torch.device(device).type != "cuda" or world_size < 2 or not has_batchnorm(student):
        return student
    return nn.SyncBatchNorm.convert_sync_batchnorm(student)


def make_teacher(student: DistillNet) -> DistillNet:
    """A copy of the student that is never trained by gradients (only by :func:`ema_update`)."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    The teacher's BatchNorm statistics are its own (it runs in training mode on the
    global views), as in DINO.
    """
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)


def same_label_partners(labels: torch.Tensor, generator: torch.Generator,
                        pool_labels: torch.Tensor | None = None) -> torch.Tensor:
    """For each field of a batch, another field of the same label, drawn uniformly.

    labels (B,), pool_labels (N,) (default: ``labels``) of a pool whose first B fields are
    the batch -> indices (B,) into the pool, ``partner[i] != i`` and
    ``pool_labels[partner[i]] == labels[i]``; a field whose label has no other member in
    the pool is its own partner (its views then come from itself, as in plain DINO).
    """
    lab = labels.detach().cpu()
    pool = lab if pool_labels is None else pool_labels.detach().cpu()
    b = len(lab)
    same = lab[:, None] == pool[None, :]
    same[torch.arange(b), torch.arange(b)] = False
    alone = ~same.any(dim=1)
    same[alone, alone.nonzero().flatten()] = True
    return torch.multinomial(same.float(), 1, generator=generator).flatten().to(labels.device)


def teacher_targets(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """The teacher's centred, sharpened outputs: softmax((teacher - center) / teacher_temp)
    over the last dim, detached; teacher (..., P), center (P,)."""
    return F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                 student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's cross-entropy between the teacher's centred, sharpened outputs and the student's.

    student (V, B, P): the student's outputs on V views (the T global views first);
    teacher (T, B, P): the teacher's on the global views; center (P,). Each teacher view
    is matched with every student view but its own; the mean over those pairs and the
    batch.
    """
    t_views, s_views = teacher.shape[0], student.shape[0]
    if t_views * s_views - min(t_views, s_views) < 1:
        raise ValueError(f"distill_loss: {s_views} student and {t_views} teacher views; "
                         "at least one pair of different views is needed")
    targets = teacher_targets(teacher, center, teacher_temp)
    log_probs = F.log_softmax(student / student_temp, dim=-1)
    total, pairs = student.new_zeros(()), 0
    for t in range(t_views):
        for v in range(student.shape[0]):
            if v == t:
                continue
            total = total + (-targets[t] * log_probs[v]).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """The running centre: momentum * center + (1 - momentum) * the teacher's mean output
    (over views, batch and, under DDP, every worker). teacher (T, B, P), center (P,)."""
    batch = teacher.float().mean(dim=(0, 1))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch)
        batch /= dist.get_world_size()
    return center * momentum + batch * (1.0 - momentum)


def make_views(images: torch.Tensor, labels: torch.Tensor, cfg: DistillSection, crop: int | None,
               generator: torch.Generator, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
               bank: "FieldBank | None" = None):
    """The views of a batch (B, C, H, W) with labels (B,).

    Global view 1 is a ``crop`` px crop of each field (the whole field without crop),
    global view 2 one of its partner (:func:`same_label_partners` under
    ``pair_by: label``, drawn from the batch and the fields of earlier batches that
    ``bank`` holds; itself under ``pair_by: image``), each local view a ``cfg.local_crop``
    px crop of a partner drawn afresh. Every view is augmented independently. Returns
    global views (2B, C, g, g), local views (nB, C, l, l) or None, and the labels of the
    global views (2B,).
    """
    b = images.shape[0]
    pool, pool_labels = bank.pool(images, labels) if bank is not None else (images, labels)

    def partners() -> torch.Tensor:
        if cfg.pair_by == "image":
            return torch.arange(b, device=images.device)
        return same_label_partners(labels, generator, pool_labels)

    def view(index: torch.Tensor, size: int | None) -> torch.Tensor:
        out = pool[index]
        if size is not None:
            out = random_crops(out, size, generator)
        return augment(out) if augment is not None else out

    p = partners()
    global_views = torch.cat([view(torch.arange(b, device=images.device), crop), view(p, crop)])
    local_views = None
    if cfg.local_crops > 0:
        local_views = torch.cat([view(partners(), cfg.local_crop) for _ in range(cfg.local_crops)])
    return global_views, local_views, torch.cat([labels, pool_labels[p]])


class FieldBank:
    """The last ``size`` fields seen of each label, as extra partners for the next batches.

    Why: a batch holds few fields of each label (16 fields, 13 compounds: most are alone),
    and class-balanced repetition puts copies of one field side by side, so partners
    drawn from the batch alone are mostly the field itself, which is plain DINO. Memory:
    labels x size fields (the config check bounds it). Not checkpointed: a resumed run
    refills it within a few batches.
    """

    def __init__(self, size: int):
        self.size = size
        self._fields: dict[int, list[torch.Tensor]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._fields.values())

    def pool(self, images: torch.Tensor, labels: torch.Tensor) -> tuple["FieldPool", torch.Tensor]:
        """The batch (B, C, H, W) followed by the held fields, as a :class:`FieldPool` of
        B + N fields, and their labels (B + N,)."""
        held = [(k, f) for k, fields in self._fields.items() for f in fields if f.shape == images.shape[1:]]
        pool_labels = torch.cat([labels, torch.tensor([k for k, _ in held], dtype=labels.dtype,
                                                      device=labels.device)])
        return FieldPool(images, [f for _, f in held]), pool_labels

    def remember(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        for image, label in zip(images.detach(), labels.tolist()):
            fields = self._fields.setdefault(int(label), [])
            # a copy: a slice of the batch would keep the whole batch's storage alive
            fields.append(image.clone())
            del fields[:-self.size]


class FieldPool:
    """A batch (B, C, H, W) followed by N held fields, indexed like one (B + N, C, H, W)
    tensor; only the fields indexed are gathered (stacking the whole bank every step would
    copy all of it, several times the memory the config check allows)."""

    def __init__(self, images: torch.Tensor, held: list[torch.Tensor]):
        self.images, self.held = images, held

    def __len__(self) -> int:
        return self.images.shape[0] + len(self.held)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """index (K,) -> (K, C, H, W) on the batch's device."""
        b = self.images.shape[0]
        if not self.held or bool((index < b).all()):
            return self.images[index]
        return torch.stack([self.images[i] if i < b else self.held[i - b].to(self.images.device)
                            for i in index.tolist()])


class Distiller:
    """The training state of WS-DINO besides the student: its teacher and the running centre.

    ``student`` is the :class:`DistillNet` the optimiser trains (DDP-wrapped or not).
    """

    def __init__(self, student: nn.Module, cfg: DistillSection):
        self.cfg = cfg
        inner = unwrap(student)
        self.teacher = make_teacher(inner)
        self.center = torch.zeros(cfg.out_dim, device=next(inner.parameters()).device)
        self.bank = FieldBank(cfg.bank) if cfg.bank > 0 and cfg.pair_by == "label" else None

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"teacher": self.teacher.state_dict(), "center": {"center": self.center.detach().cpu()}}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.center = state["center"]["center"].to(self.center.device)


@torch.no_grad()
def teacher_entropies(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> tuple[float, float]:
    """(mean entropy of the teacher's targets per field and view, entropy of their mean over
    the batch), in nats, of teacher (T, B, P). DINO's two ways to collapse show here: every
    output uniform (the first near log P) or one prototype for all fields (the second near 0)."""
    p = teacher_targets(teacher, center, teacher_temp)
    per_field = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()
    mean = p.mean(dim=(0, 1))
    return float(per_field), float(-(mean * torch.log(mean.clamp_min(1e-12))).sum())


def collapse(entropy: float, batch_entropy: float, out_dim: int) -> str | None:
    """"uniform" or "one prototype" when the teacher's entropies (:func:`teacher_entropies`)
    show a collapse, else None. The bounds are far from a learning teacher's: on the
    synthetic screens it sat at 0.6-1.7 nats per field and 1.4-3.4 over the batch, of
    log 256 = 5.5 (docs/results.md)."""
    if entropy > 0.95 * math.log(out_dim):
        return "uniform"
    if batch_entropy < 0.05 * math.log(out_dim):
        return "one prototype"
    return None


class DistillStats(NamedTuple):
    """What :func:`distill_step` reports: the total and self-distillation losses and the
    teacher's entropies (:func:`teacher_entropies`)."""

    loss: float
    distill_loss: float
    teacher_entropy: float
    teacher_batch_entropy: float


def distill_step(student: nn.Module, distiller: Distiller, optimizer: torch.optim.Optimizer,
                 images: torch.Tensor, labels: torch.Tensor, *,
                 views: Callable[[torch.Tensor, torch.Tensor, FieldBank | None], tuple], grad_clip: float | None = None,
                 label_smoothing: float = 0.0, amp: bool = False) -> DistillStats:
    """One WS-DINO step on a batch (B, C, H, W), labels (B,): views, student and teacher
    forward, ``weight * distill_loss + classify * cross-entropy``, backward, optimiser step,
    teacher EMA and centre update."""
    cfg = distiller.cfg
    student.train()
    distiller.teacher.train()
    global_views, local_views, view_labels = views(images, labels, distiller.bank)
    optimizer.zero_grad(set_to_none=True)
    with _autocast(images.device, amp):
        out, s_global, s_local = student(global_views, local_views)
        with torch.no_grad():
            _, t_global, _ = distiller.teacher(global_views)
    b = images.shape[0]
    s_views = [s_global[:b], s_global[b:]] + (list(s_local.float().split(b)) if s_local is not None else [])
    teacher_out = t_global.float().reshape(2, b, -1)
    d_loss = distill_loss(torch.stack([v.float() for v in s_views]), teacher_out, distiller.center,
                          cfg.student_temp, cfg.teacher_temp)
    entropy, batch_entropy = teacher_entropies(teacher_out, distiller.center, cfg.teacher_temp)
    loss = cfg.weight * d_loss
    if cfg.classify > 0:
        net = unwrap(student).net
        loss = loss + cfg.classify * classification_loss(net, out, view_labels, label_smoothing)
    optimizer_step(loss, student, optimizer, grad_clip)
    ema_update(distiller.teacher, unwrap(student), cfg.momentum)
    distiller.center = update_center(distiller.center, teacher_out, cfg.center_momentum)
    if distiller.bank is not None:
        distiller.bank.remember(images, labels)
    return DistillStats(float(loss.detach()), float(d_loss.detach()), entropy, batch_entropy)
