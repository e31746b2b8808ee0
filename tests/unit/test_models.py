"""Model registry: tests generated from it (every classifier, every pooling on wscnn), the
WSCNN architecture as the paper gives it, and the torchvision backbones."""

import pytest
import torch
import torch.nn.functional as F

from rayscreen.models import create_model, list_models, list_poolings, save_backbone_weights, weights_fingerprint
from rayscreen.models.backbones import SPECS
from rayscreen.models.wscnn import min_input_size
from rayscreen.store.errors import RayscreenError

CLASSIFIERS = list_models("classifier")
BACKBONES = list_models("backbone")


def test_registry_lists_the_contract_names():
    assert set(CLASSIFIERS) == {"wscnn", "wscnn6", "wscnn_cell", "milnet"}
    assert set(BACKBONES) == {"resnet18", "resnet50", "vgg16", "inception_v3", "convnext_tiny", "vit_b_16"}
    assert sorted(CLASSIFIERS + BACKBONES) == list_models()
    with pytest.raises(KeyError, match="unknown model 'resnet9000'.*wscnn"):
        create_model("resnet9000")


def _check_classifier(model, x, k):
    out = model.forward_maps(x)
    assert set(out) >= {"logits", "class_maps", "features", "mil_logits"}
    b = x.shape[0]
    assert out["logits"].shape == (b, k)
    assert out["class_maps"].shape[:2] == (b, k)
    assert out["features"].shape == (b, model.feature_dim)
    assert all(torch.isfinite(v).all() for v in out.values())
    torch.testing.assert_close(model(x), out["logits"])
    target = torch.arange(b) % k
    loss = F.cross_entropy(out["logits"], target) + model.aux_loss(out, target)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # gradient reaches the first convolution (no dead path through the pooling)
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_forward_shapes_nan_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=3, width=0.25).train()
    s = max(model.min_size, 40)
    x = torch.randn(2, 2, s + 3, s + 11)  # non-square, not a multiple of anything
    _check_classifier(model, x, 3)


def test_profile_features_pooled_by_mean_max_or_mean_and_spread():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 64, 72)
    nets = {pool: create_model("milnet", in_channels=2, num_classes=3, width=0.25, feature_pool=pool).eval()
            for pool in ("mean", "max", "meanstd")}
    for net in nets.values():
        net.load_state_dict(nets["mean"].state_dict())  # one network, three poolings
    with torch.no_grad():
        maps = nets["mean"].trunk(x)
        feats = {pool: net.features(x) for pool, net in nets.items()}
        assert torch.equal(nets["meanstd"](x), nets["mean"](x))  # the classifier is unchanged
    d = nets["mean"].feature_dim
    assert nets["meanstd"].feature_dim == 2 * d and feats["meanstd"].shape == (3, 2 * d)
    torch.testing.assert_close(feats["meanstd"][:, :d], feats["mean"])
    torch.testing.assert_close(feats["meanstd"][:, d:], maps.flatten(2).std(dim=2))
    torch.testing.assert_close(feats["max"], maps.flatten(2).amax(dim=2))
    with pytest.raises(ValueError, match="feature_pool='median'"):
        create_model("milnet", feature_pool="median")


@pytest.mark.parametrize("pooling", list_poolings())
def test_wscnn_with_every_pooling(pooling):
    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=1, num_classes=2, width=0.1, pooling=pooling)
    _check_classifier(model, torch.randn(2, 1, 60, 70), 2)


