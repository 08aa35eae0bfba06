"""Gradual magnitude pruning (sparsevd.magnitude), the baseline of issue 23 item 5: the cubic
schedule against Zhu & Gupta's eq. 1, the exact global sparsity reached, the magnitude order kept
across layers, permanence after finish(), and the argument errors."""
import math

import pytest
import torch
from torch import nn

from sparsevd.magnitude import GradualMagnitudePruning, cubic_sparsity, prunable_weights


def small_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 30), nn.ReLU(),
                         nn.Linear(30, 10))


@pytest.mark.parametrize("si,sf,t0,t1", [(0.0, 0.95, 0, 1000), (0.2, 0.5, 37, 123), (0.0, 0.99, 5, 6)])
def test_cubic_sparsity_is_eq_1(si, sf, t0, t1):
    for t in torch.randint(t0, t1 + 1, (50,)).tolist() + [t0, t1]:
        expected = sf + (si - sf) * (1 - (t - t0) / (t1 - t0)) ** 3
        assert cubic_sparsity(t, sf, t0, t1, si) == pytest.approx(expected, abs=1e-12)
    assert cubic_sparsity(t0 - 1, sf, t0, t1, si) == si
    assert cubic_sparsity(t1 + 10, sf, t0, t1, si) == sf
    # monotone, steepest at the start
    s = [cubic_sparsity(t, sf, t0, t1, si) for t in range(t0, t1 + 1)]
    assert all(b >= a for a, b in zip(s, s[1:]))


def test_cubic_sparsity_with_an_empty_window_is_the_final_sparsity():
    assert cubic_sparsity(10, 0.9, 10, 10) == 0.9
    assert cubic_sparsity(9, 0.9, 10, 10) == 0.0


@pytest.mark.parametrize("kw,target", [({"target_compression": 20}, 0.95), ({"final_sparsity": 0.5}, 0.5),
                                       ({"target_compression": 100, "frequency": 7}, 0.99)])
def test_schedule_reaches_the_exact_global_sparsity(kw, target):
    torch.manual_seed(0)
    model = small_model()
    pruner = GradualMagnitudePruning(model, begin_step=3, end_step=40, **kw)
    total = sum(m.weight.numel() for m, _ in prunable_weights(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, 51):
        model(torch.randn(8, 1, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        s = pruner.step()
        assert s == pytest.approx(cubic_sparsity(step, target, 3, 40))
        if pruner._due(step):  # after a pruning step the mask holds exactly the schedule's count
            assert pruner.masked() == round(s * total)
    assert pruner.masked() == round(target * total)
    pruner.finish()
    zeros = sum(int((m.weight == 0).sum()) for m, _ in prunable_weights(model))
    assert zeros == round(target * total)
    assert pruner.compression() == pytest.approx(total / (total - round(target * total)))


def test_pruning_is_global_by_magnitude_and_permanent():
    torch.manual_seed(1)
    model = small_model()
    with torch.no_grad():
        model[5].weight.mul_(100.0)  # the last layer's weights are the largest: kept first
    before = torch.cat([m.weight.detach().flatten().abs() for m, _ in prunable_weights(model)])
    pruner = GradualMagnitudePruning(model, final_sparsity=0.6, begin_step=0, end_step=0)
    out = pruner.finish()
    assert out is model
    after = torch.cat([m.weight.detach().flatten() for m, _ in prunable_weights(model)])
    k = round(0.6 * before.numel())
    threshold = before.sort().values[k - 1]
    assert bool((after[before > threshold] != 0).all()) and int((after == 0).sum()) == k
    assert int((model[5].weight == 0).sum()) == 0
    for m, _ in prunable_weights(model):
        assert isinstance(m.weight, nn.Parameter) and not hasattr(m, "weight_mask") and not m._forward_pre_hooks
    assert pruner.finish() is model  # idempotent
    with pytest.raises(RuntimeError, match="after finish"):
        pruner.step()


def test_masked_weights_stay_zero_under_training():
    torch.manual_seed(2)
    model = small_model()
    pruner = GradualMagnitudePruning(model, target_compression=4, begin_step=0, end_step=2, frequency=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert pruner.sparsity() == pytest.approx(0.75, abs=1 / pruner.total)


@pytest.mark.parametrize("kw,match", [
    ({}, "exactly one"),
    ({"target_compression": 10, "final_sparsity": 0.9}, "exactly one"),
    ({"target_compression": 1.0}, "target_compression"),
    ({"target_compression": math.inf}, "target_compression"),
    ({"final_sparsity": 1.0}, "final_sparsity"),
    ({"final_sparsity": 0.0}, "final_sparsity"),
    ({"final_sparsity": 0.5, "begin_step": -1}, "begin_step"),
    ({"final_sparsity": 0.5, "begin_step": 10, "end_step": 5}, "end_step"),
    ({"final_sparsity": 0.5, "frequency": 0}, "frequency"),
    ({"final_sparsity": 0.5, "initial_sparsity": 1.5}, "initial_sparsity"),
])
def test_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        GradualMagnitudePruning(small_model(), **kw)


def test_a_model_without_prunable_weights_is_an_error():
    with pytest.raises(ValueError, match="model: .* no nn.Linear or nn.Conv2d"):
        GradualMagnitudePruning(nn.Sequential(nn.ReLU()), final_sparsity=0.5)
