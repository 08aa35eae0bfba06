"""The compression target (sparsevd.target.CompressionTarget, fit(target_compression=)): a small
MLP trained to a compression asked for ends within ±10 % of it, with the method's own mask
(log α < 3); the controller's arithmetic against its formula; the error messages."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsevd
from sparsevd.loss import SGVLB, kl_divergence
from sparsevd.target import CompressionTarget
from sparsevd.train import fit


def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 4, generator=torch.Generator().manual_seed(99))  # the same task for both splits
    return x, (x @ w).argmax(1)


class _Batches:
    def __init__(self, x, y, batch):
        self.x, self.y, self.batch, self.dataset = x, y, batch, range(len(x))

    def __len__(self):
        return len(self.x) // self.batch

    def __iter__(self):
        for i in range(len(self)):
            yield self.x[i * self.batch:(i + 1) * self.batch], self.y[i * self.batch:(i + 1) * self.batch]


def _mlp():
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))


@pytest.mark.parametrize("target", [5.0, 30.0])
def test_fit_reaches_the_target_with_the_methods_mask(target):
    torch.manual_seed(0)
    model = _mlp()
    summary = fit(model, _Batches(*_data(0, 1024), 64), _Batches(*_data(1, 512), 512), epochs=20,
                  pretrain_epochs=2, kl_warmup_epochs=2, lr=1e-2, target_compression=target, mc_samples=0)
    assert abs(summary["compression"] / target - 1) <= 0.10, summary["compression"]
    # the compression is the report's: log α < 3, the layers' own mask
    layers = [m for m in model.modules() if isinstance(m, sparsevd.nn.SVDO_LAYERS)]
    kept = sum(int((m.log_alpha < 3).sum()) for m in layers)
    assert summary["compression"] == pytest.approx(sum(m.weight.numel() for m in layers) / kept, rel=1e-12)
    assert summary["target_compression"] == target and summary["target_scope"] == "linear"
    assert summary["test_accuracy"] > 0.8
    last = summary["history"][-1]
    assert last["beta"] == pytest.approx(last["target_beta"])  # warm-up over: β is the controller's


class _Embedded(nn.Module):
    """An embedding (never pruned) in front of an MLP: scope="model" counts it as kept."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.mlp = _mlp()

    def forward(self, x):
        return self.mlp(x + self.emb.weight[:1])


def _train(model, x, y, steps, crit=None, ctl=None, lr=1e-2):
    """Adam over 64-example batches, the learning rate decaying linearly to 0; with ``crit`` the
    SGVLB (its β warming up over the first quarter), stepping ``ctl`` before every loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for k in range(steps):
        i = (k % (len(x) // 64)) * 64
        if crit is None:
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
        else:
            crit.epoch = k / (steps / 4)
            beta = ctl.step()
            assert crit.beta == pytest.approx(crit.warmup_beta * beta, rel=1e-12)
            loss = crit(model(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * (1 - (k + 1) / steps)


def test_a_hand_written_loop_reaches_a_whole_model_target():
    """Dense training, conversion, then SGVLB with the controller (scope "model": the embedding
    counts as kept) as a user's loop would do it."""
    torch.manual_seed(1)
    model = _Embedded()
    x, y = _data(2, 1024)
    _train(model, x, y, 100)
    sparsevd.convert(model.mlp)
    target, steps = 3.0, 300
    ctl = CompressionTarget(model, target, scope="model", ramp_steps=steps // 2)
    _train(model, x, y, steps, SGVLB(model, len(x), kl_warmup_epochs=1, target=ctl), ctl, lr=3e-3)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("log_sigma2"))
    pruned = sum(int((m.log_alpha >= 3).sum()) for m in model.modules() if isinstance(m, sparsevd.nn.SVDO_LAYERS))
    measured = total / (total - pruned)
    assert abs(measured / target - 1) <= 0.10, measured
    assert ctl.measured(ctl.count_kept()) == pytest.approx(measured, rel=1e-12)


