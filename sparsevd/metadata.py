"""Run metadata recorded with every training summary and benchmark row: the machine, the versions
and the commit."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = ["cpu_name", "device_name", "git_commit", "versions"]


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """torch's name of a CUDA device, or the CPU model for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def git_commit(short: bool = True) -> Optional[str]:
    """The commit of the sparsevd source tree (None outside a git checkout)."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def versions() -> Dict[str, Optional[str]]:
    """{"torch", "triton", "sparsevd"} versions (triton None when it is not installed)."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except Exception:  # not installed, or broken
        triton_version = None
    from ._version import __version__

    return {"torch": torch.__version__, "triton": triton_version, "sparsevd": __version__}
