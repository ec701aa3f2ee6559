"""Probe (issue 8): a network-output stage after BRECQ, scored on held-apart real images.

BRECQ reconstructs block after block, each block's output against the float block's; nothing looks at the
network's output. This probe runs the default BRECQ recipe once per seed (or loads its result), then, from that
same model, each candidate *tuning stage*: a few hundred steps of Adam on the KL between the float model's
and the quantized model's softmax outputs (the finetune method's distillation loss) on the same calibration
inputs and their mirror images, training only parameters that keep the integer weight codes fixed:

* ``bias``: the layers' biases (float32 in zsq's model, int32 at export);
* ``wscale``: one multiplier ``exp(u)`` per output channel of each layer's weight step;
* ``act``: the activation step sizes (LSQ, as in BRECQ).

Each candidate is ``name:key=value,...`` with keys ``iters``, ``batch``, ``bias`` / ``wscale`` / ``act``
(learning rates; 0 = frozen), ``temperature``, ``aug`` (pixels: a fresh rolled / mirrored view of each batch at
every step, with the float model's logits for it; 0 = the fixed inputs). Scores: KL on the learning inputs (with
their mirror images), on the held-apart distilled inputs, and on the last ``--real-holdout`` images of the
evaluation set (never evaluated); top-1 on the rest (record only). ``--ptq`` also scores the calibrated model
before recovery; ``--brecq-input-noise F`` makes the BRECQ state with Gaussian noise on every block's training
inputs (a second probe; use another ``--state`` path). Results: BENCHMARKS.md, "A network-output stage after
BRECQ" (session 19; nothing adopted).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/global_tune.py --seed 0 --cache L0.pt \\
        --state runs/brecq_s0.pt --candidates "bias:bias=1e-3" "all:bias=1e-3,wscale=1e-3,act=1e-3"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import zsq
from zsq.data import load_dataset
from zsq.evaluate import compare
from zsq.metrics import kl_divergence
from zsq.models import load_model
from zsq.quant.modules import ActQuantizer
from zsq.recover import RecoverConfig, recover
from zsq.recover.adaround import is_learnable
from zsq.recover.blocks import UnitRunner
from zsq.recover.brecq import learnable_steps
from zsq.recover.finetune import distillation_kl
from zsq.state import full_fp32

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import FIRST_LAST_8, MODELS, calibrated_bases, clone  # noqa: E402
from recovery_recipe import parse_candidate  # noqa: E402


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, bs: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + bs]) for i in range(0, x.shape[0], bs)])


@torch.no_grad()
def kl(fp32: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor) -> float:
    return float(kl_divergence(logits(fp32, x), logits(q, x)).mean())


def augment(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    off = torch.randint(-pixels, pixels + 1, (x.shape[0], 2), generator=gen).tolist()
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    out = [torch.roll(img, shifts=(dy, dx), dims=(-2, -1)) for img, (dy, dx) in zip(x, off)]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flip.tolist())])


def tune(q: torch.nn.Module, teacher: torch.Tensor, teacher_model: torch.nn.Module, x: torch.Tensor, *, iters: int, batch: int, bias: float,
         wscale: float, act: float, temperature: float, aug: int, seed: int) -> dict[str, Any]:
    """Train the chosen parameters of ``q`` in place on KL(teacher || q) over ``x``; integer codes stay fixed."""
    gm = q
    gm.eval()
    layers = {n: m for n, m in gm.named_modules() if is_learnable(m)}
    fixed = {n: m.quantized_weight().detach().clone() for n, m in layers.items()}
    codes = {n: m.weight_quantizer.integer(m.weight.detach()) for n, m in layers.items()}
    u = {n: torch.zeros(m.weight.shape[0], requires_grad=True) for n, m in layers.items()
         if wscale > 0 and m.weight_quantizer.per_channel}
    biases = [m.bias for m in layers.values() if bias > 0 and m.bias is not None]
    act_names = [n for n, m in gm.named_modules() if isinstance(m, ActQuantizer)]
    steps = learnable_steps(gm, act_names) if act > 0 else {}
    groups = []
    if biases:
        groups.append({"params": biases, "base": bias})
    if u:
        groups.append({"params": list(u.values()), "base": wscale})
    if steps:
        groups.append({"params": [p for s in steps.values() for p in s.parameters()], "base": act})
    for g in groups:
        g["lr"] = g["base"]
    flags = {p: p.requires_grad for p in gm.parameters()}
    for p in gm.parameters():
        p.requires_grad_(False)
    for b in biases:
        b.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    whole = UnitRunner.whole_model(gm)

    def weight_fn(name: str, mod: torch.nn.Module) -> torch.Tensor:
        w = fixed.get(name)
        if w is None:
            return mod.quantized_weight()
        if name in u:
            w = w * torch.exp(u[name]).reshape([-1] + [1] * (w.dim() - 1))
        return w

    def act_fn(name: str, mod: ActQuantizer, t: torch.Tensor) -> torch.Tensor:
        s = steps.get(name)
        return s(t) if s is not None else mod(t)

    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    losses = []
    t0 = time.perf_counter()
    try:
        for it in range(iters):
            for g in opt.param_groups:
                g["lr"] = g["base"] * 0.5 * (1.0 + math.cos(math.pi * it / iters))
            idx = torch.randperm(n, generator=gen)[:batch]
            xb, tb = x[idx], teacher[idx]
            if aug:  # a fresh view of every input at every step: rolled by up to `aug` pixels, mirrored or not
                xb = augment(xb, aug, gen)
                with torch.no_grad():
                    tb = teacher_model(xb)
            loss = distillation_kl(whole(xb, weight_fn=weight_fn, act_fn=act_fn), tb, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    with torch.no_grad():
        for name, m in layers.items():
            if name in u:
                k = torch.exp(u[name])
                wq = m.weight_quantizer
                wq.scale.copy_(wq.scale * k.to(wq.scale.dtype))
                m.weight.copy_((fixed[name] * k.reshape([-1] + [1] * (m.weight.dim() - 1))).to(m.weight.dtype))
            if not torch.equal(m.weight_quantizer.integer(m.weight.detach()), codes[name]):
                raise RuntimeError(f"{name}: integer codes changed")
        for s in steps.values():
            s.write()
    m10 = max(1, min(10, len(losses)))
    return {"loss_first": sum(losses[:m10]) / m10, "loss_last": sum(losses[-m10:]) / m10,
            "tune_seconds": time.perf_counter() - t0,
            "max_wscale_change": max((float(v.detach().abs().max()) for v in u.values()), default=0.0)}


class NoisyRunner:
    """A unit runner whose calls (the training steps) see their input plus per-channel Gaussian noise."""

    def __init__(self, runner: Any, std: torch.Tensor, gen: torch.Generator) -> None:
        self.runner, self.std, self.gen = runner, std, gen

    def __call__(self, x: torch.Tensor, **kw: Any) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen).to(x.device) * self.std
        return self.runner(x + noise, **kw)


def noisy_block_inputs(rel: float, seed: int) -> None:
    """Make zsq.recover.brecq's training steps use noisy block inputs (probe only; patches the module)."""
    import zsq.recover.brecq as brecq

    original = brecq.optimize_unit
    gen = torch.Generator().manual_seed(10_000 + seed)

    def patched(runner: Any, x: torch.Tensor, target: torch.Tensor, **kw: Any) -> dict[str, Any]:
        dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
        std = x.float().std(dim=dims, keepdim=True) * rel
        return original(NoisyRunner(runner, std, gen), x, target, **kw)

    brecq.optimize_unit = patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(MODELS))
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", required=True, help="distilled inputs {'x', 'h'} (benchmarks/recovery_recipe.py --cache)")
    ap.add_argument("--state", required=True, help="the BRECQ result's state_dict: loaded if present, else made")
    ap.add_argument("--brecq-input-noise", type=float, default=0.0, metavar="F",
                    help="while making the state: BRECQ learns each block from its cached inputs plus Gaussian noise "
                         "of F times each channel's standard deviation, drawn afresh at every step (targets unchanged)")
    ap.add_argument("--brecq", default="", help="RecoverConfig overrides for the BRECQ run, key=value,...")
    ap.add_argument("--real-holdout", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--candidates", nargs="*", default=[])
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--ptq", action="store_true", help="also score the calibrated model before recovery")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with full_fp32():
        run(args)


def run(args: argparse.Namespace) -> None:
    weights, data_path = MODELS[args.model]
    model, spec = load_model(args.model, weights=weights)
    model.eval()
    d = torch.load(args.cache, weights_only=True)
    x, hold = d["x"], d["h"]
    n_total = len(load_dataset(data_path, spec.preprocessing))
    n_eval = n_total - args.real_holdout
    real = torch.stack([img for img, _ in load_dataset(data_path, spec.preprocessing, subset=slice(n_eval, None))])
    eval_ds = None if args.no_eval else load_dataset(data_path, spec.preprocessing, subset=slice(0, n_eval))
    folded, _ = zsq.fold_batchnorm(model)
    base = calibrated_bases(folded, x, wbits=args.wbits, abits=args.abits, overrides=dict(FIRST_LAST_8))(None)
    state = Path(args.state)
    if state.exists():
        base.load_state_dict(torch.load(state, weights_only=True))
        secs = None
    else:
        t = time.perf_counter()
        _, kw = parse_candidate("brecq:" + args.brecq)
        if args.brecq_input_noise:
            noisy_block_inputs(args.brecq_input_noise, args.seed)
        recover(base, model, x, RecoverConfig(method="brecq", seed=args.seed, **kw), progress=False)
        secs = time.perf_counter() - t
        torch.save(base.state_dict(), state)
    xm = torch.cat([x, x.flip(-1)])
    teacher = logits(model, xm)

    def score(q: torch.nn.Module) -> dict[str, Any]:
        row = {"train_kl": kl(model, q, xm), "distilled_holdout_kl": kl(model, q, hold),
               "real_holdout_kl": kl(model, q, real)}
        if eval_ds is not None:
            row["top1_record_only"] = compare(model, q, eval_ds, progress=False)["quantized"]["top1"]
        return row

    if args.ptq:  # the calibrated model before recovery (percentile ranges, as recover starts from)
        ptq = calibrated_bases(folded, x, wbits=args.wbits, abits=args.abits, overrides=dict(FIRST_LAST_8),
                               act_estimator="percentile")(None)
        ptq_rows = [{"candidate": "ptq", "seed": args.seed, **score(ptq)}]
        print(json.dumps(ptq_rows[0]), flush=True)
    else:
        ptq_rows = []
    rows = ptq_rows + [{"candidate": "brecq", "seed": args.seed, "brecq_seconds": secs, **score(base)}]
    print(json.dumps(rows[-1]), flush=True)
    for text in args.candidates:
        name, kw = parse_candidate(text)
        opts = {"iters": 200, "batch": 16, "bias": 0.0, "wscale": 0.0, "act": 0.0, "temperature": 1.0, "aug": 0}
        unknown = set(kw) - set(opts)
        if unknown:
            raise SystemExit(f"unknown keys {sorted(unknown)} in {text!r}")
        opts.update(kw)
        q = clone(base)
        info = tune(q, teacher, model, xm, seed=args.seed, **opts)
        rows.append({"candidate": text, "seed": args.seed, **info, **score(q)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
