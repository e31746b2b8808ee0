"""WS-DINO maths (rayscreen.train.distill) on small tensors, no Ray."""

import math

import pytest
import torch

from rayscreen.config import DistillSection, TrainConfig
from rayscreen.models import create_model
from rayscreen.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from rayscreen.train.distill import (DistillNet, Distiller, FieldBank, ProjectionHead, collapse, distill_loss,
                                     distill_step, ema_update, make_views, same_label_partners, sync_batchnorm,
                                     teacher_entropies, update_center)


def test_partners_share_the_label_and_are_other_fields_when_the_batch_has_them():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        p = same_label_partners(labels, g)
        assert torch.equal(labels[p], labels)
        assert p[3] == 3  # label 2 has one field: its own partner
        assert all(int(p[i]) != i for i in (0, 1, 2, 4, 5))
        seen.add(int(p[0]))
    assert seen == {2, 5}  # both other fields of label 0 are drawn


def test_the_bank_keeps_the_last_fields_of_each_label_and_lends_them_as_partners():
    bank = FieldBank(2)
    for value, label in [(10, 0), (11, 0), (12, 0), (20, 1)]:
        bank.remember(torch.full((1, 1, 4, 4), float(value)), torch.tensor([label]))
    assert len(bank) == 3  # label 0 holds its last two fields
    images, labels = torch.zeros(2, 1, 4, 4), torch.tensor([0, 2])
    pool, pool_labels = bank.pool(images, labels)
    assert pool_labels.tolist() == [0, 2, 0, 0, 1] and len(pool) == 5
    assert pool[torch.tensor([2, 3, 4, 1])][:, 0, 0, 0].tolist() == [11.0, 12.0, 20.0, 0.0]
    g = torch.Generator().manual_seed(0)
    cfg = DistillSection(enabled=True, local_crops=0)
    global_views, _, view_labels = make_views(images, labels, cfg, None, g, bank=bank)
    # field 0 (label 0, alone in its batch) takes its partner from the bank; label 2 has none
    assert float(global_views[2, 0, 0, 0]) in (11.0, 12.0) and float(global_views[3, 0, 0, 0]) == 0.0
    assert view_labels.tolist() == [0, 2, 0, 2]
    empty, empty_labels = FieldBank(2).pool(images, labels)
    assert len(empty) == 2 and torch.equal(empty_labels, labels)  # empty: the batch alone
    # a held field is a copy: it does not pin the batch it came from
    batch = torch.zeros(8, 1, 4, 4)
    bank.remember(batch[:1], torch.tensor([3]))
    assert bank._fields[3][0].untyped_storage().size() == 16 * 4


def test_distill_loss_by_hand():
    # two prototypes, one field, two global views; teacher temp 1 and centre 0: plain softmaxes
    teacher = torch.tensor([[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]])  # softmax [.25, .75], [.75, .25]
    student = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]], [[0.0, 0.0]]])  # 3 views
    loss = distill_loss(student, teacher, torch.zeros(2), student_temp=1.0, teacher_temp=1.0)
    h_uniform = math.log(2.0)
    ce = lambda t, s: -sum(a * math.log(b) for a, b in zip(t, s))  # noqa: E731
    pairs = [
        ce([0.25, 0.75], [0.25, 0.75]),  # teacher view 0 vs student view 1
        h_uniform,  # teacher view 0 vs student view 2 (uniform): cross-entropy log 2
        h_uniform,  # teacher view 1 vs student view 0
        h_uniform,  # teacher view 1 vs student view 2
    ]
    assert float(loss) == pytest.approx(sum(pairs) / 4, rel=1e-6)
    # the centre is subtracted before the teacher's softmax: centring view 0's logits makes it uniform
    centred = distill_loss(student[:2], teacher[:1], torch.tensor([0.0, math.log(3.0)]), 1.0, 1.0)
    assert float(centred) == pytest.approx(ce([0.5, 0.5], [0.25, 0.75]), rel=1e-6)
    with pytest.raises(ValueError, match="pair of different views"):
        distill_loss(student[:1], teacher[:1], torch.zeros(2))


def test_low_teacher_temperature_sharpens_the_target():
    teacher = torch.tensor([[[0.0, 0.5]], [[0.0, 0.5]]])
    student = torch.tensor([[[0.0, 0.0]], [[5.0, 0.0]]])  # view 1 points at prototype 0
    soft = distill_loss(student, teacher, torch.zeros(2), 1.0, 1.0)
    sharp = distill_loss(student, teacher, torch.zeros(2), 1.0, 0.01)  # target ~ one-hot prototype 1
    assert float(sharp) > float(soft)


def test_ema_and_center_updates():
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update(teacher, student, 0.5)
    for a, b, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(b, (a + s) / 2)
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(b, s) for b, s in zip(teacher.parameters(), student.parameters()))
    out = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]])  # mean over views and batch: [2, 4]
    torch.testing.assert_close(update_center(torch.zeros(2), out, 0.9), torch.tensor([0.2, 0.4]))


