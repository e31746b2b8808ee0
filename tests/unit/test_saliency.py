"""Saliency on toy models with known answers; smoothing against scipy; masks by hand."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from rayscreen.models import create_model, create_pooling
from rayscreen.models.saliency import (cam_saliency, jacobian_saliency, local_maxima, map_evidence, saliency_masks,
                                       smooth)
from rayscreen.models.wscnn import ClassMapNet


def spot_detector() -> ClassMapNet:
    """A fixed toy WSCNN: 3x3 box filter -> ReLU(x - 0.5) -> class maps (0: constant 0.1,
    1: the filtered image) -> global max pooling. Class 1 wins exactly where a bright spot is."""
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1 / 9)
        conv.bias.fill_(-0.5 / 9)
    trunk = nn.Sequential(conv, nn.ReLU())
    head = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
        head.bias.copy_(torch.tensor([0.01, 0.0]))
    return ClassMapNet(trunk, head, create_pooling("max", num_classes=2), in_channels=1, num_classes=2,
                       feature_dim=1, min_size=1, name="spot")


def _spot_batch(points, size=(32, 40), noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(points), 1, *size, generator=g) * noise
    for i, pts in enumerate(points):
        for (r, c) in pts:
            x[i, 0, r, c] = 1.0
    return x


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("source", ["logits", "maps"])
def test_single_bright_spot_is_found(relu, source):
    model = spot_detector()
    spots = [(5, 7), (20, 30), (16, 3)]
    x = _spot_batch([[p] for p in spots])
    assert (model(x).argmax(1) == 1).all()
    sal = jacobian_saliency(model, x, class_index=1, relu=relu, source=source)
    assert sal.shape == (3, 32, 40) and (sal >= 0).all()
    for i, (r, c) in enumerate(spots):
        # the gradient lives in the 3x3 box-filter neighbourhood of the spot: 5x5 at most
        ys, xs = np.nonzero(sal[i].numpy() > 0)
        assert ys.size > 0
        assert abs(ys - r).max() <= 2 and abs(xs - c).max() <= 2
        masks = saliency_masks(sal[i:i + 1], sigma=1.0, threshold=0.5, nms_size=7)
        assert masks[0, r, c]
        assert masks.sum() <= 49


def test_map_source_finds_every_spot_logit_source_only_the_max():
    """Global max pooling sends the logit's gradient to one location; the class-map
    evidence reaches all rare objects (why the default source is 'maps')."""
    model = spot_detector()
    spots = [(6, 6), (6, 30), (25, 18)]
    x = _spot_batch([spots])
    x[0, 0, 6, 6] = 1.2  # the global max
    from_maps = jacobian_saliency(model, x, class_index=1, source="maps")[0]
    from_logit = jacobian_saliency(model, x, class_index=1, source="logits")[0]
    for r, c in spots:
        assert from_maps[r, c] > 0
    assert from_logit[6, 6] > 0 and from_logit[6, 30] == 0 and from_logit[25, 18] == 0
    masks, peaks = saliency_masks(from_maps[None], sigma=1.0, threshold=0.3, nms_size=9, return_peaks=True)
    assert peaks.sum() == 3
    assert all(masks[0, r, c] for r, c in spots)


def test_batch_equals_single_images_and_mode_is_restored():
    torch.manual_seed(0)
    model = create_model("wscnn", width=0.1).train()
    x = torch.randn(3, 1, 60, 64)
    both = jacobian_saliency(model, x, class_index=[0, 1, 1])
    assert model.training  # restored
    for i, k in enumerate([0, 1, 1]):
        one = jacobian_saliency(model, x[i:i + 1], class_index=k)
        torch.testing.assert_close(both[i:i + 1], one, rtol=1e-4, atol=1e-7)
    # None = predicted class
    pred = model.eval()(x).argmax(1)
    torch.testing.assert_close(jacobian_saliency(model, x), jacobian_saliency(model, x, class_index=pred))
    with pytest.raises(ValueError, match="out of range"):
        jacobian_saliency(model, x, class_index=5)


def test_relu_variant_differs_and_leaves_no_hooks():
    torch.manual_seed(0)
    model = create_model("wscnn", width=0.1).eval()
    x = torch.randn(2, 1, 60, 64)
    plain = jacobian_saliency(model, x, class_index=1, source="logits")
    guided = jacobian_saliency(model, x, class_index=1, relu=True, source="logits")
    assert not torch.allclose(plain, guided)
    assert all(not m._forward_hooks for m in model.modules())
    # after the pass, plain saliency is unchanged (hooks really removed)
    torch.testing.assert_close(jacobian_saliency(model, x, class_index=1, source="logits"), plain)


def test_map_evidence_by_hand():
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (1, 2, 1, 2)
    # class 1: relu(2-1) + relu(0-3) = 1; class 0: relu(1-2) + relu(3-0) = 3
    assert map_evidence(maps, torch.tensor([1])).item() == 1.0
    assert map_evidence(maps, torch.tensor([0])).item() == 3.0


def test_cam_saliency_upsamples_the_chosen_map():
    maps = torch.zeros(2, 2, 4, 5)
    maps[0, 1, 1, 3] = 5.0
    maps[1, 0, 2, 0] = 4.0
    cam = cam_saliency(maps, (40, 50))
    assert cam.shape == (2, 40, 50)
    r, c = np.unravel_index(cam[0].argmax().item(), (40, 50))
    assert r // 10 == 1 and c // 10 == 3
    r, c = np.unravel_index(cam[1].argmax().item(), (40, 50))
    assert r // 10 == 2 and c // 10 == 0
    assert cam_saliency(maps, (40, 50), class_index=0)[0].abs().max() == 0


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_smooth_matches_scipy(sigma):
    g = np.random.default_rng(0)
    a = g.random((2, 30, 37)).astype(np.float32)
    got = smooth(torch.from_numpy(a), sigma).numpy()
    want = np.stack([ndimage.gaussian_filter(a[i], sigma, mode="mirror", truncate=4.0) for i in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert smooth(torch.from_numpy(a), 0) is not None


def test_masks_nms_and_threshold_by_hand():
    s = torch.zeros(1, 20, 30)
    s[0, 5, 5] = 1.0    # strong detection
    s[0, 5, 7] = 0.8    # within its window: suppressed as a peak, still masked (>= threshold)
    s[0, 15, 25] = 0.5  # second detection
    s[0, 15, 10] = 0.2  # below threshold: not a detection
    masks, peaks = saliency_masks(s, sigma=0, threshold=0.4, nms_size=5, return_peaks=True)
    assert peaks.nonzero().tolist() == [[0, 5, 5], [0, 15, 25]]
    assert masks.nonzero().tolist() == [[0, 5, 5], [0, 5, 7], [0, 15, 25]]
    # a long slope above threshold has one local maximum: only its window is kept
    s2 = torch.zeros(1, 20, 40)
    s2[0, 10, 5:] = torch.linspace(1.0, 0.6, 35)
    m2, p2 = saliency_masks(s2, sigma=0, threshold=0.5, nms_size=5, return_peaks=True)
    assert p2.nonzero().tolist() == [[0, 10, 5]]
    assert m2.nonzero().tolist() == [[0, 10, 5], [0, 10, 6], [0, 10, 7]]
    # all-zero saliency: no mask
    assert not saliency_masks(torch.zeros(2, 8, 8)).any()


def test_threshold_masks_are_the_masks_of_each_threshold():
    """threshold_masks finds the local maxima once for many thresholds; each threshold's
    (masks, peaks) must be the WSCNN procedure's steps 3-4 written out here: peaks are
    local maxima at or above the threshold and above 0, masks the above-threshold pixels
    within a window of a peak. Threshold 0 is where "above 0" decides."""
    from rayscreen.models.saliency import box_max, local_maxima, normalise_maps, smooth, threshold_masks

    g = torch.Generator().manual_seed(0)
    s = normalise_maps(smooth(torch.rand(4, 30, 41, generator=g), 2.0))
    s[1] = 0  # an empty map: no peak at threshold 0 either
    thresholds = [0.0, 0.1, 0.5, 0.9]
    out = threshold_masks(s, thresholds, 7)
    assert len(out) == 4
    for thr, (masks, peaks) in zip(thresholds, out):
        above = s >= thr
        want_peaks = local_maxima(s, 7) & above & (s > 0)
        want_masks = above & (box_max(want_peaks.float(), 7) > 0)
        assert torch.equal(peaks, want_peaks) and torch.equal(masks, want_masks), thr
        assert torch.equal(masks, saliency_masks(s, sigma=0, threshold=thr, nms_size=7)), thr
    assert not out[0][0][1].any() and not out[0][1][1].any()
    # a higher threshold keeps a subset of the peaks, and some of them go (else the test is empty)
    assert (out[3][1] <= out[1][1]).all() and out[3][1].sum() < out[1][1].sum()


def test_local_maxima():
    s = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 2.0]]])
    assert local_maxima(s, 3)[0, 0].tolist() == [False, True, False, False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_saliency_on_gpu():
    model = spot_detector().cuda()
    x = _spot_batch([[(5, 7)]]).cuda()
    sal = jacobian_saliency(model, x, class_index=1)
    assert sal.device.type == "cuda"
    assert saliency_masks(sal, sigma=1.0, threshold=0.5, nms_size=7).device.type == "cuda"


def test_box_max_refuses_a_single_map():
    from rayscreen.models.saliency import box_max

    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        box_max(torch.zeros(8, 8), 3)


def test_box_max_equals_a_square_max_pool():
    """The separable window maximum is the square one, borders included, odd and even sizes."""
    import torch.nn.functional as F

    from rayscreen.models.saliency import _box_max_pool, box_max

    s = torch.randn(3, 23, 31, generator=torch.Generator().manual_seed(0))
    for size in (1, 3, 8, 21, 55):
        k = size | 1
        square = F.max_pool2d(s[:, None], k, stride=1, padding=k // 2)[:, 0]
        assert torch.equal(box_max(s, size), square), size  # the CPU's scipy path
        assert torch.equal(_box_max_pool(s, k), square), size  # the GPU's max_pool2d path
