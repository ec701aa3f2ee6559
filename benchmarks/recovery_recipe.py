"""Choose the low-bit recovery recipe on distilled data only (issue 8).

Each candidate recipe reconstructs the same model (``--wbits``/``--abits``, default W4A4, first/last layer
W8A8, optionally ``--depthwise-bits``) from the same distilled calibration set (candidate ``ptq``: no
recovery, the calibrated model as it is); it is scored by the KL divergence between the FP32 and the recovered model's outputs on a
*held-apart* distilled set (another seed). The recipe with the lowest held-apart KL is the candidate for
``zsq.recover`` defaults. Top-1 on the CIFAR sample is printed for the record only (``--eval``); it is not
used to choose (the issue asks for the recipe to be chosen on distilled data).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/recovery_recipe.py \\
        --candidates "brecq:iters=300" "brecq:iters=300,drop_prob=0.5" --out benchmarks/recovery_recipe.json

With ``--sampling-seeds 1,101`` every candidate runs once per recovery sampling seed and is judged by its mean
over them (one sampling seed moves the held-apart KL by up to 38 % on Lite0: docs/recovery.md, session 29).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import zsq
from zsq.bias_correction import BIAS_MODES, BiasCorrectionConfig, correct_bias
from zsq.config import WEIGHT_ESTIMATORS, DistillConfig
from zsq.data import load_dataset
from zsq.distill import RetroConfig, retro_synthesize
from zsq.evaluate import compare
from zsq.graph import is_depthwise_conv, is_pointwise_conv
from zsq.models import load_model
from zsq.pipeline import check_device
from zsq.recover import RecoverConfig, method_defaults, recover
from zsq.metrics import kl_divergence
from zsq.state import full_fp32

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import FIRST_LAST_8, MODELS, WEIGHT_SCHEMES, calibrated_bases, clone, distilled  # noqa: E402


def parse_seeds(text: str | None) -> list[int]:
    """``"1,101"`` -> [1, 101] (None or empty: [], i.e. one run per candidate at --seed)."""
    if not text:
        return []
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--sampling-seeds takes comma-separated integers such as 1,101, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--sampling-seeds {text!r} repeats a seed")
    return seeds


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per candidate with the mean (and the values) of every score over its runs."""
    keys = ("holdout_kl_after", "holdout_kl_bias_corrected", "real_holdout_kl", "top1_record_only", "seconds")
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = out.setdefault(r["candidate"], {"candidate": r["candidate"], "runs": 0})
        m["runs"] += 1
        for k in keys:
            if k in r:
                m.setdefault(k + "_runs", []).append(r[k])
    for m in out.values():
        for k in keys:
            if k + "_runs" in m:
                m[k] = sum(m[k + "_runs"]) / len(m[k + "_runs"])
    return list(out.values())


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    """``method:key=value,key=value`` -> (method, kwargs) with ints/floats/bools converted (other values stay
    strings)."""
    method, _, rest = text.partition(":")
    kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value in ("true", "false"):
            kw[key] = value == "true"
        else:
            try:
                kw[key] = int(value)
            except ValueError:
                try:
                    kw[key] = float(value)
                except ValueError:
                    kw[key] = value
    return method, kw


