"""MIL pooling: tests generated from the registry, plus known limits and hand-worked values."""

import math

import pytest
import torch
import torch.nn.functional as F

from rayscreen.models import create_pooling, list_poolings
from rayscreen.models import pooling as P

K = 3


def _maps(seed=0, b=4, k=K, h=5, w=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, h, w, generator=g) * 3


def test_registry_names():
    assert set(list_poolings()) >= {"max", "mean", "lse", "gm", "noisy_or", "isr", "noisy_and", "attention", "fc"}
    with pytest.raises(KeyError, match="unknown MIL pooling 'nope'.*max"):
        create_pooling("nope", num_classes=2)


@pytest.mark.parametrize("name", list_poolings())
def test_shape_finite_and_gradient(name):
    torch.manual_seed(0)
    pool = create_pooling(name, num_classes=K)
    maps = _maps().requires_grad_(True)
    out = pool(maps)
    assert out.shape == (4, K)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2, 0])).backward()
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0
    for p in pool.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", list_poolings())
def test_extreme_logits_stay_finite(name):
    pool = create_pooling(name, num_classes=K)
    maps = _maps() * 100  # saturated sigmoids
    maps.requires_grad_(True)
    out = pool(maps)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(maps.grad).all()


@pytest.mark.parametrize("name", [n for n in list_poolings()
                                  if create_pooling(n, num_classes=K).permutation_invariant])
def test_permutation_invariance_over_instances(name):
    torch.manual_seed(0)
    pool = create_pooling(name, num_classes=K)
    maps = _maps(1)
    b, k, h, w = maps.shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(3))
    shuffled = maps.flatten(2)[:, :, perm].reshape(b, k, h, w)
    assert not torch.equal(shuffled, maps)
    torch.testing.assert_close(pool(shuffled), pool(maps), rtol=1e-5, atol=1e-5)
    # a different grid shape with the same instances gives the same bag too
    torch.testing.assert_close(pool(maps.reshape(b, k, w, h)), pool(maps), rtol=1e-5, atol=1e-5)