def test_wscnn_is_the_paper_network():
    model = create_model("wscnn")  # paper widths: 50, 100, 100, K
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 50, (11, 11), (0, 0)), (50, 100, (3, 3), (0, 0)), (100, 100, (5, 5), (1, 1)), (100, 2, (5, 5), (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 3
    # 210x280 -> conv11 200x270 -> pool 100x135 -> conv3 98x133 -> 49x66 -> conv5p1 47x64 -> 23x32 -> 21x30
    out = model.eval().forward_maps(torch.zeros(1, 1, 210, 280))
    assert out["class_maps"].shape == (1, 2, 21, 30)
    assert out["features"].shape == (1, 100)
    assert model.pooling.__class__.__name__ == "MaxPooling"


def test_variants_differ_where_the_paper_says():
    cell = [m for m in create_model("wscnn_cell").modules() if isinstance(m, torch.nn.Conv2d)]
    assert cell[1].kernel_size == (7, 7)
    deep = [m for m in create_model("wscnn6").modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(deep) == 6 and deep[-1].out_channels == 2


def test_width_multiplier_and_explicit_list():
    narrow = create_model("wscnn", width=0.25)
    assert [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)] == [12, 25, 25, 2]
    explicit = create_model("wscnn", width=[4, 8, 16], num_classes=5)
    assert [m.out_channels for m in explicit.modules() if isinstance(m, torch.nn.Conv2d)] == [4, 8, 16, 5]
    assert explicit.feature_dim == 16
    with pytest.raises(ValueError, match="3 positive filter counts"):
        create_model("wscnn", width=[4, 8])
    with pytest.raises(ValueError, match="width"):
        create_model("wscnn", width=0)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_minimum_input_size_is_exact(name):
    model = create_model(name, width=0.1).eval()
    s = model.min_size
    assert model(torch.zeros(1, 1, s, s)).shape == (1, 2)
    with pytest.raises(ValueError, match=f"minimum {s}x{s}"):
        model(torch.zeros(1, 1, s - 1, s + 20))
    # bypassing the check, one pixel less really fails or leaves an empty map (the bound is tight)
    try:
        with torch.no_grad():
            maps = model.head(model.trunk(torch.zeros(1, 1, s + 20, s - 1)))
        assert maps.shape[-1] == 0
    except RuntimeError as e:
        assert "too small" in str(e) or "greater than actual input size" in str(e)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 64, 64))


def test_min_input_size_by_hand():
    layers = [torch.nn.Conv2d(1, 1, 3), torch.nn.MaxPool2d(2), torch.nn.Conv2d(1, 1, 3, padding=1)]
    # output 1 <- conv3p1 needs 1 <- pool needs 2 <- conv3 needs 4
    assert min_input_size(layers) == 4


def test_fc_head_joint_loss():
    torch.manual_seed(0)
    model = create_model("milnet", num_classes=3, pooling="noisy_and", fc_head=True, width=0.25)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 1])
    out = model.forward_maps(x)
    assert not torch.equal(out["logits"], out["mil_logits"])
    aux = model.aux_loss(out, y)
    torch.testing.assert_close(aux, F.cross_entropy(out["mil_logits"], y))
    # from plain forward logits too (the MIL logits of that call are kept)
    logits = model(x)
    torch.testing.assert_close(model.aux_loss(logits, y), aux)
    # no fc head: zero
    plain = create_model("milnet", num_classes=3, width=0.25)
    assert plain.aux_loss(plain(x), y).item() == 0.0


def _spot_images(n, g):
    """n images 48x48 of dim noise; odd ones carry one bright 6x6 square anywhere."""
    x = torch.rand(n, 1, 48, 48, generator=g) * 0.2
    y = torch.arange(n) % 2
    for i in range(n):
        if y[i]:
            r, c = torch.randint(2, 40, (2,), generator=g).tolist()
            x[i, 0, r:r + 6, c:c + 6] = 1.0
    return x, y