def test_the_controller_is_a_pi_law_in_log_space():
    torch.manual_seed(2)
    model = sparsevd.convert(nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5)))
    ctl = CompressionTarget(model, 8.0, ramp_steps=4, kp=0.7, ki=0.3, beta_min=1e-3, beta_max=1e3)
    assert ctl.beta == 1.0 and ctl.compression is None
    total, integral = 300, 0.0
    for k, kept in enumerate([300, 150, 100, 20, 30, 37, 300]):
        setpoint = 8.0 ** (min(k, 4) / 4)
        error = math.log((total / kept) / setpoint)
        integral = min(max(integral + 0.3 * error, -math.log(1e3)), math.log(1e3))
        want = math.exp(min(max(-0.7 * error - integral, math.log(1e-3)), math.log(1e3)))
        assert ctl.setpoint() == pytest.approx(setpoint, rel=1e-12)
        assert ctl.step(kept) == pytest.approx(want, rel=1e-12), k
        assert ctl.compression == total / kept
    state = ctl.state_dict()
    twin = CompressionTarget(model, 8.0, ramp_steps=4, kp=0.7, ki=0.3, beta_min=1e-3, beta_max=1e3)
    twin.load_state_dict(state)
    assert twin.step(40) == ctl.step(40)
    # SGVLB multiplies the KL by the controller's β (times the warm-up's)
    crit = SGVLB(model, 100, kl_warmup_epochs=2, target=ctl)
    crit.epoch = 1.0
    logits, y = torch.randn(3, 5), torch.tensor([0, 4, 2])
    want = 100 * F.cross_entropy(logits, y) + 0.5 * ctl.beta * kl_divergence(model)
    torch.testing.assert_close(crit(logits, y), want, atol=1e-4, rtol=1e-6)


def test_anti_windup_drops_an_integral_that_holds_beta_down_once_behind():
    """A mask ahead of its setpoint winds the integral up (β < 1); once the setpoint overtakes
    it, the plain PI law keeps β below 1, with ``anti_windup`` the integral restarts from 0
    (β = exp(−kp·error) > 1) and then integrates the lag as before. Ahead, both are the same."""
    model = sparsevd.convert(nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5)))
    total = 300
    ahead = [int(torch.randint(90, 100, ()).item()) for _ in range(24)]  # 3.0-3.3x, the ramp 1x..2.8x
    behind = [int(torch.randint(110, 140, ()).item()) for _ in range(3)]  # 2.1-2.7x, the ramp at 2.8x..3.1x
    ctls = [CompressionTarget(model, 8.0, ramp_steps=48, kp=0.5, ki=0.2, anti_windup=aw) for aw in (False, True)]
    for kept in ahead:
        assert ctls[0].step(kept) == ctls[1].step(kept) < 1.0
    assert ctls[0].integral == ctls[1].integral > 0
    plain = integral = ctls[0].integral
    for kept in behind:
        error = math.log((total / kept) / ctls[0].setpoint())
        assert error < 0
        plain += 0.2 * error
        integral = min(integral + 0.2 * error, 0.0)
        b_plain, b_aw = ctls[0].step(kept), ctls[1].step(kept)
        assert b_plain == pytest.approx(math.exp(-0.5 * error - plain), rel=1e-12)
        assert b_aw == pytest.approx(math.exp(-0.5 * error - integral), rel=1e-12)
        assert b_aw > 1.0 > b_plain