def test_fc_is_not_permutation_invariant_and_takes_any_size():
    torch.manual_seed(0)
    pool = create_pooling("fc", num_classes=2, grid=(3, 4))
    maps = _maps(2, k=2, h=3, w=4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(pool(maps.flatten(2)[:, :, perm].reshape(maps.shape)), pool(maps))
    assert pool(_maps(k=2, h=9, w=13)).shape == (4, 2)
    assert pool(_maps(k=2, h=1, w=2)).shape == (4, 2)


def test_max_and_mean_by_hand():
    maps = torch.tensor([[[[1.0, -2.0], [4.0, 0.5]]]])  # (1, 1, 2, 2)
    assert create_pooling("max", num_classes=1)(maps).item() == 4.0
    assert create_pooling("mean", num_classes=1)(maps).item() == pytest.approx(0.875)
    # mean of probabilities -> logit of the mean probability
    pm = torch.sigmoid(maps).mean()
    got = create_pooling("mean", num_classes=1, space="probabilities")(maps).item()
    assert got == pytest.approx(math.log(pm / (1 - pm)), rel=1e-5)


def test_probability_max_equals_logit_max():
    # logit(max sigmoid(z)) = max z: the two families agree on max
    maps = _maps(4)
    x = P.flatten_instances(maps)
    torch.testing.assert_close(P.prob_to_logit(P.max_pool(torch.sigmoid(x))), P.max_pool(x), rtol=1e-4, atol=1e-4)


def test_lse_limits():
    x = P.flatten_instances(_maps(5))
    torch.testing.assert_close(P.lse_pool(x, 1e4), P.max_pool(x), atol=1e-3, rtol=0)
    torch.testing.assert_close(P.lse_pool(x, 1e-5), P.mean_pool(x), atol=1e-3, rtol=0)
    # monotone in r between the two
    vals = [P.lse_pool(x, r) for r in (0.1, 1.0, 10.0)]
    assert (vals[0] <= vals[1] + 1e-6).all() and (vals[1] <= vals[2] + 1e-6).all()
    with pytest.raises(ValueError, match="r > 0"):
        P.lse_pool(x, 0)


def test_gm_limits_and_r1_is_mean():
    p = torch.sigmoid(P.flatten_instances(_maps(6)))
    torch.testing.assert_close(P.gm_pool(p, 1.0), P.mean_pool(p), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(P.gm_pool(p, 2000.0), P.max_pool(p), atol=3e-3, rtol=0)
    # r -> 0: the geometric mean (below the arithmetic mean)
    torch.testing.assert_close(P.gm_pool(p, 1e-4), torch.exp(torch.log(p).mean(-1)), atol=1e-3, rtol=0)
    assert (P.gm_pool(p, 1e-4) <= P.mean_pool(p) + 1e-6).all()
    # the module's log-space forward matches the pure function
    maps = _maps(6)
    pool = create_pooling("gm", num_classes=K, p=3.0)
    torch.testing.assert_close(pool(maps), P.prob_to_logit(P.gm_pool(torch.sigmoid(P.flatten_instances(maps)), 3.0)),
                               rtol=1e-4, atol=1e-4)


def test_noisy_or_and_isr_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert P.noisy_or_pool(p).item() == pytest.approx(0.75)
    # ISR: v = 1, 1, 0 -> 2 / 3
    assert P.isr_pool(p).item() == pytest.approx(2 / 3)
    # the log-space logits of the modules agree with the probabilities
    z = torch.tensor([[[[0.3, -1.0], [2.0, -0.5]]]])
    pz = torch.sigmoid(z).flatten(2)
    torch.testing.assert_close(create_pooling("noisy_or", num_classes=1)(z), P.prob_to_logit(P.noisy_or_pool(pz)))
    torch.testing.assert_close(create_pooling("isr", num_classes=1)(z), P.prob_to_logit(P.isr_pool(pz)))


def test_noisy_and_bounds_monotone_and_by_hand():
    a = 10.0
    b = torch.tensor([0.1, 0.5, 0.9])
    # endpoints: pbar = 0 -> 0, pbar = 1 -> 1, for every threshold
    assert torch.allclose(P.noisy_and_pool(torch.zeros(3, 4), a, b), torch.zeros(3), atol=1e-6)
    assert torch.allclose(P.noisy_and_pool(torch.ones(3, 4), a, b), torch.ones(3), atol=1e-6)
    # by hand: pbar = 0.5, b = 0.5 -> (s(0) - s(-5)) / (s(5) - s(-5))
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = (0.5 - s(-5)) / (s(5) - s(-5))
    assert P.noisy_and_pool(torch.full((1, 4), 0.5), a, torch.tensor([0.5])).item() == pytest.approx(want, rel=1e-5)
    # in [0, 1] and monotone: raising any one instance probability never lowers the bag
    g = torch.Generator().manual_seed(0)
    p = torch.rand(200, 3, 16, generator=g)
    out = P.noisy_and_pool(p, a, b)
    assert ((out >= 0) & (out <= 1)).all()
    bumped = p.clone()
    idx = torch.randint(0, 16, (200, 3), generator=g)
    bumped.scatter_(2, idx[..., None], torch.ones(200, 3, 1))
    assert (P.noisy_and_pool(bumped, a, b) >= out - 1e-6).all()
    # b is learned per class
    pool = create_pooling("noisy_and", num_classes=3, a=5.0)
    assert pool.b.shape == (3,) and pool.b.requires_grad


def test_attention_is_between_min_and_max_and_weights_sum_to_one():
    torch.manual_seed(0)
    pool = create_pooling("attention", num_classes=K, hidden=8)
    maps = _maps(7)
    w = pool.attention(maps)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    out = pool(maps)
    x = P.flatten_instances(maps)
    assert (out <= x.amax(-1) + 1e-5).all() and (out >= x.amin(-1) - 1e-5).all()


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="r > 0"):
        create_pooling("lse", num_classes=2, r=-1)
    with pytest.raises(ValueError, match="space"):
        create_pooling("mean", num_classes=2, space="odds")
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        create_pooling("max", num_classes=2)(torch.zeros(2, 2, 5))


def _reference_logits(name, maps, **kw):
    """The paper's bag probability (formulas.md) as a logit, in 50-digit arithmetic (mpmath,
    which torch installs): (B, K, h, w) instance logits -> (B, K) float64."""
    import mpmath

    mpmath.mp.dps = 50
    out = torch.zeros(maps.shape[:2], dtype=torch.float64)
    for bi in range(maps.shape[0]):
        for k in range(maps.shape[1]):
            p = [1 / (1 + mpmath.exp(-mpmath.mpf(float(z)))) for z in maps[bi, k].flatten().tolist()]
            if name == "noisy_or":
                bag = 1 - mpmath.fprod([1 - x for x in p])
            elif name == "mean":
                bag = mpmath.fsum(p) / len(p)
            elif name == "gm":
                bag = (mpmath.fsum([x ** kw["r"] for x in p]) / len(p)) ** (1 / mpmath.mpf(kw["r"]))
            else:  # noisy_and
                a, b = mpmath.mpf(kw["a"]), mpmath.mpf(kw["b"])
                s = mpmath.sigmoid if hasattr(mpmath, "sigmoid") else (lambda t: 1 / (1 + mpmath.exp(-t)))
                bag = (s(a * (mpmath.fsum(p) / len(p) - b)) - s(-a * b)) / (s(a * (1 - b)) - s(-a * b))
            out[bi, k] = float(mpmath.log(bag) - mpmath.log(1 - bag))
    return out


PROBABILITY_POOLINGS = [("noisy_or", {}, {}), ("mean", {"space": "probabilities"}, {}), ("gm", {"r": 3.0}, {"r": 3.0}),
                        ("noisy_and", {"a": 10.0, "b_init": 0.5}, {"a": 10.0, "b": 0.5})]


@pytest.mark.parametrize("name, kwargs, ref", PROBABILITY_POOLINGS)
def test_probability_poolings_match_the_papers_formula(name, kwargs, ref):
    torch.manual_seed(0)
    maps = torch.randn(2, 2, 3, 4) * 3
    ours = create_pooling(name, 2, **kwargs)(maps).double()
    torch.testing.assert_close(ours, _reference_logits(name, maps, **ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, kwargs, ref", PROBABILITY_POOLINGS)
def test_a_bag_no_instance_supports_keeps_its_gradient(name, kwargs, ref):
    """Every instance at z = -30 (P ~ 1e-13): a floor at P = 1e-7 fixed both classes' logits
    at -16 with zero gradient (cross-entropy stuck at log 2); the paper's P has neither."""
    pooling = create_pooling(name, 2, **kwargs)
    maps = torch.full((1, 2, 21, 30), -30.0)
    maps[:, 1] = -25.0
    maps.requires_grad_(True)
    logits = pooling(maps)
    torch.testing.assert_close(logits.double(), _reference_logits(name, maps.detach(), **ref), rtol=1e-3, atol=1e-3)
    loss = F.cross_entropy(logits, torch.tensor([0]))  # the truth is the class the maps support less
    loss.backward()
    assert loss.item() > 1.0 and maps.grad.abs().sum() > 0
    if name == "noisy_and":
        assert pooling.b.grad.abs().sum() > 0  # the learned thresholds learn too


@pytest.mark.parametrize("n, r", [(10000, 1.0), (10000, 5.0), (630, 1.0), (630, 1e-4), (630, 50.0)])
def test_lse_is_accurate_in_float32_for_large_bags(n, r):
    torch.manual_seed(0)
    x = torch.randn(3, n)
    exact = (torch.logsumexp(r * x.double(), dim=-1) - math.log(n)) / r
    torch.testing.assert_close(P.lse_pool(x, r).double(), exact, rtol=0, atol=2e-5)


def test_noisy_and_is_exact_where_the_mean_probability_rounds_to_one():
    """Instance logits around 17: sigmoid(z) is 1.0 in float32, so ``1 - mean(sigmoid(z))``
    was 0 and the logit jumped to ~92 with no gradient (around 15 it was already 0.07 off);
    ``1 - pbar`` is now the mean of sigmoid(-z). Checked against Kraus' formula in 50 digits."""
    pooling = create_pooling("noisy_and", 2, a=10.0, b_init=0.5)
    maps = (torch.linspace(-0.5, 0.5, 100).reshape(1, 1, 10, 10) + torch.tensor([15.0, 17.0]).reshape(1, 2, 1, 1))
    maps.requires_grad_(True)
    logits = pooling(maps)
    torch.testing.assert_close(logits.double(), _reference_logits("noisy_and", maps.detach(), a=10.0, b=0.5),
                               rtol=0, atol=1e-4)
    logits.sum().backward()
    assert torch.isfinite(maps.grad).all() and (maps.grad[0, 1] > 0).all()
    assert torch.isfinite(pooling.b.grad).all() and (pooling.b.grad != 0).all()


def test_noisy_and_from_bfloat16_instances_is_computed_in_float32():
    """bf16 instance logits around 7: in bf16 sigmoid(z) and the mean round to 1.0 from ~6.2 on
    (logit ~92, no gradient); the pooling now works in float32 whatever the input dtype."""
    z32 = torch.linspace(-0.5, 0.5, 100).reshape(1, 1, 10, 10) + 7.0
    z16 = z32.bfloat16().requires_grad_(True)
    pooling = create_pooling("noisy_and", 1, a=10.0, b_init=0.5)
    out = pooling(z16)
    # the same as float32 on the same (bf16-rounded) inputs, and close to float32 on the unrounded ones
    torch.testing.assert_close(out.float(), pooling(z32), rtol=0, atol=0.05)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pooling(z16.detach().float()), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), _reference_logits("noisy_and", z16.detach().float(), a=10.0, b=0.5),
                               rtol=0, atol=1e-4)
    out.sum().backward()
    g = z16.grad.float()
    assert torch.isfinite(g).all() and (g > 0).all()


def test_noisy_and_keeps_its_gradient_where_the_mean_probability_underflows():
    """Every instance at -120: sigmoid(-120) ~ 8e-53 underflows to 0 in float32; both means
    are kept as logs, so the logit is still right and has a gradient. With b = 0.5 the
    Noisy-AND logit is odd in z, which gives the +120 side without a 1 - 1e-53 in the reference."""
    pooling = create_pooling("noisy_and", 1, a=10.0, b_init=0.5)
    maps = torch.tensor([-120.0, 120.0]).reshape(2, 1, 1, 1).expand(2, 1, 4, 4).clone().requires_grad_(True)
    logits = pooling(maps)
    import mpmath

    with mpmath.workdps(150):  # the bag probability differs from its floor in the ~52nd digit
        sg = lambda t: 1 / (1 + mpmath.exp(-t))  # noqa: E731
        bag = (sg(10 * (sg(mpmath.mpf(-120)) - 0.5)) - sg(mpmath.mpf(-5))) / (sg(mpmath.mpf(5)) - sg(mpmath.mpf(-5)))
        ref = float(mpmath.log(bag) - mpmath.log(1 - bag))
    assert logits[0, 0].item() == pytest.approx(ref, abs=1e-3) and logits[1, 0].item() == pytest.approx(-ref, abs=1e-3)
    logits.sum().backward()
    assert torch.isfinite(maps.grad).all() and (maps.grad > 0).all()


def test_prob_to_logit_and_probability_poolings_of_bfloat16_stay_finite():
    """In bf16 the clamp 1 - 1e-7 is 1.0, so a bag probability of 1 gave an infinite logit;
    the instance sigmoid in bf16 is 1.0 from z ~ 5.5 on. Both now run in float32."""
    out = P.prob_to_logit(torch.tensor([0.5, 1.0], dtype=torch.bfloat16))
    assert torch.isfinite(out).all() and out[1] > 15 and out.dtype == torch.float32
    maps = torch.linspace(-0.5, 0.5, 100).reshape(1, 1, 10, 10) + 8.0
    pooling = create_pooling("lse", 1, r=5.0, space="probabilities")
    torch.testing.assert_close(pooling(maps.bfloat16()).float(), pooling(maps), rtol=0, atol=0.05)
