"""sparsevd.optim.SparseVDAdam: Adam on the data term with the KL of sparse VD applied by the step
(log σ²'s part inside Adam, θ's part preconditioned by the data's second moment), checked against
the same update written out with torch.optim.Adam and the reference KL."""
import pytest
import torch
from torch import nn

from sparsevd.nn import LinearSVDO
from sparsevd.optim import SparseVDAdam
from sparsevd.reference import log_alpha, neg_kl_from_log_alpha


def model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(LinearSVDO(12, 9), nn.Tanh(), LinearSVDO(9, 5))
    with torch.no_grad():  # log α spread over [-6, 2]: both the steep and the flat part of the KL
        for m in net:
            if isinstance(m, LinearSVDO):
                m.log_sigma2.copy_(torch.log(m.weight ** 2 + 1e-8) + torch.empty_like(m.weight).uniform_(-6, 2))
    return net


def data_loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()  # deterministic: the reference and the optimizer see the same data gradient
    return (net(x) ** 2).mean()


def reference_kl(net: nn.Module, detach_weight: bool, detach_log_sigma2: bool) -> torch.Tensor:
    total = 0
    for m in net:
        if isinstance(m, LinearSVDO):
            w = m.weight.detach() if detach_weight else m.weight
            s = m.log_sigma2.detach() if detach_log_sigma2 else m.log_sigma2
            total = total - neg_kl_from_log_alpha(log_alpha(w, s)).sum()
    return total


def layers(net):
    return [m for m in net if isinstance(m, LinearSVDO)]


@pytest.mark.parametrize("kl_weight", [3e-4, 0.05])
def test_step_matches_the_written_out_update(kl_weight):
    net, ref = model(1), model(1)
    opt = SparseVDAdam(net.parameters(), net, lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for step in range(4):
        x = torch.randn(16, 12)
        opt.zero_grad()
        data_loss(net, x).backward()
        opt.step(kl_weight=kl_weight)

        # the reference: θ's KL gradient at the parameters before the step ...
        g_theta = torch.autograd.grad(kl_weight * reference_kl(ref, False, True),
                                      [m.weight for m in layers(ref)])
        # ... log σ²'s part of the KL inside Adam with the data term ...
        ref_opt.zero_grad()
        (data_loss(ref, x) + kl_weight * reference_kl(ref, True, False)).backward()
        ref_opt.step()
        # ... θ's part after it, divided by the data's own bias-corrected second moment
        with torch.no_grad():
            for m, g in zip(layers(ref), g_theta):
                st = ref_opt.state[m.weight]
                v = st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))
                shrink = 1e-2 * g.abs() / (v.sqrt() + 1e-8)
                m.weight.copy_(torch.sign(m.weight) * torch.clamp(m.weight.abs() - shrink, min=0))
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=name)
    moved = sum((p - q).abs().sum() for p, q in zip(net.parameters(), model(1).parameters()))
    assert moved > 0.01


def test_closure_gives_the_data_gradients():
    net, ref = model(6), model(6)
    opt, ref_opt = SparseVDAdam(net.parameters(), net, lr=1e-2), SparseVDAdam(ref.parameters(), ref, lr=1e-2)
    x = torch.randn(8, 12)

    def closure():
        opt.zero_grad()
        loss = data_loss(net, x)
        loss.backward()
        return loss

    loss = opt.step(closure, kl_weight=0.01)
    ref_opt.zero_grad()
    want = data_loss(ref, x)
    want.backward()
    ref_opt.step(kl_weight=0.01)
    torch.testing.assert_close(loss, want)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_kl_weight_zero_is_plain_adam():
    net, ref = model(2), model(2)
    opt, ref_opt = SparseVDAdam(net.parameters(), net, lr=3e-3), torch.optim.Adam(ref.parameters(), lr=3e-3)
    for _ in range(3):
        x = torch.randn(8, 12)
        for n, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            data_loss(n, x).backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_pull_stops_at_zero():
    """Weights with no data gradient (v = 0) under a strong KL end at exactly 0, not past it."""
    net = model(3)
    opt = SparseVDAdam(net.parameters(), net, lr=1e-2)
    opt.zero_grad()
    (0 * net(torch.randn(4, 12)).sum()).backward()
    opt.step(kl_weight=1.0)
    for m in layers(net):
        assert bool((m.weight == 0).all())


def test_the_weights_the_data_holds_move_least():
    """One step, a KL weight that moves weights by a fraction of their size: the second layer's
    last output unit, which the loss ignores, shrinks by much more than the units it uses."""
    net = model(5)
    before = layers(net)[1].weight.detach().clone()
    opt = SparseVDAdam(net.parameters(), net, lr=1e-3)
    x = torch.randn(64, 12)
    for _ in range(3):  # Adam's second moment from a few data gradients
        opt.zero_grad()
        (net(x)[:, :4] ** 2).mean().backward()
        opt.step()
    opt.zero_grad()
    (net(x)[:, :4] ** 2).mean().backward()
    opt.step(kl_weight=1e-6)
    after = layers(net)[1].weight.detach()
    unused = (1 - after[4].abs() / before[4].abs()).mean()
    used = (1 - after[:4].abs() / before[:4].abs()).abs().mean()
    assert unused > 0.5 and used < 0.1 * unused, (unused, used)


def test_errors():
    net = model(4)
    with pytest.raises(ValueError, match="layers"):
        SparseVDAdam(net.parameters(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="log_sigma2"):
        SparseVDAdam([m.weight for m in layers(net)], net)
    opt = SparseVDAdam(net.parameters(), net)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kl_weight"):
            opt.step(kl_weight=bad)
