"""The GPU paths against the CPU: each test runs the same step on the same inputs on both
devices and asks for the same answer (bf16 autocast and TF32 within their precision).

Skipped without CUDA (CI has none). ``RAYSCREEN_TEST_DEVICE=cpu`` runs them CPU against
CPU, a dry run of the test code itself on a machine without a GPU (the agreement is then
trivially exact; only the GPU run checks the kernels).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from rayscreen.config import config_from_dict
from rayscreen.models import create_model

DEVICE = os.environ.get("RAYSCREEN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU here")


def _config(tmp_path, **train):
    return config_from_dict({"plates": ["P.zarr"], "output": str(tmp_path / "out"), "train": train})


def _fields(n=8, c=2, y=64, x=96, seed=0):
    """(n, c, y, x) float32 fields: dim noise with a bright blob on odd fields (label 1)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, c, y, x, generator=g) * 0.2
    labels = torch.arange(n) % 2
    for i in range(1, n, 2):
        r, col = torch.randint(8, y - 16, (1,), generator=g).item(), torch.randint(8, x - 16, (1,), generator=g).item()
        images[i, :, r:r + 8, col:col + 8] += 0.8
    return images, labels


def _twins(name="wscnn", **kwargs):
    """The same initial model twice: one for the CPU, one for DEVICE."""
    torch.manual_seed(0)
    cpu = create_model(name, **kwargs)
    dev = create_model(name, **kwargs)
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev.to(DEVICE)


def test_train_steps_under_bf16_autocast_follow_the_fp32_cpu_steps():
    """``train.amp`` (bf16 autocast, the default on GPU): the same SGD steps on the same batch
    give losses within bf16 precision of the fp32 CPU run, and both learn."""
    from rayscreen.train.step import train_step

    cpu, dev = _twins(in_channels=2, num_classes=2, width=0.25)
    x, y = _fields()
    losses = {}
    for model, device, amp in ((cpu, "cpu", False), (dev, DEVICE, True)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        losses[device] = [train_step(model, opt, x.to(device), y.to(device), amp=amp) for _ in range(8)]
    a, b = np.array(losses["cpu"]), np.array(losses[DEVICE])
    assert np.isfinite(b).all()
    assert b[-1] < b[0] and a[-1] < a[0]
    np.testing.assert_allclose(b[0], a[0], rtol=0.03)  # the first loss: same weights, bf16 forward
    np.testing.assert_allclose(b, a, rtol=0.15, atol=0.02)  # later: rounding compounds over steps


def test_the_training_transforms_run_on_device_tensors_with_their_cpu_generators(tmp_path):
    """Mosaics, nucleus crops, augmentation and mixup draw from CPU generators (seeded per
    rank and epoch) while the batch lives on the GPU: the draws, hence the outputs, are the
    CPU's."""
    from rayscreen.train.loop import make_transform

    x, y = _fields(n=8, c=2, y=96, x=96)
    config = _config(tmp_path, crop=48, crop_centre="nuclei", mixup=0.4,
                     augment={"mosaic": True, "scale": [0.9, 1.1], "intensity": 0.1, "noise": 0.01})
    outs = {}
    for device in ("cpu", DEVICE):
        images, labels = make_transform(config, rank=0, epoch=3, num_classes=2, channels=["DNA", "Actin"])(
            x.to(device), y.to(device))
        assert images.device.type == torch.device(device).type and labels.device.type == images.device.type
        outs[device] = (images.cpu(), labels.cpu())
    assert outs["cpu"][0].shape == outs[DEVICE][0].shape
    np.testing.assert_allclose(outs[DEVICE][1], outs["cpu"][1], atol=1e-6)  # mixup's soft labels
    # grid_sample interpolates in the device's float arithmetic: nearly every pixel equal
    close = np.isclose(outs[DEVICE][0].numpy(), outs["cpu"][0].numpy(), atol=1e-3)
    assert close.mean() > 0.99


def test_a_ws_dino_step_on_device_matches_the_cpu(tmp_path):
    """WS-DINO views (CPU generator, device batch), student/teacher forward under autocast,
    EMA and centre update: finite and close to the fp32 CPU step."""
    import copy

    from rayscreen.train.distill import DistillNet, Distiller, ProjectionHead, distill_step
    from rayscreen.train.loop import make_view_fn

    config = _config(tmp_path, crop=48, distill={"enabled": True, "out_dim": 32, "hidden": 64, "bottleneck": 16,
                                                  "local_crops": 2, "local_crop": 24})
    dc = config.train.distill
    torch.manual_seed(0)
    net = create_model("milnet", in_channels=2, num_classes=2, pooling="mean", width=0.25)
    initial = DistillNet(net, ProjectionHead(net.feature_dim, dc.out_dim, dc.hidden, dc.bottleneck))
    x, y = _fields(n=8, c=2, y=64, x=64)
    stats = {}
    for device, amp in (("cpu", False), (DEVICE, True)):
        student = copy.deepcopy(initial).to(device)
        distiller = Distiller(student, dc)
        opt = torch.optim.SGD(student.parameters(), lr=0.01)
        views = make_view_fn(config, rank=0, epoch=0)
        stats[device] = [distill_step(student, distiller, opt, x.to(device), y.to(device), views=views, amp=amp)
                         for _ in range(3)]
        assert distiller.center.device.type == torch.device(device).type
    for a, b in zip(stats["cpu"], stats[DEVICE]):
        assert all(math.isfinite(v) for v in b)
        np.testing.assert_allclose(b[0], a[0], rtol=0.05, atol=0.02)  # total loss


def test_inference_on_device_gives_the_cpu_scores_saliency_and_masks():
    """``Predictor`` (fp32 on either device): scores and profiles equal within TF32, the
    Jacobian saliency tiles close and the masks nearly identical."""
    from rayscreen.infer.predictor import Predictor, PredictorSettings

    cpu, dev = _twins(in_channels=2, num_classes=2, width=0.25)
    x, _ = _fields()
    settings = PredictorSettings(batch_size=4, saliency="jacobian", saliency_downsample=2, mask_nms_size=9)
    out = {d: Predictor(m, settings, device=d)({"image": x.numpy()}) for d, m in (("cpu", cpu), (DEVICE, dev))}
    a, b = out["cpu"], out[DEVICE]
    np.testing.assert_allclose(b["scores"], a["scores"], atol=2e-3)
    np.testing.assert_allclose(b["profile"], a["profile"], rtol=1e-2, atol=1e-3)
    sal_a, sal_b = (o[k] for o, k in ((a, "saliency"), (b, "saliency")))
    scale = np.abs(sal_a).max()
    assert scale > 0
    np.testing.assert_allclose(sal_b / scale, sal_a / scale, atol=2e-2)
    assert (b["mask"] == a["mask"]).mean() > 0.99


def test_profiles_on_device_match_the_cpu():
    """The transfer-learning profiler's resnet18 (random weights: none are downloaded) on
    both devices: the same features within TF32 precision."""
    from rayscreen.profile.predictor import ProfilePredictor

    torch.manual_seed(0)
    model = create_model("resnet18")
    x = (np.random.default_rng(0).random((4, 2, 96, 96)) * 60000).astype(np.uint16)
    feats = {}
    for device in ("cpu", DEVICE):
        pred = ProfilePredictor(channels=["DNA", "Actin"], model=model, input_size=112, device=device)
        feats[device] = pred({"image": x})["profile"]
    a, b = feats["cpu"], feats[DEVICE]
    assert a.shape == (4, 2 * 512)
    np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2 * np.abs(a).mean())


