"""Data-parallel training on torch.distributed: `torchrun --nproc-per-node 2 -m sparsevd train`
with 2 gloo ranks on the CPU, against a single-process run with the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import _train_args, data_dir  # noqa: F401  (the data fixture)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv, out: Path, ranks: int):
    cmd = [sys.executable, "-m", "sparsevd"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "sparsevd"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + argv, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads((out / "summary.json").read_text()), r


@pytest.mark.parametrize("backend", [
    "gloo", pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                         reason="NCCL needs a GPU per rank: 2 GPUs"))])
def test_two_ranks_match_one_process_with_the_global_batch(tmp_path, data_dir, backend):  # noqa: F811
    """2 ranks (gloo on the CPU; NCCL with each rank on its GPU, the Triton kernels) against one
    process with the global batch."""
    device = ["--threads", "1"] if backend == "gloo" else ["--device", "cuda"]
    args = ["--epochs", "3", "--pretrain-epochs", "1", "--batch-size", "50", *device]
    one, _ = _run(_train_args(data_dir, tmp_path / "one", *args), tmp_path / "one", 1)
    two, r = _run(_train_args(data_dir, tmp_path / "two", *args), tmp_path / "two", 2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["device"] == ("cpu" if backend == "gloo" else "cuda")
    assert two["ranks_in_sync"] is True  # both ranks end with bit-identical parameters
    assert r.stdout.count("sparsevd train:") == 1 and r.stdout.count("epoch   1/3") == 1  # rank 0 prints
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir())  # written once, by rank 0
    # the dense epoch sees the same global batches: the same loss up to rounding; the sparse-VD
    # epochs differ by the noise (each rank its own stream) only
    l1 = torch.tensor([h["loss"] for h in one["history"]])
    l2 = torch.tensor([h["loss"] for h in two["history"]])
    assert abs(l1[0] - l2[0]) <= 1e-3 * abs(l1[0])
    assert ((l1[1:] - l2[1:]).abs() / l1[1:].abs()).max() < 0.1, (l1, l2)
    assert abs(one["test_accuracy"] - two["test_accuracy"]) < 0.1
    assert abs(one["compression"] - two["compression"]) / one["compression"] < 0.1


def test_uneven_global_batch_is_refused(tmp_path, data_dir):  # noqa: F811
    from sparsevd.data import make_loaders

    with pytest.raises(ValueError, match="batch_size: the global batch 7 must be divisible by the number of processes 2"):
        make_loaders("fashion-mnist", 7, data_dir=data_dir, download=False, world_size=2, rank=0)


def test_more_cuda_ranks_than_gpus_is_refused(monkeypatch):
    """A second CUDA process on a one-GPU node gets an error naming --nproc-per-node, before NCCL
    or torch.cuda.set_device see an invalid ordinal."""
    from sparsevd import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(RuntimeError, match=r"--nproc-per-node: process LOCAL_RANK=1 has no GPU .*1 visible"):
        distributed.init_from_env("cuda")
