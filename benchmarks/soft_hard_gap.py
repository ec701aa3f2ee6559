"""How much of what AdaRound / BRECQ learns survives rounding? The soft-versus-hard gap, unit by unit.

Runs ``benchmarks/recovery_recipe.py`` with the same arguments and, for every reconstruction unit, measures the
reconstruction error (BRECQ's: squared error summed over channels, averaged over the rest) on the unit's learning
inputs, with every activation quantizer on (no QDrop) and the learned step sizes, three ways:

* ``near``: nearest rounding of the unit's weights;
* ``soft``: the soft roundings ``h(V)`` the optimisation ended with (what its last steps saw);
* ``hard``: the integer codes that are baked into the model (``LearnedRounding.codes``).

It prints one ``SOFTHARD`` line per unit (JSON) and writes them with ``--gap-out``. A large soft-to-hard gap means
the annealing of the rounding regulariser did not finish within the steps, and rounding the undecided variables
at the end discards the fit (docs/recovery.md, session 26: on EfficientNet-Lite0 W4A8, ``_blocks.0`` ends at 1.5
soft against 58 hard, 70 with nearest rounding). With ``harden`` the two are equal by construction.

    PYTHONPATH=src .venv/bin/python benchmarks/soft_hard_gap.py --model efficientnet_lite0 --wbits 4 --abits 8 \\
        --calib-batches 4 --real-holdout 64 --depthwise-estimator output_mse --threads 1 --seed 0 \\
        --candidates brecq --out runs/gap_recipe.json --gap-out runs/gap.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

import zsq.recover.brecq as brecq
from zsq.recover.blocks import quantized_weight, reconstruction_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery_recipe  # noqa: E402

CHUNK = 32  # inputs per no-gradient pass
ROWS: list[dict[str, Any]] = []


def _measured(optimize_unit: Any) -> Any:
    def wrapped(runner: Any, x: torch.Tensor, target: torch.Tensor, *, roundings: dict, steps: dict,
                **kw: Any) -> dict[str, Any]:
        info = optimize_unit(runner, x, target, roundings=roundings, steps=steps, **kw)

        def act_fn(name: str, mod: Any, t: torch.Tensor) -> torch.Tensor:
            s = steps.get(name)
            return s(t) if s is not None else mod(t)

        def weight(mode: str, name: str, mod: Any) -> torch.Tensor:
            r = roundings.get(name)
            if r is None:
                return quantized_weight(name, mod)
            if mode == "soft":
                return r.soft_weight()
            if mode == "hard":
                codes = r.codes()
            else:  # nearest rounding of the float weight, which is not baked yet
                codes = torch.clamp(torch.round(r.layer.weight / r.scale) + r.zero, r.qmin, r.qmax)
            return (codes.to(r.floor.dtype) - r.zero) * r.current_scale()

        row: dict[str, Any] = {}
        with torch.no_grad():
            for mode in ("near", "soft", "hard"):
                total = 0.0
                for i in range(0, x.shape[0], CHUNK):
                    y = runner(x[i:i + CHUNK], weight_fn=lambda n, m, mode=mode: weight(mode, n, m), act_fn=act_fn)
                    total += float(reconstruction_loss(y, target[i:i + CHUNK])) * y.shape[0]
                row[mode] = total / x.shape[0]
        row["undecided"] = info.get("undecided")
        ROWS.append(row)
        print("SOFTHARD", len(ROWS), json.dumps(row), flush=True)
        return info

    return wrapped


def main() -> None:
    argv = sys.argv[1:]
    gap_out = None
    if "--gap-out" in argv:
        i = argv.index("--gap-out")
        gap_out = argv[i + 1]
        del argv[i:i + 2]
    brecq.optimize_unit = _measured(brecq.optimize_unit)
    sys.argv = ["recovery_recipe.py", *argv]
    recovery_recipe.main()
    if gap_out:
        Path(gap_out).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