def test_narrow_wscnn_learns_a_toy_rare_spot_task():
    """A narrow wscnn with max pooling learns 'is there a bright square' in 30 CPU steps
    and generalises to new images (the training path the reproduction relies on)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = _spot_images(32, g)
    x_test, y_test = _spot_images(32, g)
    model = create_model("wscnn", width=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() == 1.0
        # chance is 0.5; P(>= 26/32 correct by chance) < 0.001
        assert (model(x_test).argmax(1) == y_test).float().mean().item() >= 0.8


# ---------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes_on_meta_device(name):
    """The cut and feature_dim of every backbone, shape-only on the meta device (no compute)."""
    with torch.device("meta"):
        model = create_model(name)
        s = model.input_size
        assert model(torch.empty(2, 3, s, s)).shape == (2, SPECS[name].feature_dim)
        assert model(torch.empty(1, 3, s + 32, s)).shape == (1, model.feature_dim)  # vit resizes
    assert model.feature_dim == SPECS[name].feature_dim
    assert model.input_size == (299 if name == "inception_v3" else 224)


def _torchvision_at_penultimate(name: str, state: dict) -> torch.nn.Module:
    """torchvision's own network ``name`` with ``state`` loaded as its published weights are
    (inception_v3: aux head, and transform_input as torchvision sets it for ImageNet
    weights), its last classifier layer replaced by the identity."""
    import torchvision

    if name == "inception_v3":
        ref = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    else:
        ref = getattr(torchvision.models, name)(weights=None)
    ref.load_state_dict(state)
    if name == "convnext_tiny":
        ref.classifier[-1] = torch.nn.Identity()
    else:
        ref.fc = torch.nn.Identity()
    return ref.eval()


# the three kinds of cut (fc, inception's aux head and input transform, convnext's classifier
# block); vgg16 and vit_b_16 (138M and 86M parameters) are left out for the suite's time
@pytest.mark.parametrize("name, size, fc", [("resnet18", 64, (1000, 512)), ("inception_v3", 96, (1000, 2048)),
                                            ("convnext_tiny", 64, (1000, 768))])
def test_backbone_weights_round_trip(tmp_path, name, size, fc):
    path = save_backbone_weights(name, str(tmp_path / f"{name}.pth"), seed=3)
    # the file is a plain torchvision state dict (what users download): the classifier included
    state = torch.load(path, weights_only=True)
    head = "classifier.2.weight" if name == "convnext_tiny" else "fc.weight"
    assert state[head].shape == fc
    model = create_model(name, weights=path)
    ref = _torchvision_at_penultimate(name, state)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model(x)
        torch.testing.assert_close(feats, ref(x))
    assert feats.shape == (2, fc[1]) and torch.isfinite(feats).all()


def test_a_backbone_without_weights_is_the_same_network_every_time(tmp_path):
    """Every actor of a profiling pool, a restarted actor and a resumed run build it anew:
    without weights they must still embed with one network. The caller's RNG is untouched."""
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a, b = create_model("resnet18"), create_model("resnet18")
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    saved = torch.load(save_backbone_weights("resnet18", str(tmp_path / "r18.pth")), weights_only=True)
    torch.testing.assert_close(a.net.conv1.weight, saved["conv1.weight"])  # the default seed: the same init
    other = torch.load(save_backbone_weights("resnet18", str(tmp_path / "r18-1.pth"), seed=1), weights_only=True)
    assert not torch.equal(other["conv1.weight"], saved["conv1.weight"])


