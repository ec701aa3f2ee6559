"""Does a change to bias correction's ``auto`` rule change any row of the accuracy tables?

Recomputes, for every (model, setting, calibration source, seed) of ``benchmarks/accuracy.py``, the mode that
``correct_bias(..., mode="auto")`` chooses now, on exactly the calibration inputs that script uses (Gaussian
noise seed 0, the held-apart real images, zsq distilled data of seeds 0..N-1 at the same thread count), and
compares it with the mode recorded in that script's JSON output. Rows whose decision changed are evaluated
again (``--eval``) so that the table can be corrected; the others are unchanged by construction, since the
decision is the only thing that differs.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/bias_decisions.py \\
        --recorded benchmarks/accuracy_cifar.json benchmarks/accuracy_lite0.json benchmarks/accuracy_lite1.json \\
        --threads 1 --eval --out benchmarks/bias_decisions.json --md benchmarks/BIAS_DECISIONS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import zsq
from zsq.bias_correction import BiasCorrectionConfig, correct_bias
from zsq.config import DistillConfig, QuantConfig
from zsq.data import load_dataset
from zsq.evaluate import logits_of
from zsq.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MODELS, SETTINGS  # noqa: E402  (the same models, assets and settings)


def recorded_modes(paths: list[str]) -> dict[tuple[str, str, str], list[str]]:
    out: dict[tuple[str, str, str], list[str]] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text())["rows"]:
            if r.get("bias_modes"):
                out[(r["model"], r["setting"], r["source"])] = list(r["bias_modes"])
    return out


def run_model(name: str, args, recorded: dict, emit) -> None:
    weights, data_path, n_total = MODELS[name]
    if weights is not None and not weights.exists() or not data_path.exists():
        print(f"skip {name}: assets not found", file=sys.stderr)
        return
    model, spec = load_model(name, weights=weights)
    n_eval = n_total - args.real_calib
    real_x = torch.stack([img for img, _ in load_dataset(data_path, spec.preprocessing, subset=slice(n_eval, n_total))])
    n_calib = DistillConfig().resolved_batch_size(spec.preprocessing.input_size)
    sources: dict[str, list[torch.Tensor]] = {
        "gaussian": [zsq.gaussian_inputs(n_calib, spec.preprocessing, seed=0)],
        "real (held apart)": [real_x[:n_calib]],
        "distilled": [],
    }
    for seed in range(args.seeds):
        t = time.perf_counter()
        sources["distilled"].append(
            zsq.distill(model, spec.preprocessing, DistillConfig(seed=seed), progress=False).inputs)
        print(f"{name}: distilled seed {seed} in {time.perf_counter() - t:.0f}s", flush=True)
    eval_x = labels = fp_pred = None
    folded, _ = zsq.fold_batchnorm(model)
    for label, w, a, ov in SETTINGS:
        cfg = QuantConfig(wbits=w, abits=a, overrides=ov)
        for src, xs in sources.items():
            before = recorded.get((name, label, src))
            for i, x in enumerate(xs):
                q = zsq.quantize(folded, cfg)
                zsq.calibrate(q, x, progress=False)
                rep = correct_bias(q, folded, x, config=BiasCorrectionConfig(mode="auto"))
                old = before[i] if before and i < len(before) else None
                row = {"model": name, "setting": label, "source": src, "seed": i, "recorded": old, "now": rep.mode,
                       "collapsed": rep.collapsed, "heldout_kl": rep.heldout_kl}
                if args.eval and old is not None and old != rep.mode:
                    if eval_x is None:
                        ds = load_dataset(data_path, spec.preprocessing, subset=slice(0, n_eval))
                        eval_x = torch.stack([img for img, _ in ds])
                        labels = torch.tensor([int(lab) for _, lab in ds])
                        fp_pred = logits_of(model, eval_x).argmax(1)
                    old_q = zsq.quantize(folded, cfg)
                    zsq.calibrate(old_q, x, progress=False)
                    correct_bias(old_q, folded, x, config=BiasCorrectionConfig(mode=old))
                    for key, qq in (("recorded", old_q), ("now", q)):
                        pred = logits_of(qq, eval_x).argmax(1)
                        row[f"top1_{key}"] = float(100.0 * (pred == labels).double().mean())
                        row[f"agreement_{key}"] = float(100.0 * (pred == fp_pred).double().mean())
                emit(row)
                flag = "" if old is None or old == rep.mode else "  <-- CHANGED"
                extra = (f" top-1 {row['top1_recorded']:.2f} -> {row['top1_now']:.2f}" if "top1_now" in row else "")
                print(f"  {label:<20} {src:<18} seed {i}: recorded {old} now {rep.mode}"
                      f"{' collapsed ' + ','.join(rep.collapsed) if rep.collapsed else ''}{flag}{extra}", flush=True)


def to_markdown(rows: list[dict], args) -> str:
    changed = [r for r in rows if r["recorded"] is not None and r["recorded"] != r["now"]]
    out = ["# Bias correction `auto`: decisions now vs recorded in the accuracy tables", "",
           f"Generated by `benchmarks/bias_decisions.py` from {', '.join(args.recorded)}: {len(rows)} decisions "
           f"recomputed on the same calibration inputs ({args.threads} thread(s)), {len(changed)} changed.", "",
           "| model | setting | source | seed | recorded | now | collapsed | top-1 recorded → now | "
           "agreement recorded → now |", "| --- | --- | --- | ---: | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["recorded"] == r["now"] and not r["collapsed"]:
            continue
        t = (f"{r['top1_recorded']:.2f} → {r['top1_now']:.2f}" if "top1_now" in r else "-")
        ag = (f"{r['agreement_recorded']:.2f} → {r['agreement_now']:.2f}" if "agreement_now" in r else "-")
        out.append(f"| {r['model']} | {r['setting']} | {r['source']} | {r['seed']} | {r['recorded']} | {r['now']} | "
                   f"{', '.join(r['collapsed']) or '-'} | {t} | {ag} |")
    same = sum(1 for r in rows if r["recorded"] == r["now"])
    out += ["", f"Unchanged decisions: {same} of {sum(1 for r in rows if r['recorded'] is not None)} recorded "
            "(rows with an unchanged decision and no collapse are not listed)."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recorded", nargs="+", required=True, help="accuracy.py JSON files with the recorded modes")
    ap.add_argument("--models", default=None, help="comma-separated; default: every model in the recorded files")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--real-calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="the thread count the recorded run used")
    ap.add_argument("--eval", action="store_true", help="evaluate rows whose decision changed (old and new mode)")
    ap.add_argument("--out", default="benchmarks/bias_decisions.json")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recorded = recorded_modes(args.recorded)
    names = args.models.split(",") if args.models else list(dict.fromkeys(k[0] for k in recorded))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    for name in names:
        run_model(name, args, recorded, emit)
    md = to_markdown(rows, args)
    print(md)
    if args.md:
        Path(args.md).write_text(md)


if __name__ == "__main__":
    main()