def test_batchnorm_recomputed_on_device_under_bf16_matches_the_cpu():
    """train.precise_bn on a GPU worker: the recomputed statistics (autocast on, as training)
    agree with the fp32 CPU recomputation."""
    from rayscreen.train.step import recompute_batchnorm

    cpu, dev = _twins(in_channels=2, num_classes=2, width=0.25)
    x, _ = _fields(n=16)
    batches = [x[i:i + 4] for i in range(0, 16, 4)]
    recompute_batchnorm(cpu, batches)
    recompute_batchnorm(dev, [b.to(DEVICE) for b in batches], amp=True)
    for (name, a), b in zip(cpu.state_dict().items(), dev.state_dict().values()):
        if "running_" in name:
            np.testing.assert_allclose(b.cpu(), a, rtol=0.03, atol=1e-3 * float(a.abs().max()), err_msg=name)


def test_the_training_cache_replays_device_batches_in_the_cpu_order():
    """train.cache_mb on a GPU worker: rows held on the device, the permutation drawn on the
    CPU generator, the batches (and the precise_bn sample) those of the CPU."""
    from rayscreen.train.loop import BatchCache

    x, y = _fields(n=12, y=32, x=32)
    out = {}
    for device in ("cpu", DEVICE):
        cache = BatchCache(1 << 20)
        list(cache.fill((x[i:i + 4].to(device), y[i:i + 4].to(device)) for i in range(0, 12, 4)))
        replay = list(cache.shuffled(5, torch.Generator().manual_seed(3)))
        sample = list(cache.sample(6, 4, torch.Generator().manual_seed(4)))
        assert all(b[0].device.type == torch.device(device).type for b in replay)
        out[device] = ([(a.cpu(), b.cpu()) for a, b in replay], [s.cpu() for s in sample])
    for (a, la), (b, lb) in zip(out["cpu"][0], out[DEVICE][0]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(out["cpu"][1], out[DEVICE][1]))