def test_cubic_ramp_is_gradual_magnitude_prunings_schedule():
    """ramp="cubic": the setpoint's sparsity 1 − 1/c_k is s·(1 − (1 − k/R)³) (Zhu & Gupta 2017,
    eq. 1), s = 1 − 1/target, and the target from step R on."""
    model = sparsevd.convert(nn.Sequential(nn.Linear(10, 20)))
    target, ramp = 4.0 + 6.0 * torch.rand(()).item(), 40
    ctl = CompressionTarget(model, target, ramp_steps=ramp, ramp="cubic")
    got = []
    for k in range(ramp + 3):
        got.append(ctl.setpoint())
        want_sparsity = (1 - 1 / target) * (1 - (1 - min(k, ramp) / ramp) ** 3)
        assert 1 - 1 / got[-1] == pytest.approx(want_sparsity, rel=1e-9, abs=1e-12), k
        ctl.step(200)
    assert got[0] == 1.0 and got[-1] == target and got == sorted(got)
    # ahead of the geometric ramp at every step inside it (front-loaded)
    geo = CompressionTarget(model, target, ramp_steps=ramp)
    for k in range(1, ramp):
        geo.steps = k
        assert got[k] > geo.setpoint()


def test_count_kept_is_the_reports_count():
    torch.manual_seed(3)
    model = sparsevd.convert(nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Linear(40, 7)))
    for m in model.modules():
        if isinstance(m, sparsevd.nn.SVDO_LAYERS):
            with torch.no_grad():
                m.log_sigma2.uniform_(-12, 6)
    ctl = CompressionTarget(model, 4.0)
    assert ctl.count_kept() == sparsevd.report(model).nonzero
    assert ctl.measured(ctl.count_kept()) == pytest.approx(sparsevd.report(model).compression, rel=1e-12)


def test_errors_name_the_argument():
    model = sparsevd.convert(nn.Sequential(nn.Linear(4, 4)))
    for bad in (1.0, 0.5, float("inf"), "20", True):
        with pytest.raises(ValueError, match="target: expected a finite number > 1"):
            CompressionTarget(model, bad)
    with pytest.raises(ValueError, match=r"scope: expected one of \('linear', 'model'\)"):
        CompressionTarget(model, 5, scope="layers")
    with pytest.raises(ValueError, match="model: has no sparse-VD layers"):
        CompressionTarget(nn.Sequential(nn.Linear(4, 4)), 5)
    with pytest.raises(ValueError, match="ramp_steps: expected an integer ≥ 0"):
        CompressionTarget(model, 5, ramp_steps=-1)
    with pytest.raises(ValueError, match="ramp: expected one of"):
        CompressionTarget(model, 5, ramp_steps=10, ramp="linear")
    with pytest.raises(ValueError, match="ki: expected a finite gain ≥ 0"):
        CompressionTarget(model, 5, ki=-0.1)
    with pytest.raises(ValueError, match="beta_min, beta_max"):
        CompressionTarget(model, 5, beta_min=10, beta_max=1)
    with pytest.raises(ValueError, match="measure_every"):
        CompressionTarget(model, 5, measure_every=0)
    with pytest.raises(ValueError, match="threshold: expected a finite float"):
        CompressionTarget(model, 5, threshold=float("nan"))
    embedded = nn.Sequential(nn.Embedding(100, 4), sparsevd.convert(nn.Sequential(nn.Linear(4, 4))))
    with pytest.raises(ValueError, match=r"target: 2× of the whole model is out of reach.*1\.04×"):
        CompressionTarget(embedded, 2, scope="model")
    loader = _Batches(*_data(0, 64), 32)
    with pytest.raises(ValueError, match="target_compression: expected a compression > 1"):
        fit(_mlp(), loader, None, epochs=1, target_compression=1)
    with pytest.raises(ValueError, match="target_compression: needs method='sparse_vd'"):
        fit(_mlp(), loader, None, epochs=1, method="dense", target_compression=10)
    with pytest.raises(ValueError, match="target_scope: expected one of"):
        fit(_mlp(), loader, None, epochs=1, target_compression=10, target_scope="all")