@torch.no_grad()
def holdout_kl(fp32: torch.nn.Module, q: torch.nn.Module, hold: torch.Tensor) -> float:
    """Mean KL(softmax(FP32) || softmax(quantized)) over the held-apart inputs (on the quantized model's device)."""
    dev = next(q.parameters()).device
    fp32.to(dev)
    hold = hold.to(dev)
    return float(kl_divergence(fp32(hold), q(hold)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar_resnet20", choices=sorted(MODELS))
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--candidates", nargs="+", required=True,
                    help="method:key=value,... (RecoverConfig fields; seed=N sets recovery's own sampling seed, "
                         "which is --seed otherwise)")
    ap.add_argument("--sampling-seeds", default=None, metavar="S1,S2,...",
                    help="run every candidate once per recovery sampling seed (RecoverConfig.seed; the data stays "
                         "--seed's) and judge candidates by their mean over these runs: since session 29 one "
                         "recovery seed per data seed is known to be too noisy to choose by (a candidate's own seed=N "
                         "is refused with it)")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--holdout-batches", type=int, default=1, help="distilled batches (seed + 1000) to score on")
    ap.add_argument("--weight-estimator", default="minmax", choices=["minmax", "mse"])
    ap.add_argument("--weights", choices=sorted(WEIGHT_SCHEMES), default="recipe",
                    help="weight symmetry: recipe (zsq quantize's: symmetric for the ptq candidate, asymmetric below "
                         "8 bits for recovery candidates; every row before session 14 was symmetric), symmetric, "
                         "asymmetric")
    ap.add_argument("--weight-asymmetric", action="store_true", help="the same as --weights asymmetric")
    ap.add_argument("--depthwise-bits", type=int, default=None,
                    help="weight bits of the depthwise convs (default: --wbits), e.g. 8 for EfficientNet")
    ap.add_argument("--depthwise-estimator", choices=WEIGHT_ESTIMATORS, default=None,
                    help="weight range of the depthwise convs only (default: --weight-estimator)")
    ap.add_argument("--pointwise-bits", type=int, default=None,
                    help="weight bits of the 1x1 convs other than the first/last layer (default: --wbits); with "
                         "--depthwise-bits, tells which kind of layer the 4-bit error comes from (a diagnostic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda[:N]: distil, calibrate, recover and evaluate there (TF32 off, so that "
                         "convolutions and matrix products stay FP32 as on the CPU)")
    ap.add_argument("--eval", action="store_true", help="also print top-1 on the evaluation images (record only)")
    ap.add_argument("--bias-correction", default="off", choices=BIAS_MODES,
                    help="also score each candidate after zsq's bias correction (default off: the rows as measured "
                         "before bias correction existed)")
    ap.add_argument("--cache", default=None, help="save / reuse the distilled inputs here (.pt, weights_only)")
    ap.add_argument("--distill-flip", action=argparse.BooleanOptionalAction, default=DistillConfig().flip,
                    help="DistillConfig.flip for the calibration inputs (--no-distill-flip: the rows before session 10)")
    ap.add_argument("--distill-jitter", type=int, default=DistillConfig().jitter,
                    help="DistillConfig.jitter for the calibration inputs (default: by input size; 0: off, as before "
                         "session 10)")
    ap.add_argument("--distill-iters", type=int, default=DistillConfig().iterations,
                    help="optimisation steps per batch of the calibration inputs (the held-apart ones keep the "
                         "default)")
    ap.add_argument("--distill-coarse-iters", type=int, default=DistillConfig().coarse_iterations,
                    help="DistillConfig.coarse_iterations for the calibration inputs: steps at half size before "
                         "--distill-iters at full size (default: zsq's, by input size; 0: off)")
    ap.add_argument("--real-holdout", type=int, default=0, metavar="N",
                    help="leave the last N evaluation images out of the evaluation (with --eval); each candidate is "
                         "also scored by its KL to FP32 on them (real_holdout_kl), and --calib-source real uses them")
    ap.add_argument("--calib-source", default="distilled", choices=["distilled", "real", "retro"],
                    help="real: calibrate and recover on the last --real-holdout evaluation images instead of the "
                         "distilled inputs (an upper bound for what better synthetic data could give; the "
                         "held-apart KL is still measured on distilled inputs). retro: class-conditional "
                         "Retro-Synthesis inputs (same number, seed, iterations and --distill-flip/--distill-jitter)")
    ap.add_argument("--retro-class-weight", type=float, default=None,
                    help="RetroConfig.class_weight for --calib-source retro (default: RetroConfig's)")
    ap.add_argument("--retro-tv", type=float, default=0.0, help="RetroConfig.tv_weight for --calib-source retro")
    ap.add_argument("--calib-flip-copies", action="store_true",
                    help="calibrate and recover on the inputs and their horizontal mirror images (twice the inputs "
                         "at no distillation cost; how session 14 measured what RecoverConfig.mirror now does, so "
                         "the recovery candidates need mirror=false with it)")
    ap.add_argument("--distill-batch-size", type=int, default=None,
                    help="DistillConfig.batch_size of the calibration inputs (default: zsq's, by input size); "
                         "--calib-batches counts batches of this size")
    ap.add_argument("--distill-coarse-levels", type=int, default=1,
                    help="DistillConfig.coarse_levels of the calibration inputs (a pyramid of coarse phases)")
    ap.add_argument("--distill-first-bn-weight", type=float, default=None,
                    help="DistillConfig.first_bn_weight of the calibration inputs (default: zsq's, by input size; "
                         "1: the rows before session 13)")
    ap.add_argument("--holdout-cache", default=None,
                    help="take the held-apart distilled inputs from this --cache file of an earlier run instead of "
                         "distilling them again (only the held-apart distilled KL uses them)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.sampling_seeds = parse_seeds(args.sampling_seeds)
    if args.sampling_seeds:
        own = [t for t in args.candidates if "seed" in parse_candidate(t)[1]]
        if own:
            raise SystemExit(f"--sampling-seeds sets each run's recovery seed; drop seed=N from {', '.join(own)}")
    with full_fp32():  # on a GPU too, FP32 convolutions and matrix products as on the CPU
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dev = check_device(args.device)
    weights, data_path = MODELS[args.model]
    model, spec = load_model(args.model, weights=weights)
    model.eval()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():  # {"x": calibration inputs, "h": held-apart inputs}
        d = torch.load(cache, weights_only=True)
        x, hold, ds = d["x"], d["h"], 0.0
    else:
        if args.calib_source == "retro":
            t = time.perf_counter()
            n_in = args.calib_batches * DistillConfig().resolved_batch_size(spec.preprocessing.input_size)
            extra = {} if args.retro_class_weight is None else {"class_weight": args.retro_class_weight}
            rcfg = RetroConfig(num_images=n_in, seed=args.seed, iterations=args.distill_iters,
                               flip=args.distill_flip, jitter=args.distill_jitter, tv_weight=args.retro_tv, **extra)
            res = retro_synthesize(model, spec.preprocessing, rcfg, progress=False, device=dev)
            x, ds = res.inputs, time.perf_counter() - t
            print(f"retro: {res.target_accuracy:.1f} % of the inputs classified as their target", flush=True)
        else:
            x, ds = distilled(model, spec, seed=args.seed, batches=args.calib_batches, iters=args.distill_iters,
                              flip=args.distill_flip, jitter=args.distill_jitter,
                              coarse_iterations=args.distill_coarse_iters, batch_size=args.distill_batch_size,
                              coarse_levels=args.distill_coarse_levels,
                              first_bn_weight=args.distill_first_bn_weight, device=dev)
        if args.holdout_cache:
            hold = torch.load(args.holdout_cache, weights_only=True)["h"]
        else:
            hold, _ = distilled(model, spec, seed=1000 + args.seed, batches=args.holdout_batches,
                                iters=DistillConfig().iterations, device=dev)
        if cache is not None:
            torch.save({"x": x, "h": hold}, cache)
    print(f"{x.shape[0]} distilled inputs ({ds:.0f}s), {hold.shape[0]} held apart", flush=True)
    n_eval = real_hold = None
    if args.real_holdout:
        n_total = len(load_dataset(data_path, spec.preprocessing))
        n_eval = n_total - args.real_holdout
        if n_eval <= 0:
            raise SystemExit(f"--real-holdout {args.real_holdout}: the evaluation set has only {n_total} images")
        real_hold = torch.stack([img for img, _ in load_dataset(data_path, spec.preprocessing,
                                                                 subset=slice(n_eval, None))])
    if args.calib_source == "real":  # (a --cache of distilled inputs is reused only for the held-apart ones)
        if not args.real_holdout:
            raise SystemExit("--calib-source real needs --real-holdout N (the images it calibrates on)")
        x = real_hold
        print(f"calibrating and recovering on {x.shape[0]} real images (the last of the evaluation set, which are "
              f"not evaluated)", flush=True)
    if args.calib_flip_copies:
        parsed = {t: parse_candidate(t) for t in args.candidates}
        mirrored = [t for t, (method, kw) in parsed.items() if method != "ptq" and kw.get(
            "mirror", method_defaults(method, tuple(x.shape[-2:])).get("mirror", False))]
        if mirrored:
            raise SystemExit(f"--calib-flip-copies: {', '.join(mirrored)} would mirror the mirror images again "
                             "(RecoverConfig.mirror); add mirror=false to them or drop --calib-flip-copies")
        x = torch.cat([x, x.flip(-1)])
        print(f"with their mirror images: {x.shape[0]} calibration inputs", flush=True)
    folded, _ = zsq.fold_batchnorm(model)
    folded.to(dev)
    overrides: dict[str, Any] = dict(FIRST_LAST_8)
    if args.depthwise_bits is not None or args.depthwise_estimator is not None:
        dw = [n for n, m in folded.named_modules() if is_depthwise_conv(m)]
        if not dw:
            raise SystemExit(f"--depthwise-bits/--depthwise-estimator: {args.model} has no depthwise convolution")
        if args.depthwise_bits is not None:
            overrides["re:^(" + "|".join(re.escape(n) for n in dw) + ")$"] = {"wbits": args.depthwise_bits}
        print(f"{len(dw)} depthwise convs with bits {args.depthwise_bits or args.wbits}, weight range "
              f"{args.depthwise_estimator or args.weight_estimator}", flush=True)
    if args.pointwise_bits is not None:
        pw = [n for n, m in folded.named_modules() if is_pointwise_conv(m)]
        if not pw:
            raise SystemExit(f"--pointwise-bits: {args.model} has no 1x1 convolution")
        overrides["re:^(" + "|".join(re.escape(n) for n in pw) + ")$"] = {"wbits": args.pointwise_bits}
        print(f"{len(pw)} pointwise convs at W{args.pointwise_bits}", flush=True)
    scheme = WEIGHT_SCHEMES["asymmetric" if args.weight_asymmetric else args.weights]
    base_for = calibrated_bases(folded, x, wbits=args.wbits, abits=args.abits, overrides=overrides,
                                weight_estimator=args.weight_estimator,
                                depthwise_weight_estimator=args.depthwise_estimator, device=dev)

    eval_ds = (load_dataset(data_path, spec.preprocessing, subset=slice(0, n_eval) if n_eval else None)
               if args.eval else None)
    rows = []
    runs = [(text, s) for text in args.candidates  # ptq has no recovery seed: one run
            for s in ([None] if parse_candidate(text)[0] == "ptq" else args.sampling_seeds or [None])]
    for text, sampling_seed in runs:
        method, kw = parse_candidate(text)
        if sampling_seed is not None:  # (never for ptq: see runs)
            kw["seed"] = sampling_seed
        symmetric = scheme[method == "ptq"]
        q = clone(base_for(symmetric))
        t = time.perf_counter()
        if method == "ptq":  # no recovery: the calibrated model as it is
            kl = holdout_kl(model, q, hold)
            row = {"candidate": text, "holdout_kl_before": kl, "holdout_kl_after": kl, "seconds": 0.0}
        else:
            rep = recover(q, model, x, RecoverConfig(method=method, **{"seed": args.seed, **kw}), progress=False,
                          holdout_inputs=hold, device=dev)
            row = {"candidate": text, "holdout_kl_before": rep.holdout_kl_before,
                   "holdout_kl_after": rep.holdout_kl_after, "seconds": time.perf_counter() - t,
                   # per unit: MSE on the learning inputs and on the held-apart ones, before -> after
                   "units": {u.name: [u.loss_before, u.loss_after, u.holdout_before, u.holdout_after]
                             for u in rep.units}}
            reverted = [u.name for u in rep.units if u.info.get("reverted")]
            if reverted:
                row["reverted_units"] = reverted
        if sampling_seed is not None:
            row["sampling_seed"] = sampling_seed
        row["weight_symmetric"] = symmetric
        if args.bias_correction != "off":  # as zsq quantize: after recovery, on the final weights
            bias = correct_bias(q, folded, x, config=BiasCorrectionConfig(mode=args.bias_correction))
            row.update(bias_mode=bias.mode, holdout_kl_bias_corrected=holdout_kl(model, q, hold))
        if real_hold is not None:  # a criterion that sees real images without evaluating on them
            row["real_holdout_kl"] = holdout_kl(model, q, real_hold)
        if eval_ds is not None:
            row["top1_record_only"] = compare(model, q, eval_ds, progress=False, device=dev)["quantized"]["top1"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    means = mean_rows(rows)
    if args.sampling_seeds:
        for m in means:
            print(json.dumps({"mean_over_sampling_seeds": args.sampling_seeds,
                              **{k: v for k, v in m.items() if not k.endswith("_runs")}}), flush=True)
    best = min(means, key=lambda r: r.get("holdout_kl_bias_corrected", r["holdout_kl_after"]))
    what = "mean held-apart KL over the sampling seeds" if args.sampling_seeds else "held-apart KL"
    print(f"lowest {what}: {best['candidate']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "means": means,
                                              "best": best["candidate"]}, indent=2))


if __name__ == "__main__":
    main()
