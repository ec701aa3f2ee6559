"""What the benchmark scripts share: the process environment zsq's console script uses, and where the
real assets of ``../shared`` live (see ``../shared/ASSETS.md``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "data" / "cifar10-test" / "cifar10_test.npz"
IMAGENET = SHARED / "data" / "imagenet-sample-500"
RESNET_WEIGHTS = {
    "cifar_resnet20": SHARED / "models" / "resnet-cifar10-akamaster" / "resnet20-12fca82f.th",
    "cifar_resnet32": SHARED / "models" / "resnet-cifar10-akamaster" / "resnet32-d509ac18.th",
}


def ensure_runtime_env() -> None:
    """Re-execute the running script once with zsq's runtime environment (:data:`zsq.cli.RUNTIME_ENV`:
    glibc allocator thresholds and ``OMP_WAIT_POLICY=PASSIVE``), which must be set before the process
    starts; values the user set are kept."""
    from zsq.cli import RUNTIME_ENV

    if any(k not in os.environ for k in RUNTIME_ENV) and os.environ.get("ZSQ_BENCH_REEXEC") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**RUNTIME_ENV, **os.environ, "ZSQ_BENCH_REEXEC": "1"})