def _assert_resume_is_exact(tmp_path, seed: int, stop_after: int, **fit_kwargs):
    """Train an MLP with ``fit(**fit_kwargs)`` (6 epochs, checkpoints) twice: uninterrupted, and
    stopped after epoch ``stop_after`` then resumed; the two end with the same parameters, bit for
    bit."""
    def run(out, stop=None, resume=False):
        torch.manual_seed(seed)
        model = _mlp()

        def on_epoch(row):
            if row["epoch"] == stop:
                raise KeyboardInterrupt

        fit(model, _Batches(*_data(0, 512), 64), None, epochs=6, pretrain_epochs=1, kl_warmup_epochs=1, lr=1e-2,
            mc_samples=0, checkpoint_dir=out, on_epoch=on_epoch, resume=resume, **fit_kwargs)
        return model

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=stop_after)
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_resumed_run_with_a_target_equals_the_uninterrupted_one(tmp_path):
    """The controller's state is in the checkpoint: stopped after epoch 3 and resumed, the run ends
    with the same parameters, bit for bit."""
    _assert_resume_is_exact(tmp_path, seed=4, stop_after=3, target_compression=8.0)


def test_a_run_resumed_while_holding_its_target_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """With train-time clipping the held mask is not in the checkpoint: the resumed controller
    takes it from the parameters at its next step, which hold() kept equal to it."""
    held = []
    step = CompressionTarget.step

    def record(self, kept=None):
        out = step(self, kept)
        held.append(self.holding)
        return out

    monkeypatch.setattr(CompressionTarget, "step", record)
    _assert_resume_is_exact(tmp_path, seed=4, stop_after=5, target_compression=4.0, train_clip=True)
    # the uninterrupted run (first: 5 sparse-VD epochs of 8 steps) held before the stop (step 32)
    assert not held[0] and held[31]


def test_fit_shows_the_compression_of_every_step_from_the_kl_pass(monkeypatch):
    """fit's progress bar shows, after every step of the sparse-VD phase, the compression of the
    converted layers and of the whole model (the embedding counted as kept) that the report gives
    for the parameters the step's KL saw, counted in the KL's own pass: the controller counts
    nothing itself (count_kept is never called) and no kept_count pass runs in the loop."""
    import sparsevd.train as T

    shown, measured = [], []
    fields = T._progress_fields

    def record_fields(r, mean_loss, phase_svd):
        out = fields(r, mean_loss, phase_svd)
        shown.append((phase_svd, out))
        return out

    kl = SGVLB.kl

    def measure_then_kl(self):
        rep = sparsevd.report(self.model[0])  # the parameters this step's KL reads
        measured.append((f"{rep.compression:.1f}x", f"{rep.model_compression:.1f}x"))
        return kl(self)

    def no_count(self):
        raise AssertionError("the controller counted the kept weights with a pass of its own")

    monkeypatch.setattr(T, "_progress_fields", record_fields)
    monkeypatch.setattr(T, "PROGRESS_REFRESH_S", 0.0)  # the fields after every step
    monkeypatch.setattr(SGVLB, "kl", measure_then_kl)
    monkeypatch.setattr(CompressionTarget, "count_kept", no_count)
    torch.manual_seed(5)
    model = _Embedded()
    loader = _Batches(*_data(0, 512), 64)
    fit(model, loader, None, epochs=3, pretrain_epochs=1, kl_warmup_epochs=1, lr=1e-2, progress=True,
        mc_samples=0, target_compression=4.0, target_scope="model")
    svd_rows = [out for phase, out in shown if phase]
    assert len(svd_rows) == 2 * len(loader) == len(measured)
    assert all(set(out) == {"loss"} for phase, out in shown if not phase)
    for out, (linear, whole) in zip(svd_rows, measured):
        assert (out["compression"], out["model"]) == (linear, whole)
        assert "beta" in out
    assert len({out["compression"] for out in svd_rows}) > 1  # it moves from step to step