def test_views_come_from_fields_of_the_same_label():
    b = 6
    # field i is the constant i: a crop tells which field it came from
    images = torch.arange(b, dtype=torch.float32)[:, None, None, None].expand(b, 2, 32, 32).contiguous()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    cfg = DistillSection(enabled=True, local_crops=3, local_crop=8)
    g = torch.Generator().manual_seed(1)
    global_views, local_views, view_labels = make_views(images, labels, cfg, 16, g)
    assert global_views.shape == (2 * b, 2, 16, 16) and local_views.shape == (3 * b, 2, 8, 8)
    source = global_views[:, 0, 0, 0].long()
    assert torch.equal(source[:b], torch.arange(b))  # view 1: the field itself
    assert torch.equal(source[b:], torch.tensor([1, 0, 3, 2, 5, 4]))  # view 2: the other field of its label
    assert torch.equal(view_labels, torch.cat([labels, labels]))
    local_source = local_views[:, 0, 0, 0].long().reshape(3, b)
    assert torch.equal(labels[local_source], labels.expand(3, b))
    # pair_by image: plain DINO, every view from the field itself
    plain = DistillSection(enabled=True, pair_by="image", local_crops=0)
    g_views, l_views, _ = make_views(images, labels, plain, None, g)
    assert l_views is None and torch.equal(g_views[:, 0, 0, 0].long(), torch.arange(b).repeat(2))


def test_projection_head_gives_cosines_to_the_prototypes():
    head = ProjectionHead(16, out_dim=32, hidden=8, bottleneck=4)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32) and out.abs().max() <= 1.0 + 1e-6


def _distill_setup(**cfg):
    torch.manual_seed(0)
    net = create_model("milnet", in_channels=2, num_classes=2, pooling="mean", width=0.25)
    dc = DistillSection(enabled=True, out_dim=16, hidden=16, bottleneck=8, local_crop=8, local_crops=2, **cfg)
    student = DistillNet(net, ProjectionHead(net.feature_dim, dc.out_dim, dc.hidden, dc.bottleneck))
    return student, Distiller(student, dc), torch.optim.AdamW(student.parameters(), lr=0.01), dc