def test_weights_fingerprint_follows_content_not_the_file(tmp_path):
    """A resume is accepted or refused by it: a copied or touched weights file is the same
    network, other weights (or the seeded init against a file) are not."""
    import os
    import shutil

    path = save_backbone_weights("resnet18", str(tmp_path / "r18.pth"), seed=3)
    first = weights_fingerprint(create_model("resnet18", weights=path))
    copy = shutil.copy(path, tmp_path / "copy.pth")
    os.utime(copy, (0, 0))
    assert weights_fingerprint(create_model("resnet18", weights=str(copy))) == first
    other = save_backbone_weights("resnet18", str(tmp_path / "r18-4.pth"), seed=4)
    assert weights_fingerprint(create_model("resnet18", weights=other)) != first
    assert weights_fingerprint(create_model("resnet18")) == weights_fingerprint(create_model("resnet18")) != first
    # the extra metadata counts too (infer: the artefact's classes, pooling...)
    model = create_model("resnet18", weights=path)
    assert weights_fingerprint(model, {"classes": ["a", "b"]}) != weights_fingerprint(model, {"classes": ["b", "a"]})
    # bfloat16 tensors (numpy has none) are hashed as bytes
    assert len(weights_fingerprint(model.to(torch.bfloat16))) == 16


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(RayscreenError, match="not found"):
        create_model("resnet18", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(RayscreenError, match="do not fit torchvision resnet18"):
        create_model("resnet18", weights=str(bad))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        with torch.device("meta"):
            create_model("resnet18")(torch.empty(1, 1, 64, 64))


def test_milnet_with_torchvision_trunk_on_meta():
    with torch.device("meta"):
        model = create_model("milnet", trunk="resnet18", in_channels=1, num_classes=4)
        out = model.forward_maps(torch.empty(2, 1, 96, 128))
    assert out["class_maps"].shape == (2, 4, 3, 4)
    assert out["features"].shape == (2, 512)


@pytest.mark.parametrize("name, pooling, kwargs", [
    ("milnet", "noisy_and", {}), ("milnet", "lse", {"r": 5.0, "space": "probabilities"}),
    ("wscnn", "noisy_and", {}), ("wscnn", "lse", {"r": 5.0, "space": "probabilities"})])
def test_probability_space_pooling_under_bfloat16_autocast(name, pooling, kwargs):
    """Class maps around 8 and 12 under bf16 autocast (train.amp on a GPU): the MIL head ran
    in bf16, where the bag probability rounds to 1 (lse: infinite logits; noisy_and: ~92
    with no gradient). It now runs in float32: the logits are those of the float32 model,
    up to the trunk's bf16 rounding."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=2, width=0.25, pooling=pooling, pooling_kwargs=kwargs)
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    for bias in (8.0, 12.0):
        with torch.no_grad():
            model.head.bias[1] = bias
            fp32 = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = model(x)
                amp_maps = model.forward_maps(x)["logits"]
        assert torch.isfinite(amp).all()
        torch.testing.assert_close(amp.float(), fp32, rtol=0, atol=0.15)
        assert amp.dtype == torch.float32
        torch.testing.assert_close(amp_maps, amp)
    # and it trains under autocast: finite loss, finite non-zero gradients into the class maps
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.head.weight.grad).all()
    assert model.head.weight.grad.abs().sum() > 0


def test_aux_loss_takes_the_main_losss_label_smoothing():
    """Kraus' joint loss: the MIL branch's cross-entropy is smoothed like the main one
    (train.label_smoothing), not trained towards one-hot targets beside it."""
    torch.manual_seed(0)
    model = create_model("milnet", num_classes=3, pooling="noisy_and", fc_head=True, width=0.25)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 1])
    out = model.forward_maps(x)
    smoothed = model.aux_loss(out, y, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(out["mil_logits"], y, label_smoothing=0.1))
    assert not torch.allclose(smoothed, model.aux_loss(out, y))  # the default stays plain
    soft = F.one_hot(y, 3).float()  # (B, K) probability targets (mixup) take it too
    torch.testing.assert_close(model.aux_loss(out, soft, label_smoothing=0.1), smoothed)


def test_the_mil_head_runs_in_float32_under_autocast():
    """The pooling itself (attention's and fc's Linear layers, the probability poolings)
    sees float32 maps with autocast off, whatever the trunk ran in."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, maps):
            seen.append((maps.dtype, torch.is_autocast_enabled(maps.device.type)))
            return maps.flatten(2).amax(-1)

    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=1, num_classes=2, width=0.25).eval()
    model.pooling = Recorder()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        model.forward_maps(x)
    assert seen == [(torch.float32, False)] * 2


def test_a_random_torchvision_trunk_follows_the_seed():
    """milnet's random torchvision trunk is drawn from torch's generator like its other
    layers: train.seed gives each seed its own trunk (it started from one fixed seed, so seed
    sweeps and ensembles shared it), and the same seed the same trunk."""
    def trunk(seed):
        torch.manual_seed(seed)
        model = create_model("milnet", trunk="resnet18", in_channels=1, num_classes=2)
        return torch.cat([p.detach().flatten() for p in model.trunk.parameters()])

    assert torch.equal(trunk(0), trunk(0))
    assert not torch.equal(trunk(0), trunk(1))