def test_fit_reads_the_progress_fields_only_when_the_bar_can_redraw(monkeypatch):
    """The kept count is read (a host sync on a GPU) at most every PROGRESS_REFRESH_S seconds:
    with an interval longer than the run, once per epoch, after its first step."""
    import sparsevd.train as T

    calls = []
    fields = T._progress_fields

    def record_fields(r, mean_loss, phase_svd):
        calls.append(phase_svd)
        return fields(r, mean_loss, phase_svd)

    monkeypatch.setattr(T, "_progress_fields", record_fields)
    monkeypatch.setattr(T, "PROGRESS_REFRESH_S", 1e9)
    torch.manual_seed(7)
    loader = _Batches(*_data(0, 512), 64)
    fit(_Embedded(), loader, None, epochs=3, pretrain_epochs=1, kl_warmup_epochs=1, lr=1e-2, progress=True,
        mc_samples=0)
    assert calls == [False, True, True]


def test_sgvlb_exposes_the_kept_counts_of_its_kl():
    """SGVLB.kept after a loss: the per-layer counts of the KL's own pass (each layer's threshold),
    equal to the report's rows; the loss and its gradients are those with kl_divergence; a step
    at β = 0 evaluates no KL and leaves no counts."""
    torch.manual_seed(6)
    model = sparsevd.convert(nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 7)))
    layers = [m for m in model.modules() if isinstance(m, sparsevd.nn.SVDO_LAYERS)]
    with torch.no_grad():
        for m in layers:
            m.log_sigma2.uniform_(-12, 6)
    layers[1].threshold = 0.5
    crit = SGVLB(model, 100, kl_warmup_epochs=0)
    assert crit.kept is None
    x, y = torch.randn(5, 30), torch.randint(0, 7, (5,))
    data = F.cross_entropy(model.eval()(x), y)
    loss = crit.with_kl(data)
    rep = sparsevd.report(model)
    assert crit.kept.tolist() == [r.nonzero for r in rep.layers]
    want = 100 * data + kl_divergence(model)
    assert torch.equal(loss, want)
    g = torch.autograd.grad(loss, [m.log_sigma2 for m in layers], retain_graph=True)
    g_want = torch.autograd.grad(want, [m.log_sigma2 for m in layers])
    assert all(torch.equal(a, b) for a, b in zip(g, g_want))
    warm = SGVLB(model, 100, kl_warmup_epochs=1)
    assert torch.equal(warm.with_kl(data), 100 * data) and warm.kept is None


# ------------------------------------------------------------- fixed-mask fine-tuning (issue 23 item 5)
from sparsevd.loss import svdo_layers  # noqa: E402
from sparsevd.train import freeze_mask, hold_mask  # noqa: E402


