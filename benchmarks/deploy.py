"""Deployment benchmark: zsq's QDQ ONNX export vs FP32 and vs ONNX Runtime's own quantize_static.

For ResNet-20 (CIFAR-10) and EfficientNet-Lite0 (ImageNet):

1. zsq's pipeline at W8A8 with distilled calibration data (short distillation), biases snapped to
   the int32 grid (:func:`zsq.export.snap_biases`); exports of that model with the default weight
   container (``auto``: exact on every x86 CPU) and with plain int8 weights (u8s8 kernels); a W7A8
   model (7-bit weights: exact *and* u8s8 on CPUs without VNNI) and a W4A8 model (true low-bit size);
2. the FP32 model exported to ONNX, and ONNX Runtime's ``quantize_static`` (QDQ, per-channel,
   MinMax, uint8 activations, int8 weights; also with ``reduce_range``) calibrated on the same
   distilled inputs;
3. interleaved latency (batch 1) and throughput (batch 32), min and median over the repetitions,
   ``intra_op_num_threads`` threads; file sizes; the operators ONNX Runtime runs after optimisation;
4. top-1 on the real evaluation sets of every ONNX model, of zsq's fake-quantized PyTorch models,
   and top-1 agreement between each exported model and the PyTorch model it came from;
5. ONNX Runtime's profiler: where the time goes, per operator type, at batch 32.

Writes the section "## Deployment (ONNX Runtime)" to benchmarks/DEPLOY_RESULTS.md and the raw
numbers to <work>/deploy_results.json::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=src \\
        .venv/bin/python benchmarks/deploy.py --reps 20 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import zsq
from zsq.config import DistillConfig, QuantConfig
from zsq.data import iter_batches, load_dataset
from zsq.evaluate import logits_of
from zsq.export import (export_fp32_onnx, export_onnx, integer_logits, layer_parity, logit_step, ort_op_counts,
                        snap_biases)
from zsq.export.bench import advice_for, bench, bench_cpu_time, environment, profile_ops
from zsq.pipeline import RunConfig, run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import onnx_logits, ort_quantize_static  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COMMAND = ("MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=src "
           ".venv/bin/python benchmarks/deploy.py --reps {reps} --threads {threads}")

MODELS: dict[str, dict[str, Any]] = {
    "cifar_resnet20": {
        "title": "ResNet-20 (CIFAR-10)",
        "weights": str(SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th"),
        "eval": str(SHARED / "data/cifar10-test/cifar10_test.npz"),
        "eval_desc": "cifar10-test, all 5000 (JPEG) images",
        "distill": DistillConfig(iterations=100, batch_size=32),
        "w4": dict(wbits=4, abits=8, weight_estimator="mse", overrides={"@first": {"wbits": 8}, "@last": {"wbits": 8}}),
        "w4_desc": "W4A8, first and last layer W8, MSE weight ranges",
    },
    "efficientnet_lite0": {
        "title": "EfficientNet-Lite0 (ImageNet)",
        "weights": None,
        "eval": str(SHARED / "data/imagenet-sample-500"),
        "eval_desc": "imagenet-sample-500, all 500 images",
        "distill": DistillConfig(iterations=40, batch_size=16),
        "w4": dict(wbits=4, abits=8, weight_estimator="mse", overrides={
            "@first": {"wbits": 8}, "@last": {"wbits": 8}, "re:.*_depthwise_conv": {"wbits": 8}}),
        "w4_desc": "W4A8 on the 1x1 convs; first/last layer and depthwise convs W8; MSE weight ranges",
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime's own static quantization
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Accuracy of ONNX models
# ----------------------------------------------------------------------------------------------


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * np.mean(logits.argmax(1) == labels))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(100.0 * np.mean(a.argmax(1) == b.argmax(1)))


# ----------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------


def quantize_like(result, config: QuantConfig):
    """Another quantized model of the same network calibrated on the same distilled inputs."""
    folded, _ = zsq.fold_batchnorm(result.fp32_model)
    qmodel = zsq.quantize(folded, config)
    zsq.calibrate(qmodel, result.calib_inputs, progress=False)
    snap_biases(qmodel)
    return qmodel.eval()


def bench_model(name: str, spec: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    distill = dataclasses.replace(spec["distill"], iterations=3) if args.quick else spec["distill"]
    cfg = RunConfig(model=name, weights=spec["weights"], quant=QuantConfig(wbits=8, abits=8), distill=distill)
    log(f"{name}: zsq pipeline W8A8 (distill {distill.iterations} iterations x {distill.batch_size})")
    res = run(cfg, out_dir=out / "zsq-w8a8", progress=False)
    fp32 = res.fp32_model.eval()
    q8 = res.quantized_model.eval()
    snapped = len(snap_biases(q8))
    q7 = quantize_like(res, QuantConfig(wbits=7, abits=8))
    q4 = quantize_like(res, QuantConfig(**spec["w4"]))
    h, w = res.spec.preprocessing.input_size
    example = torch.zeros(1, 3, h, w)

    log(f"{name}: exporting")
    paths: dict[str, Path] = {"fp32": out / "model.fp32.onnx"}
    reports: dict[str, Any] = {"fp32": export_fp32_onnx(fp32, paths["fp32"], example_input=example)}
    for label, qm, wt in (("zsq-w8a8", q8, "auto"), ("zsq-w8a8-s8", q8, "int8"), ("zsq-w7a8", q7, "auto"),
                          ("zsq-w4a8", q4, "auto")):
        paths[label] = out / f"model.{label}.onnx"
        reports[label] = export_onnx(qm, paths[label], example_input=example, weight_type=wt)
    for label, rr in (("ort-static", False), ("ort-static-rr", True)):
        paths[label] = out / f"model.{label}.onnx"
        log(f"{name}: onnxruntime quantize_static (reduce_range={rr})")
        ort_quantize_static(paths["fp32"], paths[label], res.calib_inputs, reduce_range=rr)

    log(f"{name}: accuracy on {spec['eval_desc']}")
    ds = load_dataset(spec["eval"], res.spec.preprocessing, limit=64 if args.quick else None)
    xs, ys = [], []
    for xb, yb in iter_batches(ds, 100):
        xs.append(xb)
        ys.append(yb)
    x, y = torch.cat(xs), torch.cat(ys).numpy()
    torch_logits = {"fp32": logits_of(fp32, x), "zsq-w8a8": logits_of(q8, x), "zsq-w7a8": logits_of(q7, x),
                    "zsq-w4a8": logits_of(q4, x)}
    torch_logits = {k: v.numpy() for k, v in torch_logits.items()}
    source = {"fp32": "fp32", "zsq-w8a8": "zsq-w8a8", "zsq-w8a8-s8": "zsq-w8a8", "zsq-w7a8": "zsq-w7a8",
              "zsq-w4a8": "zsq-w4a8", "ort-static": "fp32", "ort-static-rr": "fp32"}
    steps = {"zsq-w8a8": logit_step(q8), "zsq-w7a8": logit_step(q7), "zsq-w4a8": logit_step(q4)}
    acc: dict[str, Any] = {"pytorch": {k: top1(v, y) for k, v in torch_logits.items()}, "onnx": {}}
    log(f"{name}: zsq W8A8 PyTorch model evaluated in float64 (the exact fake-quant arithmetic)")
    import copy

    q64 = copy.deepcopy(q8).double()
    with torch.no_grad():
        l64 = torch.cat([q64(x[i:i + 50].double()) for i in range(0, x.shape[0], 50)]).numpy()
    del q64
    for label, p in paths.items():
        lg = onnx_logits(p, x, threads=args.threads)
        ref = torch_logits[source[label]]
        entry = {"top1": top1(lg, y), "agreement_with": source[label], "agreement": agreement(lg, ref),
                 "pytorch_top1": acc["pytorch"][source[label]]}
        if source[label] in steps and label.startswith("zsq"):
            d = np.abs(lg - ref)
            entry.update(max_abs_diff=float(d.max()), mean_abs_diff=float(d.mean()),
                         max_diff_steps=float(d.max() / steps[source[label]]))
        if label in ("zsq-w8a8", "zsq-w8a8-s8", "zsq-w7a8", "zsq-w4a8"):
            qm = {"zsq-w8a8": q8, "zsq-w8a8-s8": q8, "zsq-w7a8": q7, "zsq-w4a8": q4}[label]
            lp = layer_parity(qm, p, x[:32], threads=args.threads)
            entry.update(layer_max_steps=lp["max_steps"], layer_mismatch_fraction=lp["mismatch_fraction"])
        if label in ("zsq-w8a8", "zsq-w7a8", "zsq-w4a8"):  # int8-weight exports may saturate: not emulated
            qm = {"zsq-w8a8": q8, "zsq-w7a8": q7, "zsq-w4a8": q4}[label]
            li = integer_logits(qm, x).numpy()
            entry.update(top1_integer=top1(li, y), agreement_integer=agreement(lg, li),
                         max_abs_diff_integer=float(np.abs(lg - li).max()))
        if label == "zsq-w8a8":
            entry.update(agreement_float64=agreement(lg, l64), float32_vs_float64_agreement=agreement(ref, l64),
                         mean_abs_diff_float64=float(np.abs(lg - l64).mean()),
                         float32_vs_float64_mean_abs_diff=float(np.abs(ref - l64).mean()), pytorch_float64_top1=top1(l64, y))
        acc["onnx"][label] = entry
        log(f"  {label:14s} top-1 {entry['top1']:.2f}  agreement with PyTorch {source[label]} {entry['agreement']:.2f}")

    log(f"{name}: timing ({args.reps} interleaved repetitions, {args.threads} threads, batches 1 and 32)")
    load_before = os.getloadavg()
    timing = bench({k: str(v) for k, v in paths.items()}, batches=(1, 32), reps=args.reps, threads=args.threads,
                   warmup=args.warmup)
    load_after = os.getloadavg()
    log(f"{name}: CPU time, one thread, batch 32 ({args.reps} interleaved repetitions)")
    cpu = bench_cpu_time({k: str(v) for k, v in paths.items()}, batch=32, reps=args.reps, warmup=1)
    cpu_fp32 = cpu["fp32"]
    cpu_time = {k: dict(t.to_dict(), speedup_min=round(cpu_fp32.min_ms / t.min_ms, 3),
                        speedup_median=round(cpu_fp32.median_ms / t.median_ms, 3)) for k, t in cpu.items()}
    log(f"{name}: profiling at batch 32")
    profiles = {k: profile_ops(paths[k], batch=32, runs=args.profile_runs, threads=args.threads, split_convs=True)
                for k in ("fp32", "zsq-w8a8", "zsq-w8a8-s8", "zsq-w7a8", "ort-static")}
    optimized = {k: ort_op_counts(paths[k], level="all") for k in ("zsq-w7a8", "ort-static")}
    return {
        "model": name,
        "title": spec["title"],
        "eval": spec["eval_desc"],
        "distill": dataclasses.asdict(distill),
        "w4_desc": spec["w4_desc"],
        "biases_snapped": snapped,
        "seconds": round(time.perf_counter() - t0, 1),
        "exports": {k: v.to_dict() for k, v in reports.items()},
        "accuracy": acc,
        "timing": timing.to_dict(),
        "timing_table": timing.table(),
        "load_avg_before_after": [list(load_before), list(load_after)],
        "cpu_time_b32": cpu_time,
        "profiles_ms_batch32": profiles,
        "ort_optimized_ops": optimized,
        "advice": advice_for({k: paths[k] for k in ("zsq-w8a8",)}),
        "zsq_quant_sizes": {"w8a8_bytes": reports["zsq-w8a8"].lowbit_file_bytes,
                            "w4a8_bytes": reports["zsq-w4a8"].lowbit_file_bytes},
    }


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


LABELS = {
    "fp32": "FP32 (zsq's FP32 export)",
    "zsq-w8a8": "zsq W8A8 (default: uint8 weights where u8s8 could saturate)",
    "zsq-w8a8-s8": "zsq W8A8, `--weight-type int8` (u8s8)",
    "zsq-w7a8": "zsq W7A8 (int8 weights, exact u8s8)",
    "zsq-w4a8": "zsq W4A8 (see sizes; int8 containers)",
    "ort-static": "ORT quantize_static (u8s8)",
    "ort-static-rr": "ORT quantize_static, reduce_range (7-bit weights)",
}


def _timing_lookup(r: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(t["model"], t["batch"]): t for t in r["timing"]["timings"]}


def _fmt_pair(a: float, b: float, spec: str = ".2f", suffix: str = "") -> str:
    return f"{a:{spec}}{suffix} / {b:{spec}}{suffix}"


def markdown(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["## Deployment (ONNX Runtime)", ""]
    minutes = sum(r["seconds"] for r in results) / 60.0
    lines += [
        f"Regenerate with (this run: {minutes:.0f} minutes on 2 busy cores; the float64 evaluation of Lite0 is "
        "a large part of it):", "", "```bash",
        COMMAND.format(reps=args.reps, threads=args.threads), "```", "",
        f"Conditions: ONNX Runtime {env.get('onnxruntime')}, CPU {env.get('cpu')} with AVX2 "
        f"{'yes' if env.get('avx2') else 'no'}, AVX-512 VNNI {'yes' if env.get('avx512_vnni') else 'no'}, "
        f"AVX-VNNI {'yes' if env.get('avx_vnni') else 'no'} (from /proc/cpuinfo); {env.get('cpus')} cores shared "
        f"with other jobs. Wall clock: `intra_op_num_threads={args.threads}`, one inter-op thread, `ORT_ENABLE_ALL`; "
        f"{args.reps} repetitions per model and batch after {args.warmup} warm-up runs, interleaved (each repetition "
        "runs every model once, in a rotating order). CPU time: the same models with one intra-op thread, "
        f"`time.process_time()` of each run at batch 32, {args.reps} interleaved repetitions: far less sensitive to "
        "the other jobs than wall-clock time. Load average (1/5/15 min) before and after each model's wall-clock "
        "timing is listed under its table: the machine was shared, so medians are noisy and minima are the better "
        "estimate.", "",
    ]
    for r in results:
        tl = _timing_lookup(r)
        acc = r["accuracy"]
        ex = r["exports"]
        cpu = r["cpu_time_b32"]
        lines += [f"### {r['title']}", "",
                  f"Calibration: {r['distill']['num_batches'] * r['distill']['batch_size']} distilled images "
                  f"({r['distill']['iterations']} iterations); evaluation: {r['eval']}. "
                  f"FP32 PyTorch top-1 {acc['pytorch']['fp32']:.2f}.", ""]
        lines += ["| model | batch 1 min / median ms | speed-up b1 (min / med) | batch 32 min / median ms | "
                  "speed-up b32 (min / med) | CPU ms b32, 1 thread (min / med) | CPU speed-up b32 (min / med) | "
                  "file MB | int8 / float convs after ORT optimisation | ONNX top-1 | PyTorch top-1 | agreement |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label in r["timing"]["models"]:
            t1, t32, c = tl[(label, 1)], tl[(label, 32)], cpu[label]
            ck = r["timing"]["conv_kernels"][label]
            a = acc["onnx"][label]
            own = label.startswith("zsq") or label == "fp32"
            pt = f"{a['pytorch_top1']:.2f}" if own else "-"
            ag = f"{a['agreement']:.2f} %" if own else f"{a['agreement']:.2f} % (vs FP32)"
            lines.append(
                f"| {LABELS[label]} | {_fmt_pair(t1['min_ms'], t1['median_ms'])} | "
                f"{_fmt_pair(t1['speedup_min'], t1['speedup_median'], suffix='x')} | "
                f"{_fmt_pair(t32['min_ms'], t32['median_ms'], '.1f')} | "
                f"{_fmt_pair(t32['speedup_min'], t32['speedup_median'], suffix='x')} | "
                f"{_fmt_pair(c['min_ms'], c['median_ms'], '.1f')} | "
                f"{_fmt_pair(c['speedup_min'], c['speedup_median'], suffix='x')} | "
                f"{r['timing']['file_bytes'][label] / 1e6:.2f} | {ck['int8']} / {ck['float']} | {a['top1']:.2f} | "
                f"{pt} | {ag} |")
        w4 = ex["zsq-w4a8"]
        w8 = ex["zsq-w8a8"]
        par = acc["onnx"]["zsq-w8a8"]
        lines += ["",
                  f"Sizes: FP32 {ex['fp32']['file_bytes'] / 1e6:.2f} MB; zsq W8A8 {w8['file_bytes'] / 1e6:.2f} MB "
                  f"(ratio {ex['fp32']['file_bytes'] / w8['file_bytes']:.2f}x); zsq W4A8 file "
                  f"{w4['file_bytes'] / 1e6:.2f} MB with 4-bit values in int8 containers, **true low-bit size "
                  f"{w4['lowbit_file_bytes'] / 1e6:.2f} MB** (weights {w4['weight_bytes_lowbit'] / 1e6:.3f} MB packed "
                  f"vs {w4['weight_bytes_stored'] / 1e6:.3f} MB stored; ratio to FP32 "
                  f"{ex['fp32']['file_bytes'] / w4['lowbit_file_bytes']:.2f}x).",
                  f"W4A8 setting: {r['w4_desc']}.",
                  f"Parity of the default zsq W8A8 export with its PyTorch fake-quantized model ({r['eval']}): "
                  f"top-1 {par['top1']:.2f} vs {par['pytorch_top1']:.2f} "
                  f"(difference {par['top1'] - par['pytorch_top1']:+.2f} points), agreement {par['agreement']:.2f} %, "
                  f"max logit difference {par['max_abs_diff']:.3f} = {par['max_diff_steps']:.2f} output steps, mean "
                  f"{par['mean_abs_diff']:.4f}. W7A8: top-1 {acc['onnx']['zsq-w7a8']['top1']:.2f} vs "
                  f"{acc['onnx']['zsq-w7a8']['pytorch_top1']:.2f}, agreement {acc['onnx']['zsq-w7a8']['agreement']:.2f} %. "
                  f"Layer by layer (each quantized tensor computed by zsq from ONNX "
                  f"Runtime's own previous tensors, 32 images): every code within {par['layer_max_steps']} step(s), "
                  f"{100 * par['layer_mismatch_fraction']:.4f} % of codes differ (W7A8: within "
                  f"{acc['onnx']['zsq-w7a8']['layer_max_steps']}, "
                  f"{100 * acc['onnx']['zsq-w7a8']['layer_mismatch_fraction']:.4f} %; W4A8: within "
                  f"{acc['onnx']['zsq-w4a8']['layer_max_steps']}; with int8 weights, u8s8 saturation: up to "
                  f"{acc['onnx']['zsq-w8a8-s8']['layer_max_steps']} steps, "
                  f"{100 * acc['onnx']['zsq-w8a8-s8']['layer_mismatch_fraction']:.2f} % of codes). "
                  f"{r['biases_snapped']} layers had their biases snapped to the int32 grid. "
                  f"The same PyTorch model evaluated in float64 (its exact arithmetic) agrees with the ONNX model on "
                  f"{par['agreement_float64']:.2f} % (mean logit difference {par['mean_abs_diff_float64']:.4f}) and "
                  f"with its own float32 evaluation on {par['float32_vs_float64_agreement']:.2f} % "
                  f"({par['float32_vs_float64_mean_abs_diff']:.4f}): the images on which the ONNX and the PyTorch "
                  f"model disagree are decided by floating-point rounding of the same arithmetic. "
                  f"Evaluated instead with the integer arithmetic of the exported graph (`zsq eval --integer`, "
                  f"`zsq.export.IntegerModel`), the PyTorch model agrees with the ONNX model on "
                  f"{par['agreement_integer']:.2f} % (W7A8 {acc['onnx']['zsq-w7a8']['agreement_integer']:.2f} %, W4A8 "
                  f"{acc['onnx']['zsq-w4a8']['agreement_integer']:.2f} %), largest logit difference "
                  f"{max(acc['onnx'][k]['max_abs_diff_integer'] for k in ('zsq-w8a8', 'zsq-w7a8', 'zsq-w4a8')):.3g}.",
                  f"Load average before/after wall-clock timing: "
                  f"{[round(v, 2) for v in r['load_avg_before_after'][0]]} / "
                  f"{[round(v, 2) for v in r['load_avg_before_after'][1]]}.", ""]
        lines += ["ONNX Runtime profiler, batch 32, milliseconds per run by operator (convolutions split by kind; "
                  "top 6):", "",
                  "| model | " + " | ".join(["op 1", "op 2", "op 3", "op 4", "op 5", "op 6"]) + " | total |",
                  "| --- | --- | --- | --- | --- | --- | --- | ---: |"]
        for label, prof in r["profiles_ms_batch32"].items():
            top = list(prof.items())[:6]
            cells = [f"{k} {v:.1f}" for k, v in top] + [""] * (6 - len(top))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(prof.values()):.1f} |")
        lines += ["", "Operators ONNX Runtime runs after its optimisations (`ORT_ENABLE_ALL`):", ""]
        for label, ops in r["ort_optimized_ops"].items():
            lines.append(f"* {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
        lines.append("")
    lines += analysis(results, env)
    return "\n".join(lines)


def _conv_ms(prof: dict[str, float]) -> float:
    return sum(v for k, v in prof.items()
               if k.split(" ")[0] in ("Conv", "QLinearConv", "ConvInteger", "FusedConv", "MatMulInteger"))


PAR_PERCENT = 2.0  # CPU-time differences up to this are within the noise of this shared machine


def criteria(results: list[dict[str, Any]]) -> list[str]:
    """Issue 5's "done when", per model, for zsq's exact fast export (W7A8) and its default (W8A8)."""
    out = ["### Issue 5 criteria on this CPU", "",
           "Batch 32; speed-ups over FP32 ONNX Runtime as min / median; \"vs ORT\" compares minimum CPU time "
           "with ORT quantize_static's (same u8s8 kernels); parity = ONNX top-1 minus PyTorch fake-quant top-1, "
           "and top-1 agreement of the ONNX model with the PyTorch model evaluated in float32 (fake quantization) "
           "and in the graph's integer arithmetic (`zsq eval --integer`), on the full evaluation set.", "",
           "| model | export | speed-up wall (2 threads) | speed-up CPU time (1 thread) | vs ORT quantize_static "
           "(CPU min) | int8 / float convs | top-1 ONNX - PyTorch | agreement, float / integer |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        tl = _timing_lookup(r)
        cpu = r["cpu_time_b32"]
        for label in ("zsq-w7a8", "zsq-w8a8"):
            t = tl[(label, 32)]
            a = r["accuracy"]["onnx"][label]
            ck = r["timing"]["conv_kernels"][label]
            rel = 100.0 * (cpu[label]["min_ms"] / cpu["ort-static"]["min_ms"] - 1.0)
            out.append(f"| {r['title']} | {LABELS[label]} | {t['speedup_min']:.2f}x / {t['speedup_median']:.2f}x | "
                       f"{cpu[label]['speedup_min']:.2f}x / {cpu[label]['speedup_median']:.2f}x | {rel:+.1f} % | "
                       f"{ck['int8']} / {ck['float']} | {a['top1'] - a['pytorch_top1']:+.2f} | {a['agreement']:.2f} % / "
                       f"{a['agreement_integer']:.2f} % |")
    out.append("")
    return out


def analysis(results: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """The findings, with the numbers of this run."""
    out = criteria(results) + ["### Findings", ""]
    for r in results:
        tl = _timing_lookup(r)
        acc = r["accuracy"]["onnx"]
        pr = r["profiles_ms_batch32"]
        cpu = r["cpu_time_b32"]
        s = {k: tl[(k, 32)]["speedup_min"] for k in r["timing"]["models"]}
        sm = {k: tl[(k, 32)]["speedup_median"] for k in r["timing"]["models"]}
        all_int8 = all(ck["float"] == 0 for k, ck in r["timing"]["conv_kernels"].items() if k != "fp32")

        def both(k: str) -> str:
            return (f"{s[k]:.2f}x / {sm[k]:.2f}x wall, {cpu[k]['speedup_min']:.2f}x / "
                    f"{cpu[k]['speedup_median']:.2f}x CPU")

        def vs(a: str, b: str) -> str:
            wa, wb = tl[(a, 32)]["min_ms"], tl[(b, 32)]["min_ms"]
            ca, cb = cpu[a]["min_ms"], cpu[b]["min_ms"]
            cma, cmb = cpu[a]["median_ms"], cpu[b]["median_ms"]
            rel = 100.0 * (ca / cb - 1.0)
            verdict = ("at least as fast" if ca <= cb else
                       f"on par (CPU time {rel:.1f} % more, within this machine's run-to-run noise)"
                       if rel <= PAR_PERCENT else f"slower by {rel:.1f} % of CPU time")
            return (f"{verdict}: minimum CPU time {ca:.1f} vs {cb:.1f} ms (median {cma:.1f} vs {cmb:.1f}), "
                    f"minimum wall clock {wa:.1f} vs {wb:.1f} ms")

        out += [
            f"**{r['title']}.** Every convolution of every quantized model runs as an int8 kernel after ONNX "
            f"Runtime's optimisations: {'yes' if all_int8 else 'NO, see the table'}. "
            f"Batch-32 speed-up over FP32 (min / median): zsq W7A8 {both('zsq-w7a8')}; zsq W8A8 default "
            f"{both('zsq-w8a8')}; zsq W8A8 int8 weights {both('zsq-w8a8-s8')}; ORT quantize_static "
            f"{both('ort-static')} (reduce_range {both('ort-static-rr')}). "
            f"zsq W7A8 (exact) vs ORT quantize_static (same u8s8 kernels): {vs('zsq-w7a8', 'ort-static')}. "
            f"zsq W8A8 with int8 weights vs ORT quantize_static (same weights bits and kernels): "
            f"{vs('zsq-w8a8-s8', 'ort-static')}.",
            "",
            f"* Saturation (no VNNI on this CPU): with int8 weights ONNX Runtime's u8s8 kernels add pairs of "
            f"uint8 x int8 products in 16-bit saturating arithmetic (VPMADDUBSW); 2 x 255 x 127 = 64770 does not "
            f"fit in 32767. The zsq W8A8 model exported with int8 weights agrees with its PyTorch model on only "
            f"{acc['zsq-w8a8-s8']['agreement']:.2f} % of the images (top-1 {acc['zsq-w8a8-s8']['top1']:.2f} vs "
            f"{acc['zsq-w8a8-s8']['pytorch_top1']:.2f}); ORT's own quantize_static model, which uses the same "
            f"kernels, gets top-1 {acc['ort-static']['top1']:.2f} vs {acc['ort-static-rr']['top1']:.2f} with "
            f"reduce_range (7-bit weights, no saturation) and FP32 {acc['fp32']['top1']:.2f}.",
            f"* zsq's default export is exact: 8-bit weights of dense convolutions are stored as uint8 with "
            f"zero-point 128 (same values), which ONNX Runtime runs with its u8u8 kernels, exact on every CPU; "
            f"agreement {acc['zsq-w8a8']['agreement']:.2f} %, top-1 {acc['zsq-w8a8']['top1']:.2f} vs PyTorch "
            f"{acc['zsq-w8a8']['pytorch_top1']:.2f}. Without VNNI those kernels are no faster than FP32: "
            f"convolution time at batch 32 FP32 {_conv_ms(pr['fp32']):.0f} ms, zsq W8A8 (u8u8) "
            f"{_conv_ms(pr['zsq-w8a8']):.0f} ms, with int8 weights (u8s8) {_conv_ms(pr['zsq-w8a8-s8']):.0f} ms.",
            f"* Exact and fast on this CPU: 7-bit weights (`zsq quantize --wbits 7`), which cannot saturate "
            f"(2 x 255 x 64 <= 32767) and go to the u8s8 kernels: speed-up {both('zsq-w7a8')} (min / median), "
            f"top-1 {acc['zsq-w7a8']['top1']:.2f} (PyTorch {acc['zsq-w7a8']['pytorch_top1']:.2f}, agreement "
            f"{acc['zsq-w7a8']['agreement']:.2f} %; FP32 {acc['fp32']['top1']:.2f}, zsq W8A8 "
            f"{acc['zsq-w8a8']['top1']:.2f}).",
            f"* Profiler totals at batch 32 (two threads, noisy): zsq W7A8 {sum(pr['zsq-w7a8'].values()):.0f} ms, "
            f"ORT quantize_static {sum(pr['ort-static'].values()):.0f} ms, of which convolutions "
            f"{_conv_ms(pr['zsq-w7a8']):.0f} vs {_conv_ms(pr['ort-static']):.0f} ms.",
            "",
        ]
        if r.get("advice"):
            out += [f"What `zsq export` / `zsq bench-deploy` print for the default W8A8 model on this CPU: "
                    f"\"{r['advice'][0].split(': ', 1)[1]}\".", ""]
    out += [
        "The exporter writes the graph the way ONNX Runtime's QDQ transformer expects (see "
        "`src/zsq/export/onnx_qdq.py`): no unused nodes (earlier exports left a DequantizeLinear per residual "
        "block that ONNX Runtime ran, each behind a Transpose out of its NHWC layout); Slice, Pad, Flatten, "
        "Reshape and MaxPool move uint8 codes; a tensor requantized on another grid goes through `+ 0` "
        "(`DQ -> Add -> Q`), which runs as one vectorised QLinearAdd pass instead of DequantizeLinear + "
        "QuantizeLinear; the average pool is quantized right away (QLinearGlobalAveragePool); a 1x1 conv whose "
        "output stays float is an integer MatMulInteger on NHWC codes (u8s8 with 7-bit weights) instead of "
        "ConvInteger. What remains different from ORT's graphs comes from zsq's quantizer placement, not from "
        "the export: zsq requantizes the option-A shortcut of a CIFAR ResNet (the strided Slice + zero Pad of a "
        "block input gets its own grid: one QLinearAdd `+ 0` pass at each of the 2 downsampling blocks). "
        "EfficientNet's head conv output is quantized before the average pool (since this run's code), so "
        "its head runs as QLinearConv + QLinearGlobalAveragePool, as in ORT's own graph.",
        "",
        "On a CPU with AVX-512 VNNI or AVX-VNNI VPDPBUSD accumulates in 32 bits, int8 weights are exact, and "
        "`zsq export --weight-type int8` (or W7) is the fast choice; on AVX2-only CPUs the default keeps the "
        "exported model equal to the PyTorch model and W7 is the exact fast route.",
        "",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "runs" / "deploy"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "DEPLOY_RESULTS.md"))
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 distillation iterations, 64 images, 2 reps")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite --out from <work>/deploy_results.json of an earlier run, measuring nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        data = json.loads((Path(args.work) / "deploy_results.json").read_text())
        for k, v in data.get("args", {}).items():
            setattr(args, k, v)
        md = markdown(data["results"], data["environment"], args)
        Path(args.out).write_text(md + "\n")
        print(md)
        return 0
    if args.quick:
        args.reps, args.warmup, args.profile_runs = 2, 1, 1
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        results.append(bench_model(name, MODELS[name], work, args))
        (work / "deploy_results.json").write_text(json.dumps(results, indent=2, default=str))
    env = environment()
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    md = markdown(results, env, args)
    Path(args.out).write_text(md + "\n")
    run_args = {k: getattr(args, k) for k in ("reps", "warmup", "threads", "profile_runs")}
    (work / "deploy_results.json").write_text(json.dumps({"environment": env, "results": results, "args": run_args},
                                                         indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
