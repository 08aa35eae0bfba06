"""Training-step benchmark: one step of sparse-VD training against dense training and the naive
PyTorch code a user would write (../shared/BENCHMARKS.md; targets and notes in benchmarks/NOTES.md).

Workloads (fp32):
  - ``lenet300``: a full step (forward, SGVLB or cross-entropy, backward, Adam: the fused one of sparsevd.train.adam for every provider) of LeNet-300-100
    at batch 100 (Fashion-MNIST-shaped random data);
  - ``lenet5``: the same for LeNet-5-Caffe at batch 100;
  - ``1024``: forward + backward of one 1024x1024 layer at batch 256;
  - ``4096``: forward + backward of one 4096x4096 layer at batch 64.
Providers:
  - ``dense``: nn.Linear / nn.Conv2d, cross-entropy (the layer workloads: sum of the output);
  - ``reference``: sparsevd's layers (convert + SGVLB) with SPARSEVD_BACKEND=reference;
  - ``reference_compiled``: torch.compile (default mode) of the plain-PyTorch naive formulation:
    the LRT written out (two matmuls, x², exp, sqrt, randn_like) and the eq. 14 KL written out;
  - ``sparsevd``: sparsevd's layers (convert + SGVLB) with the default backend (``auto``: the
    native C++ kernels on CPU tensors when built, Triton on CUDA tensors).
All providers of a workload are timed interleaved in rounds in one process (each round: a block of
steps per provider), medians with p20/p80 over the rounds, at each thread count of ``--threads``.

Usage: python -m benchmarks.bench_train_step [--workloads lenet300 lenet5 1024 4096]
       [--providers dense reference reference_compiled sparsevd] [--threads 1 2] [--rounds 20]
       [--steps 10] [--device cpu|cuda] [--default-heap] [--quick] [--out FILE] [--no-save]
       [--dry-run]
CPU runs use the heap settings of sparsevd.allocator.keep_freed_memory() (as fit() does) unless
--default-heap; every row records which (``keep_freed_memory``).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsevd.allocator import keep_freed_memory
from sparsevd.train import adam

from . import common

WORKLOADS = ("lenet300", "lenet5", "1024", "4096")
PROVIDERS = ("dense", "reference", "reference_compiled", "sparsevd")
K1, K2, K3 = 0.63576, 1.87320, 1.48695


# ------------------------------------------------------------------ the naive formulation
class NaiveLinearSVDO(nn.Module):
    """What a user writes: the LRT and nothing fused."""

    def __init__(self, dense: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach().clone())
        self.bias = nn.Parameter(dense.bias.detach().clone())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, -10.0))

    def forward(self, x):
        mu = F.linear(x, self.weight, self.bias)
        s2 = F.linear(x * x, torch.exp(self.log_sigma2))
        return mu + torch.sqrt(s2 + 1e-8) * torch.randn_like(mu)

    def kl(self):
        la = torch.clamp(self.log_sigma2 - torch.log(self.weight ** 2 + 1e-8), -10, 10)
        return -(K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1).sum()


class NaiveConv2dSVDO(NaiveLinearSVDO):
    def __init__(self, dense: nn.Conv2d):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(dense.weight.detach().clone())
        self.bias = nn.Parameter(dense.bias.detach().clone())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, -10.0))
        self.args = (dense.stride, dense.padding, dense.dilation, dense.groups)

    def forward(self, x):
        mu = F.conv2d(x, self.weight, self.bias, *self.args)
        s2 = F.conv2d(x * x, torch.exp(self.log_sigma2), None, *self.args)
        return mu + torch.sqrt(s2 + 1e-8) * torch.randn_like(mu)


def naive(model: nn.Module) -> nn.Module:
    """``model`` with its nn.Linear / nn.Conv2d replaced by the naive LRT modules."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, NaiveLinearSVDO(child))
        elif type(child) is nn.Conv2d:
            setattr(model, name, NaiveConv2dSVDO(child))
        else:
            naive(child)
    return model


# --------------------------------------------------------------------------- workloads
def _dense_model(workload: str) -> nn.Module:
    import sparsevd

    if workload in ("lenet300", "lenet5"):
        return sparsevd.models.build_model(workload, svd=False)
    n = int(workload)
    return nn.Sequential(nn.Linear(n, n))


def _batch(workload: str, device):
    if workload in ("lenet300", "lenet5"):
        return torch.randn(100, 1, 28, 28, device=device), torch.randint(0, 10, (100,), device=device)
    n = int(workload)
    return torch.randn(256 if n == 1024 else 64, n, device=device), None