def test_finetune_trains_the_kept_weights_with_the_methods_mask_frozen():
    """The last finetune_epochs: the mask and log σ² of the end of the sparse-VD phase stay bit for
    bit, the dropped θ too, the kept θ move, no KL term (β None), and the evaluation is the
    deterministic masked forward x (θ ⊙ mask)ᵀ + b of those weights."""
    torch.manual_seed(3)
    model = _mlp()
    seen = {}

    def on_epoch(row):
        if row["epoch"] == 4:  # the last sparse-VD epoch
            seen["before"] = [(l.mask().clone(), l.log_sigma2.detach().clone(), l.weight.detach().clone())
                              for _, l in svdo_layers(model)]

    x_test, y_test = _data(1, 512)
    summary = fit(model, _Batches(*_data(0, 1024), 64), _Batches(x_test, y_test, 512), epochs=7,
                  pretrain_epochs=1, kl_warmup_epochs=1, lr=1e-2, target_compression=10.0,
                  finetune_epochs=3, mc_samples=0, on_epoch=on_epoch)
    assert [r["phase"] for r in summary["history"]] == ["dense"] + ["sparse_vd"] * 3 + ["finetune"] * 3
    assert all(r["beta"] is None and r["target_beta"] is None for r in summary["history"][4:])
    assert summary["finetune_epochs"] == 3
    moved = 0
    for (mask, log_sigma2, weight), (_, layer) in zip(seen["before"], svdo_layers(model)):
        assert torch.equal(layer.mask(), mask)
        assert torch.equal(layer.log_sigma2, log_sigma2) and not layer.log_sigma2.requires_grad
        assert torch.equal(layer.weight[~mask], weight[~mask])
        moved += int((layer.weight[mask] != weight[mask]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m, _, _ in seen["before"])
    assert summary["compression"] > 5
    # the accuracy is that of the plain masked network
    h = x_test
    with torch.no_grad():
        for i, (_, layer) in enumerate(svdo_layers(model)):
            h = F.linear(h, layer.weight * (layer.log_alpha < 3), layer.bias)
            h = h.relu() if i < 2 else h
    assert summary["test_accuracy"] == pytest.approx(float((h.argmax(1) == y_test).double().mean()), abs=1e-12)


def test_hold_mask_keeps_a_shrinking_kept_weight_kept():
    """A kept θ pushed below its floor sqrt(1.01 · exp(log σ² − threshold)) comes back to it with
    its sign (log α stays < threshold); dropped and large θ are left alone."""
    torch.manual_seed(5)
    layer = sparsevd.nn.LinearSVDO(40, 30)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.empty(30, 40).uniform_(-12.0, 0.0))
    frozen = freeze_mask(model)
    mask = frozen[0][1]
    assert torch.equal(mask, layer.log_alpha < 3) and 0 < int(mask.sum()) < mask.numel()
    floor = torch.sqrt(1.01 * torch.exp(layer.log_sigma2.detach() - 3))
    assert torch.allclose(frozen[0][2], floor, rtol=1e-6)
    before = layer.weight.detach().clone()
    shrink = mask & (torch.rand(30, 40) < 0.5)
    with torch.no_grad():
        layer.weight[shrink] *= 1e-4  # an optimiser step that would cross the threshold
        zero = shrink & (torch.rand(30, 40) < 0.1)
        layer.weight[zero] = 0.0
    hold_mask(frozen)
    assert torch.equal(layer.log_alpha < 3, mask)
    w = layer.weight.detach()
    assert torch.equal(w[~mask], before[~mask])
    low = shrink & (before.abs() * 1e-4 < floor)
    assert torch.allclose(w[low].abs(), floor[low], rtol=1e-6)
    assert torch.equal(torch.sign(w[low & ~zero]), torch.sign(before[low & ~zero]))
    assert bool((w[zero] > 0).all())  # an exact 0 comes back at +floor (copysign of +0)
    untouched = mask & ~shrink
    assert torch.equal(w[untouched], before[untouched])