def toy_batch(n=16, seed=0):
    """Label 1: a bright square in channel 0; label 0: in channel 1; both under a random gain
    per field (the 'plate effect' views of one label must agree across)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 24, 24, generator=g) * 0.1
    y = torch.arange(n) % 2
    for i in range(n):
        r, c = torch.randint(0, 16, (2,), generator=g).tolist()
        x[i, 1 - int(y[i]), r:r + 8, c:c + 8] += 1.0
    return x * torch.exp(torch.randn(n, 1, 1, 1, generator=g) * 0.5), y


def views(dc, g):
    return lambda images, labels, bank: make_views(images, labels, dc, 16, g, bank=bank)


def test_distill_step_trains_the_student_moves_teacher_and_centre():
    student, distiller, opt, dc = _distill_setup(momentum=0.9)  # 30 steps: a teacher that follows faster
    x, y = toy_batch()
    g = torch.Generator().manual_seed(0)
    teacher_before = [p.clone() for p in distiller.teacher.parameters()]
    for _ in range(30):
        total, d, entropy, batch_entropy = distill_step(student, distiller, opt, x, y, views=views(dc, g))
        assert math.isfinite(total) and math.isfinite(d) and total >= d  # + the classification term
        assert 0 <= entropy <= batch_entropy + 1e-6 <= math.log(dc.out_dim) + 1e-6  # H(mean) >= mean H
    assert not all(torch.equal(a, b) for a, b in zip(teacher_before, distiller.teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student.parameters(), distiller.teacher.parameters()))
    assert distiller.center.abs().sum() > 0
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    # the teacher's class head learned the labels too (an EMA of the student's): it is what is exported
    with torch.no_grad():
        distiller.teacher.net.eval()
        acc = (distiller.teacher.net(x).argmax(1) == y).float().mean()
    assert acc >= 0.9


def test_pure_self_distillation_leaves_the_class_head_alone():
    student, distiller, opt, dc = _distill_setup(classify=0.0)
    head_before = student.net.head.weight.clone()
    x, y = toy_batch()
    g = torch.Generator().manual_seed(0)
    distill_step(student, distiller, opt, x, y, views=views(dc, g))
    assert torch.equal(student.net.head.weight, head_before)
    trunks = zip(student.net.trunk.parameters(), distiller.teacher.net.trunk.parameters())
    assert any(not torch.equal(a, b) for a, b in trunks)


def test_sync_batchnorm_only_for_several_cuda_workers_and_keeps_the_state_dict_keys():
    """The conversion itself (torch's SyncBatchNorm *runs* on CUDA only: a multi-GPU run is
    needed to exercise it, and none was available here)."""
    student, _, _, _ = _distill_setup()
    n_bn = sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in student.modules())
    assert n_bn > 0  # the trunk's and the projection head's
    for device, world in (("cpu", 4), ("cuda", 1)):
        assert sync_batchnorm(student, torch.device(device), world) is student
    synced = sync_batchnorm(student, torch.device("cuda", 0), 2)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in synced.modules())
    assert synced.state_dict().keys() == student.state_dict().keys()  # checkpoints and exports load either way
    # the teacher is copied from the converted student, so it synchronises too
    teacher = Distiller(synced, DistillSection(enabled=True)).teacher
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in teacher.modules())


def test_distill_state_round_trips_through_a_checkpoint(tmp_path):
    student, distiller, opt, dc = _distill_setup()
    x, y = toy_batch()
    g = torch.Generator().manual_seed(0)
    distill_step(student, distiller, opt, x, y, views=views(dc, g))
    save_checkpoint(str(tmp_path), TrainState(epoch=1), distiller.teacher.net.state_dict(),
                    extra={"student": student.state_dict(), **distiller.state_dict()})
    loaded = load_checkpoint(str(tmp_path))
    student2, distiller2, _, _ = _distill_setup()
    student2.load_state_dict(loaded["extra"]["student"])
    distiller2.load_state_dict(loaded["extra"])
    assert torch.equal(distiller2.center, distiller.center)
    for a, b in zip(distiller2.teacher.state_dict().values(), distiller.teacher.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(student2.state_dict().values(), student.state_dict().values()):
        assert torch.equal(a, b)
    assert set(loaded["model"]) == set(student.net.state_dict())  # the exported net, as an artefact loads it


@pytest.mark.parametrize("train,match", [
    ({"mixup": 0.2}, "train.mixup"),
    ({"distill": {"weight": 0.0, "classify": 0.0}}, "not both 0"),
    ({"distill": {"teacher_temp": 0.0}}, "teacher_temp"),
    ({"distill": {"momentum": 1.0}}, "train.distill.momentum"),
    ({"distill": {"local_crop": 64}, "crop": 48}, "train.distill.local_crop"),
    ({"distill": {"classify": 0.0}}, "train.metric"),
    ({"distill": {"out_dim": 1}}, "out_dim"),
    ({"distill": {"bank": -1}}, "train.distill.bank"),
])
def test_bad_distill_settings_name_their_key(train, match):
    from rayscreen.config import ConfigError, config_from_dict
    from rayscreen.train.plan import _check_distill

    distill = {"enabled": True, **train.pop("distill", {})}
    config = config_from_dict({"plates": ["x.zarr"], "output": "out", "train": {"distill": distill, **train}})
    with pytest.raises(ConfigError, match=match):
        _check_distill(config.train)
    assert isinstance(config.train, TrainConfig)


def test_good_distill_settings_pass():
    from rayscreen.config import config_from_dict
    from rayscreen.train.plan import _check_distill

    config = config_from_dict({"plates": ["x.zarr"], "output": "out",
                               "train": {"crop": 48, "metric": "train_loss",
                                         "distill": {"enabled": True, "classify": 0.0}}})
    _check_distill(config.train)


def test_the_head_projects_in_float32_under_autocast_and_takes_a_single_local_view():
    """Cosines / 0.01 need float32 (bf16 resolves ~0.004 near 1); one field with one local
    view must not give the head's batch norm a batch of one."""
    head = ProjectionHead(16, out_dim=8, hidden=16, bottleneck=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.Linear(8, 16)(torch.randn(4, 8))
        assert x.dtype == torch.bfloat16 and head(x).dtype == torch.float32
    trunk = create_model("milnet", in_channels=1, num_classes=2, width=[4, 4, 4])
    net = DistillNet(trunk, ProjectionHead(trunk.feature_dim, out_dim=8, hidden=16, bottleneck=4))
    out, g, loc = net.train()(torch.randn(2, 1, 24, 24), torch.randn(1, 1, 16, 16))
    assert g.shape == (2, 8) and loc.shape == (1, 8) and out["logits"].shape == (2, 2)


def test_teacher_entropies_tell_the_two_collapses_from_a_learning_teacher():
    p = 8
    uniform = torch.zeros(2, 4, p)  # every output the same flat vector
    h, hb = teacher_entropies(uniform, torch.zeros(p), teacher_temp=1.0)
    assert h == pytest.approx(math.log(p)) and hb == pytest.approx(math.log(p))
    assert collapse(h, hb, p) == "uniform"
    one = torch.zeros(2, 4, p)
    one[..., 3] = 10.0  # every field on prototype 3
    h, hb = teacher_entropies(one, torch.zeros(p), teacher_temp=0.1)
    assert h < 1e-6 and hb < 1e-6 and collapse(h, hb, p) == "one prototype"
    # the centre is subtracted first: centring a one-prototype output makes it flat
    assert teacher_entropies(one, one[0, 0], teacher_temp=0.1)[0] == pytest.approx(math.log(p))
    sharp = torch.zeros(2, 4, p)
    sharp[:, torch.arange(4), torch.arange(4)] = 10.0  # each field its own prototype
    h, hb = teacher_entropies(sharp, torch.zeros(p), teacher_temp=0.1)
    assert h < 1e-6 and hb == pytest.approx(math.log(4)) and collapse(h, hb, p) is None