def make_step(workload: str, provider: str, device) -> Callable[[], float]:
    """A closure running one training step of ``workload`` with ``provider``; returns the loss."""
    import sparsevd

    torch.manual_seed(0)
    model = _dense_model(workload).to(device)
    x, y = _batch(workload, device)
    full = y is not None
    train_size = 60000
    if provider == "dense":
        def loss_fn():
            out = model(x)
            return F.cross_entropy(out, y) * train_size if full else out.sum()
    elif provider == "reference_compiled":
        model = naive(model).to(device)
        layers = [m for m in model.modules() if isinstance(m, NaiveLinearSVDO)]

        def raw_loss():
            out = model(x)
            data = F.cross_entropy(out, y) * train_size if full else out.sum()
            return data + sum(m.kl() for m in layers)

        loss_fn = torch.compile(raw_loss)
    else:
        backend = "reference" if provider == "reference" else os.environ.get("SPARSEVD_BACKEND", "auto")
        model = sparsevd.convert(model)
        sgvlb = sparsevd.SGVLB(model, train_size, kl_warmup_epochs=0)

        def loss_fn():
            os.environ["SPARSEVD_BACKEND"] = backend
            out = model(x)
            if full:
                return sgvlb(out, y)
            return out.sum() + sparsevd.kl_divergence(model)
    model.train()
    opt = adam(model.parameters(), 1e-3)  # the same (fused) Adam for every provider, as fit()

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if full:
            opt.step()
        return float(loss.detach()) if device.type == "cuda" else loss

    return step


def bench(workload: str, providers: List[str], device, threads: int, rounds: int,
          steps: int, env: dict) -> List[dict]:
    torch.set_num_threads(threads)
    fns = {p: make_step(workload, p, device) for p in providers}
    saved = os.environ.get("SPARSEVD_BACKEND")
    try:
        for fn in fns.values():  # warm-up (compilation, allocator, oneDNN primitives)
            for _ in range(3):
                fn()
        samples: Dict[str, List[float]] = {p: [] for p in fns}
        for _ in range(rounds):
            for p, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples[p].append(1e3 * (time.perf_counter() - t0) / steps)
    finally:
        if saved is None:
            os.environ.pop("SPARSEVD_BACKEND", None)
        else:
            os.environ["SPARSEVD_BACKEND"] = saved
    import sparsevd

    backend = sparsevd.train.backend_name(sparsevd.convert(_dense_model(workload)).to(device), device)
    rows = []
    for p, v in samples.items():
        v = sorted(v)
        q = lambda f: v[min(int(f * len(v)), len(v) - 1)]  # noqa: E731
        rows.append(common.make_row(
            f"{workload}_train_step" if workload.startswith("lenet") else "lrt_linear_layer_step",
            "batch=100" if workload.startswith("lenet") else
            (f"M=256,K=1024,N=1024" if workload == "1024" else "M=64,K=4096,N=4096"),
            "float32", "full" if workload.startswith("lenet") else "fwd+bwd", p,
            [q(0.5), q(0.2), q(0.8)], {**env, "threads": threads},
            batch=100 if workload.startswith("lenet") else (256 if workload == "1024" else 64),
            rounds=rounds, steps_per_round=steps,
            backend=backend if p == "sparsevd" else ("reference" if p == "reference" else None),
            load=round(os.getloadavg()[0], 2)))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=10, help="steps per provider per round")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--default-heap", action="store_true",
                    help="keep glibc's default trim/mmap thresholds (no sparsevd.allocator."
                         "keep_freed_memory(), which fit() calls for CPU training)")
    common.add_common_args(ap)
    args = common.parse_args(ap, argv)
    if args.quick:
        args.rounds, args.steps = min(args.rounds, 3), min(args.steps, 3)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    env = common.environment(args.device)
    # the heap settings fit() uses for CPU training (process-wide: every provider runs under them)
    env["keep_freed_memory"] = (device.type == "cpu" and not args.default_heap
                                and keep_freed_memory())
    rows: List[dict] = []
    for threads in args.threads:
        for w in args.workloads:
            rows += bench(w, args.providers, device, threads, args.rounds, args.steps, env)
            common.print_rows([r for r in rows if r["threads"] == threads and r["shape"] == rows[-1]["shape"]
                               and r["benchmark"] == rows[-1]["benchmark"]])
    if not args.no_save:
        print("saved to", common.save_rows(rows, args.device, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