def test_the_controller_holds_the_mask_once_the_target_is_reached():
    """hold_at_target: hold() is a no-op until a step measures the target; from then on β = 1, a held
    weight whose θ shrank past the threshold is raised back to its floor (with the log σ² of
    that moment), a dropped one that came back gets its log σ² raised, the others are left
    alone, and the compression stays the one measured."""
    torch.manual_seed(8)
    model = sparsevd.convert(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10)))
    layers = [m for m in model.modules() if isinstance(m, sparsevd.nn.SVDO_LAYERS)]
    for m in layers:
        with torch.no_grad():
            m.log_sigma2.copy_(torch.empty_like(m.log_sigma2).uniform_(-8.0, 4.0))
    ctl = CompressionTarget(model, 3.0, hold_at_target=True)
    measured = ctl.measured(ctl.count_kept())
    assert 1.5 < measured < 6.0
    ctl.target = measured * 1.01  # not reached: hold does nothing
    ctl.step()
    assert not ctl.holding
    before = [m.weight.detach().clone() for m in layers]
    with torch.no_grad():
        layers[0].weight.mul_(0.5)
    ctl.hold()
    assert torch.equal(layers[0].weight, before[0] * 0.5)
    ctl.target = measured * 0.99  # reached: the mask of this step is held
    with torch.no_grad():
        layers[0].weight.copy_(before[0])
    masks = [m.log_alpha < 3 for m in layers]
    assert ctl.step() == 1.0 and ctl.holding  # β = 1 once holding (it would be < 1 here: e > 0)
    shrink = [keep & (torch.rand(keep.shape) < 0.5) for keep in masks]
    back = [~keep & (torch.rand(keep.shape) < 0.5) for keep in masks]
    with torch.no_grad():
        for m, s, b in zip(layers, shrink, back):
            m.weight[s] *= 1e-4  # an optimiser step that drops half the kept weights
            m.weight[b] = 1.0  # and brings dropped ones back
            m.log_sigma2.add_(0.5)  # log σ² still trains: the floor follows it
    returned = [(m.log_alpha < 3) & b for m, b in zip(layers, back)]
    assert all(bool(r.any()) for r in returned)
    sigma_before = [m.log_sigma2.detach().clone() for m in layers]
    ctl.hold()
    for m, keep, s, w0, r, ls0 in zip(layers, masks, shrink, before, returned, sigma_before):
        assert torch.equal(m.log_alpha < 3, keep)
        assert torch.equal(m.weight.detach()[r], torch.ones(int(r.sum())))  # θ left, log σ² raised
        assert bool((m.log_sigma2.detach()[r] > ls0[r]).all())
        assert torch.equal(m.log_sigma2.detach()[~r], ls0[~r])
        w = m.weight.detach()
        floor = torch.sqrt(1.01 * torch.exp(m.log_sigma2.detach() - 3))
        low = s & (w0.abs() * 1e-4 < floor)
        assert bool(low.any())
        assert torch.allclose(w[low].abs(), floor[low], rtol=1e-6)
        assert torch.equal(torch.sign(w[low]), torch.sign(w0[low]))
        dropped = ~keep & ~m.weight.detach().eq(1.0)
        assert torch.equal(w[dropped], w0[dropped])
    assert ctl.measured(ctl.count_kept()) == pytest.approx(measured)
    state = ctl.state_dict()
    fresh = CompressionTarget(model, ctl.target, hold_at_target=True)
    fresh.load_state_dict(state)
    assert fresh.holding and fresh.steps == ctl.steps


def test_fit_with_train_clip_stops_at_the_target():
    """With train-time clipping a dropped weight cannot return, so without the hold the
    compression runs past the target (here 20.6× for 20×; LeNet-300-100: 136× for 100×); fit
    holds the mask from the step that reaches it (20.01×)."""
    torch.manual_seed(0)
    model = _mlp()
    summary = fit(model, _Batches(*_data(0, 1024), 64), _Batches(*_data(1, 512), 512), epochs=20,
                  pretrain_epochs=2, kl_warmup_epochs=2, lr=1e-2, target_compression=20.0, mc_samples=0,
                  train_clip=True)
    assert 1.0 <= summary["compression"] / 20.0 <= 1.005, summary["compression"]
    assert summary["test_accuracy"] > 0.8


def test_finetune_errors_name_the_argument():
    loader = _Batches(*_data(0, 256), 64)
    with pytest.raises(ValueError, match="finetune_epochs: expected an int ≥ 0"):
        fit(_mlp(), loader, None, epochs=4, finetune_epochs=-1)
    with pytest.raises(ValueError, match="finetune_epochs: needs method='sparse_vd'"):
        fit(_mlp(), loader, None, epochs=4, method="dense", finetune_epochs=1)
    with pytest.raises(ValueError, match="finetune_epochs: expected pretrain_epochs \\+ finetune_epochs < epochs"):
        fit(_mlp(), loader, None, epochs=4, pretrain_epochs=2, finetune_epochs=2)


def test_a_run_resumed_in_its_finetuning_equals_the_uninterrupted_one(tmp_path):
    _assert_resume_is_exact(tmp_path, seed=6, stop_after=5,  # inside the fine-tuning
                            target_compression=6.0, finetune_epochs=2)
