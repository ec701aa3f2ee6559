"""Cost of ZeroQ distillation on this CPU: seconds per iteration and achieved GFLOP/s.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE \
      .venv/bin/python benchmarks/cost.py --md benchmarks/COST_RESULTS.md

FLOPs of one distillation step (forward + backward w.r.t. the input, on the BN-folded model zsq
distils with) are counted with torch.utils.flop_counter; the peak is the best of several fp32
2048x2048 matrix multiplies with the same thread count.

``--breakdown`` (with ``--compile``) instead profiles the channels-last step and splits its time and FLOPs
by kind of operation (depthwise / pointwise / dense conv, BN statistics, elementwise, optimizer, ...); it
writes benchmarks/COST_BREAKDOWN.md and benchmarks/cost_breakdown.json:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src \
      .venv/bin/python benchmarks/cost.py --breakdown --compile --models efficientnet_lite0,cifar_resnet20
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import zsq
from zsq.config import DistillConfig
from zsq.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {
    "cifar_resnet20": SHARED / "models/resnet-cifar10-akamaster/resnet20-12fca82f.th",
    "efficientnet_lite0": None,
}


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(model, x) -> int:
    folded, _ = zsq.fold_batchnorm(model)
    for p in folded.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        folded(x).sum().backward()
    return fc.get_total_flops()


# ----------------------------------------------------------------------------------------------
# --breakdown: where the time of one distillation step goes, per kind of operation
# ----------------------------------------------------------------------------------------------
#
# Attribution. One zsq.distill call runs under torch.profiler (CPU, record_shapes=True); the steps
# between the (warm + 1)-th and the (warm + steps + 1)-th "Optimizer.zero_grad" event are kept. Each
# top-level event and its whole subtree get one category (self-CPU times are summed), decided top-down:
#   * Optimizer.* (Adam step, zero_grad)                           -> optimizer
#   * _ChannelStats (the autograd.Function's forward) and the
#     _ChannelStatsBackward node                                    -> bn_stats
#   * aten::conv2d / aten::convolution (forward) and the
#     ConvolutionBackward node (aten::convolution_backward)         -> by the recorded weight shape and
#     groups argument: groups == C_in > 1 -> depthwise; groups == 1 and 1x1 -> pointwise; else dense
#   * inside "autograd::engine::evaluate_function: X", the events that are not the node X itself are the
#     engine summing the gradients of a tensor that has several consumers (a conv output feeds both
#     channel_stats and the next layer; residual inputs feed two branches)  -> grad_accum
#   * anything else by op name and recorded shapes: pad/slice copies -> padding; ops whose tensor inputs
#     are all <= 1-D (per-channel loss terms, scalars) -> per_channel; relu/hardtanh/clamp/add/mul/...
#     -> elementwise; linear/addmm/mm -> linear; the rest -> other.
# So a conv's backward is attributed to the same category as its forward (same weight shape, groups).
# FLOPs are computed from the recorded shapes exactly as torch.utils.flop_counter counts them (conv:
# 2 * N * C_out * H_out * W_out * C_in/groups * kh * kw for the forward and again for the input gradient;
# weights need no gradient; mm/addmm: 2 * M * K * N) and checked against step_flops.
# The heap is pre-touched before profiling (pretouch_heap): otherwise the profiler's own allocations send the
# step's large activations to fresh pages and the profile charges page faults to the large-tensor ops.

BREAKDOWN_CATEGORIES = {
    "depthwise_conv": "depthwise conv (groups = C_in)",
    "pointwise_conv": "pointwise 1x1 conv",
    "dense_conv": "dense kxk conv",
    "linear": "linear (classifier)",
    "bn_stats": "BN statistics: channel_stats fwd + bwd",
    "grad_accum": "autograd sums of fan-out gradients",
    "elementwise": "elementwise / activation / input clip",
    "padding": "padding / slicing copies",
    "per_channel": "per-channel + scalar loss ops",
    "optimizer": "optimizer (Adam step, zero_grad)",
    "other": "other",
}
CONV_CATEGORIES = ("depthwise_conv", "pointwise_conv", "dense_conv")
FLOP_CATEGORIES = CONV_CATEGORIES + ("linear",)
_EVAL_FN = "autograd::engine::evaluate_function: "
_PAD_OPS = {"pad", "constant_pad_nd", "slice", "narrow", "slice_backward", "constantpadnd", "constant_pad_nd_backward"}
_ELEMENTWISE_OPS = {
    "relu", "relu_", "clamp_min", "clamp_min_", "hardtanh", "hardtanh_", "hardtanh_backward", "threshold_backward",
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "clamp", "clamp_", "min", "max", "minimum",
    "maximum", "copy_", "where", "neg", "abs", "sqrt", "pow", "addcmul", "addcmul_", "threshold",
}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul"}
# ops whose recorded shapes give an estimate of the bytes they move (reads of every tensor input >= 2-D,
# plus one write of the largest; reductions write nothing sizeable; fill/zero only write; copy reads + writes).
# Only the outermost such aten op of a subtree counts (aten::mean, not the aten::sum inside it).
_REDUCTIONS = {"sum", "mean"}
_WRITE_ONLY = {"fill_", "zero_"}
_TRAFFIC_OPS = _ELEMENTWISE_OPS | _REDUCTIONS | _WRITE_ONLY | {"addcdiv_", "lerp_", "sqrt_"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tensor_shapes(e) -> list[list[int]]:
    """Shapes of the tensor arguments of a profiler event (non-tensor arguments have a concrete value)."""
    shapes = e.input_shapes or []
    conc = getattr(e, "concrete_inputs", None) or [None] * len(shapes)
    return [s for s, c in zip(shapes, conc) if c is None and isinstance(s, list)]


def _base_op(name: str) -> str:
    if name.startswith("aten::"):
        return name[6:]
    for suffix in ("Backward0", "Backward1", "Backward2"):
        if name.endswith(suffix):
            return name[: -len(suffix)].lower()
    return name


def _conv_info(e) -> dict | None:
    """Input/weight shapes, stride, padding, dilation, groups of the conv in ``e``'s subtree (or None)."""
    todo = [e]
    while todo:
        ev = todo.pop(0)
        sh, cc = ev.input_shapes or [], getattr(ev, "concrete_inputs", None) or []
        if ev.name == "aten::convolution" and len(cc) >= 9:
            return {"input": sh[0], "weight": sh[1], "stride": cc[3], "padding": cc[4], "dilation": cc[5],
                    "groups": int(cc[8]), "backward": False}
        if ev.name == "aten::convolution_backward" and len(cc) >= 11:
            return {"grad_out": sh[0], "input": sh[1], "weight": sh[2], "stride": cc[4], "padding": cc[5],
                    "dilation": cc[6], "groups": int(cc[9]), "output_mask": cc[10], "backward": True}
        todo.extend(ev.cpu_children)
    return None


def _conv_category(info: dict) -> str:
    cin, (_, _, kh, kw), g = info["input"][1], info["weight"], info["groups"]
    if g > 1 and g == cin:
        return "depthwise_conv"
    if g == 1 and kh == 1 and kw == 1:
        return "pointwise_conv"
    return "dense_conv"


def _conv_out_hw(info: dict) -> tuple[int, int]:
    if "grad_out" in info:
        return int(info["grad_out"][2]), int(info["grad_out"][3])
    _, _, h, w = info["input"]
    _, _, kh, kw = info["weight"]
    (sh, sw), (ph, pw), (dh, dw) = info["stride"], info["padding"], info["dilation"]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _conv_cost(info: dict) -> tuple[int, int]:
    """(FLOPs, fp32 bytes of activations + weights read/written) of one conv event, as flop_counter counts."""
    n, cin, h, w = (int(v) for v in info["input"])
    cout, cig, kh, kw = (int(v) for v in info["weight"])
    ho, wo = _conv_out_hw(info)
    one = 2 * n * cout * ho * wo * cig * kh * kw
    nbytes = 4 * (n * cin * h * w + n * cout * ho * wo + cout * cig * kh * kw)
    if not info["backward"]:
        return one, nbytes
    mask = info.get("output_mask") or [True, False, False]
    return one * (int(bool(mask[0])) + int(bool(mask[1]))), nbytes


def _mm_flops(e) -> int:
    mats = [s for s in _tensor_shapes(e) if len(s) == 2]
    if len(mats) < 2:
        return 0
    (m, k), (_, n) = mats[-2], mats[-1]
    return 2 * int(m) * int(k) * int(n)


def _traffic_bytes(e) -> int:
    base = _base_op(e.name)
    shapes = [s for s in _tensor_shapes(e) if len(s) >= 2]
    if not shapes:
        return 0
    big = max(_numel(s) for s in shapes)
    if base in _WRITE_ONLY:
        return 4 * big
    if base == "copy_":
        return 8 * big
    if base in _REDUCTIONS:
        return 4 * sum(_numel(s) for s in shapes)
    return 4 * (sum(_numel(s) for s in shapes) + big)


def _generic_category(e) -> str:
    base = _base_op(e.name)
    if base in _PAD_OPS:
        return "padding"
    shapes = _tensor_shapes(e)
    if all(len(s) <= 1 for s in shapes):
        return "per_channel"
    if base in _ELEMENTWISE_OPS:
        return "elementwise"
    if base in _LINEAR_OPS:
        return "linear"
    return "other"


def _anchor_category(e) -> str | None:
    if e.name.startswith("Optimizer."):
        return "optimizer"
    if e.name.startswith("_ChannelStats"):  # forward (autograd.Function apply) and _ChannelStatsBackward
        return "bn_stats"
    if e.name in ("aten::conv2d", "aten::convolution", "aten::_convolution") or e.name.startswith("ConvolutionBackward"):
        info = _conv_info(e)
        return _conv_category(info) if info is not None else "dense_conv"
    return None


class _Tally:
    def __init__(self) -> None:
        self.cat = {c: {"fwd_us": 0.0, "bwd_us": 0.0, "flops": 0, "bytes": 0, "events": 0, "kernels": {}}
                    for c in BREAKDOWN_CATEGORIES}
        self.conv_layers: dict[tuple, dict] = {}  # per conv signature: times, FLOPs, bytes
        self.stats_input_bytes = 0  # fp32 bytes of every tensor channel_stats reduces (the BN-layer activations)

    def add_subtree(self, e, cat: str, backward: bool, conv_key: tuple | None = None, counted: bool = False) -> None:
        d = self.cat[cat]
        d["bwd_us" if backward else "fwd_us"] += e.self_cpu_time_total
        d["events"] += 1
        d["kernels"][e.name] = d["kernels"].get(e.name, 0.0) + e.self_cpu_time_total
        if conv_key is not None:
            self.conv_layers[conv_key]["bwd_us" if backward else "fwd_us"] += e.self_cpu_time_total
        # bytes: the outermost elementwise / reduction aten op counts (aten::mean, not the aten::sum and fill_ inside it)
        if not counted and cat not in CONV_CATEGORIES and e.name.startswith("aten::") and _base_op(e.name) in _TRAFFIC_OPS:
            d["bytes"] += _traffic_bytes(e)
            counted = True
        if cat == "linear" and e.name in ("aten::addmm", "aten::mm"):
            d["flops"] += _mm_flops(e)
        for c in e.cpu_children:
            self.add_subtree(c, cat, backward, conv_key, counted)

    def add_top(self, e) -> None:
        if e.name.startswith(_EVAL_FN):
            node = e.name[len(_EVAL_FN):]
            node_ev = next((c for c in e.cpu_children if c.name == node), None)
            cat = (_anchor_category(node_ev) or _generic_category(node_ev)) if node_ev is not None else "other"
            key = self._conv(node_ev, cat) if node_ev is not None else None
            self.cat[cat]["bwd_us"] += e.self_cpu_time_total
            self.cat[cat]["events"] += 1
            for c in e.cpu_children:
                if c is node_ev:
                    self.add_subtree(c, cat, True, key)
                else:
                    self.add_subtree(c, "grad_accum", True)
            return
        cat = _anchor_category(e) or _generic_category(e)
        if e.name == "_ChannelStats" and e.input_shapes:
            self.stats_input_bytes += 4 * _numel(e.input_shapes[0])
        self.add_subtree(e, cat, False, self._conv(e, cat))

    def _conv(self, e, cat: str) -> tuple | None:
        if cat not in CONV_CATEGORIES:
            return None
        info = _conv_info(e)
        if info is None:
            return None
        flops, nbytes = _conv_cost(info)
        self.cat[cat]["flops"] += flops
        self.cat[cat]["bytes"] += nbytes
        n, cin, h, w = (int(v) for v in info["input"])
        cout, _, kh, kw = (int(v) for v in info["weight"])
        key = (cat, cin, cout, h, w, kh, tuple(info["stride"]), info["groups"])
        d = self.conv_layers.setdefault(key, {"fwd_us": 0.0, "bwd_us": 0.0, "flops": 0, "bytes": 0, "calls": 0})
        d["flops"] += flops
        d["bytes"] += nbytes
        d["calls"] += 1
        return key


def copy_bandwidth_gbs(mbytes: int = 256, reps: int = 5) -> float:
    """Best-of-``reps`` bandwidth of ``dst.copy_(src)`` on ``mbytes`` MB fp32 tensors (read + write counted)."""
    n = mbytes * 2**20 // 4
    src, dst = torch.randn(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * 4 * n / best / 1e9


def _usage() -> tuple[float, float, int]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _usage_since(u0: tuple[float, float, int], wall0: float) -> dict:
    u1 = _usage()
    return {"wall_s": time.perf_counter() - wall0, "user_s": u1[0] - u0[0], "sys_s": u1[1] - u0[1],
            "minor_faults": u1[2] - u0[2]}


def pretouch_heap(gbytes: float) -> None:
    """Grow the glibc heap by ``gbytes`` of touched pages and free them again (kept: the trim threshold of
    zsq's runtime environment is 4 GB). Without it, the profiler's own small allocations fragment the heap
    and every step's large activations land on fresh pages: ~50k page faults (~0.3 s of kernel time) per
    Lite0 step that the unprofiled run does not have."""
    if gbytes > 0:
        t = torch.empty(int(gbytes * 2**30) // 4)
        t.fill_(0)
        del t


def profile_distill_step(model, spec, bs: int, *, warm: int, steps: int, pretouch_gb: float) -> dict:
    """Per-category self-CPU time (fwd / bwd), FLOPs and bytes of ``steps`` zsq distillation steps."""
    from torch.profiler import ProfilerActivity, profile

    cfg = DistillConfig(batch_size=bs, iterations=warm + steps + 1, channels_last=True)
    zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=bs, iterations=1, channels_last=True), progress=False)
    pretouch_heap(pretouch_gb)
    u0, w0 = _usage(), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        zsq.distill(model, spec.preprocessing, cfg, progress=False)
    usage = _usage_since(u0, w0)
    usage["iterations"] = cfg.iterations
    events = prof.events()
    marks = sorted(e.time_range.start for e in events if e.name.startswith("Optimizer.zero_grad"))
    t0, t1 = marks[warm], marks[warm + steps]
    tally = _Tally()
    traced = 0.0
    for e in events:
        if e.cpu_parent is None and t0 <= e.time_range.start < t1:
            tally.add_top(e)
            traced += e.cpu_time_total
    wall_us = t1 - t0
    cats = {}
    for c, d in tally.cat.items():
        cats[c] = {"ms": (d["fwd_us"] + d["bwd_us"]) / steps / 1e3, "fwd_ms": d["fwd_us"] / steps / 1e3,
                   "bwd_ms": d["bwd_us"] / steps / 1e3, "flops": d["flops"] // steps, "bytes": d["bytes"] // steps,
                   "events": d["events"] // steps,
                   "top_ops": {k: round(v / steps / 1e3, 3) for k, v in
                               sorted(d["kernels"].items(), key=lambda kv: -kv[1])[:6]}}
    cats["untraced"] = {"ms": (wall_us - traced) / steps / 1e3, "fwd_ms": 0.0, "bwd_ms": 0.0, "flops": 0, "bytes": 0,
                        "events": 0, "top_ops": {}}
    layers = []
    for (cat, cin, cout, h, w, k, stride, groups), d in sorted(tally.conv_layers.items(),
                                                                 key=lambda kv: -(kv[1]["fwd_us"] + kv[1]["bwd_us"])):
        layers.append({"category": cat, "c_in": cin, "c_out": cout, "h": h, "w": w, "k": k, "stride": list(stride),
                       "groups": groups, "layers": d["calls"] // (2 * steps), "fwd_ms": d["fwd_us"] / steps / 1e3,
                       "bwd_ms": d["bwd_us"] / steps / 1e3, "flops": d["flops"] // steps, "bytes": d["bytes"] // steps})
    return {"step_ms_profiled": wall_us / steps / 1e3, "categories": cats, "conv_layers": layers,
            "profiled_steps": steps, "warmup_steps_in_profiled_call": warm, "profiled_call_usage": usage,
            "channel_stats_input_bytes": tally.stats_input_bytes // steps,
            "pretouch_gb": pretouch_gb}


SCENARIOS = {
    "measured": "as measured (unprofiled s / iteration)",
    "depthwise_at_pointwise_efficiency": "depthwise convs at the pointwise convs' GFLOP/s, rest unchanged",
    "depthwise_at_copy_bandwidth": "depthwise convs moving their minimum bytes at the copy bandwidth, rest unchanged",
    "no_bn_stats_cost": "BN statistics + fan-out gradient sums free (e.g. fused into the convs), rest unchanged",
    "bn_stats_at_min_traffic": "BN statistics at minimum traffic (forward reads each activation once, backward reads "
                               "it once and writes its gradient once) at the copy bandwidth, rest unchanged",
    "no_padding_cost": "padding copies free (pad inside the conv), rest unchanged",
    "only_conv_and_linear_time": "only conv + linear time counts (every non-conv category takes 0)",
    "only_conv_and_linear_time_and_depthwise_at_pointwise_efficiency": "only convs take time, depthwise at pointwise GFLOP/s",
}


def _scenarios(cats: dict, total_flops: int, s_it: float, peak: float, bw_gbs: float, stats_bytes: int) -> dict:
    """What-if step times (s) and % of the matmul peak. Removed / replaced times are the profiled ones,
    taken off the unprofiled s / iteration."""
    ms = {c: d["ms"] for c, d in cats.items()}
    conv_ms = sum(ms[c] for c in FLOP_CATEGORIES)
    pw_rate = cats["pointwise_conv"]["flops"] / (ms["pointwise_conv"] / 1e3) if ms["pointwise_conv"] > 0 else float("nan")
    dw_ms, dw_flops = ms["depthwise_conv"], cats["depthwise_conv"]["flops"]
    dw_at_pw_ms = dw_flops / pw_rate * 1e3 if dw_flops else 0.0
    dw_at_bw_ms = cats["depthwise_conv"]["bytes"] / (bw_gbs * 1e9) * 1e3
    out = {
        "measured": s_it,
        "depthwise_at_pointwise_efficiency": s_it - (dw_ms - dw_at_pw_ms) / 1e3,
        "depthwise_at_copy_bandwidth": s_it - (dw_ms - dw_at_bw_ms) / 1e3,
        "no_bn_stats_cost": s_it - (ms["bn_stats"] + ms["grad_accum"]) / 1e3,
        "bn_stats_at_min_traffic": s_it - ms["bn_stats"] / 1e3 + 3 * stats_bytes / (bw_gbs * 1e9),
        "no_padding_cost": s_it - ms["padding"] / 1e3,
        "only_conv_and_linear_time": conv_ms / 1e3,
        "only_conv_and_linear_time_and_depthwise_at_pointwise_efficiency": (conv_ms - dw_ms + dw_at_pw_ms) / 1e3,
    }
    res = {k: {"s_per_step": v, "pct_of_peak": 100 * total_flops / v / 1e9 / peak} for k, v in out.items()}
    need_s = total_flops / (0.4 * peak * 1e9)
    res["target_40pct"] = {"s_per_step_needed": need_s,
                           "depthwise_ms_allowed_rest_unchanged": (need_s - (s_it - dw_ms / 1e3)) * 1e3,
                           "depthwise_ms_allowed_only_convs_take_time": (need_s - (conv_ms - dw_ms) / 1e3) * 1e3,
                           "non_conv_ms_allowed_convs_unchanged": (need_s - conv_ms / 1e3) * 1e3}
    return res


def breakdown_model(name: str, bs: int, iters: int, warm: int, steps: int, pretouch_gb: float) -> dict | None:
    w = MODELS.get(name)
    if w is not None and not w.exists():
        print(f"skip {name}: {w} not found")
        return None
    model, spec = load_model(name, weights=w)
    h, wd = spec.preprocessing.input_size
    counted = step_flops(model, torch.randn(bs, 3, h, wd))
    t = time.perf_counter()
    zsq.fold_batchnorm(model)
    fold_s = time.perf_counter() - t
    cfg = DistillConfig(batch_size=bs, iterations=iters, channels_last=True)
    zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=bs, iterations=1, channels_last=True), progress=False)
    u0, w0 = _usage(), time.perf_counter()
    s_before = zsq.distill(model, spec.preprocessing, cfg, progress=False).seconds / iters
    usage_before = _usage_since(u0, w0)
    prof = profile_distill_step(model, spec, bs, warm=warm, steps=steps, pretouch_gb=pretouch_gb)
    u0, w0 = _usage(), time.perf_counter()
    s_after = zsq.distill(model, spec.preprocessing, cfg, progress=False).seconds / iters
    usage_after = _usage_since(u0, w0)
    return {"model": name, "batch": bs, "layout": "channels_last", "s_per_iteration": (s_before + s_after) / 2,
            "s_per_iteration_before_profile": s_before, "s_per_iteration_after_profile": s_after,
            "timed_iterations": iters, "fold_batchnorm_s": fold_s, "unprofiled_usage": [usage_before, usage_after],
            "flops_step_flop_counter": counted, **prof}


def _compile_child(name: str, bs: int, iters: int, threads: int, out: str) -> None:
    """Eager vs torch.compile'd distillation step (forward + BN-statistics loss + backward w.r.t. the input,
    then the same eager Adam step and clip as zsq.distill). Writes a JSON dict to ``out``."""
    import json

    import torch._inductor.config as inductor_config

    from zsq.bn_stats import bn_loss, capture_bn_inputs_folded, channel_stats, require_batchnorm
    from zsq.distill.zeroq import natural_input_stats

    torch.set_num_threads(threads)
    inductor_config.compile_threads = 1  # one core for this job
    pretouch_heap(2.0)  # as in the breakdown: no first-touch page faults in the short timed runs
    res: dict = {"model": name, "batch": bs, "threads": threads, "torch": torch.__version__}

    def dump() -> None:
        Path(out).write_text(json.dumps(res))

    model, spec = load_model(name, weights=MODELS.get(name))
    cfg = DistillConfig(batch_size=bs)
    targets = require_batchnorm(model, what="ZeroQ distillation")
    folded, report = zsq.fold_batchnorm(model)
    folded.eval()
    for p in folded.parameters():
        p.requires_grad_(False)
    folded.to(memory_format=torch.channels_last)
    lo, hi = (t.view(1, -1, 1, 1) for t in spec.preprocessing.input_range())
    in_mean, in_std = natural_input_stats(spec.preprocessing)
    h, w = spec.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    x0 = torch.max(torch.min(torch.randn(bs, 3, h, w, generator=gen), hi), lo).contiguous(memory_format=torch.channels_last)
    with capture_bn_inputs_folded(folded, report.folded, targets) as stats:
        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            stats.clear()
            folded(x)
            loss = bn_loss(targets, stats)
            m, s = channel_stats(x)
            return loss + cfg.input_weight * ((m - in_mean).pow(2).mean() + (s - in_std).pow(2).mean())

        def run(fn, n: int) -> tuple[float, list[float]]:
            x = x0.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            times, losses = [], []
            for _ in range(n):
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = fn(x)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
                losses.append(float(loss.detach()))
                times.append(time.perf_counter() - t)
            return times, losses

        run(loss_fn, 2)
        eager_t, eager_l = run(loss_fn, iters)
        res["eager_s_per_iteration"] = min(eager_t)
        res["eager_s_per_iteration_mean"] = sum(eager_t) / len(eager_t)
        dump()
        compiled = torch.compile(loss_fn)
        t = time.perf_counter()
        try:
            first_t, first_l = run(compiled, 1)
        except Exception as exc:  # record inductor failures honestly
            res["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            res["failed_after_s"] = time.perf_counter() - t
            dump()
            return
        res["first_call_s"] = first_t[0]
        res["compile_s"] = first_t[0] - res["eager_s_per_iteration"]
        comp_t, comp_l = run(compiled, iters + 1)
        res["compiled_s_per_iteration"] = min(comp_t[1:])
        res["compiled_s_per_iteration_mean"] = sum(comp_t[1:]) / len(comp_t[1:])
        res["recompiles_or_graph_breaks"] = _dynamo_counters()
        res["loss_first_step_eager"], res["loss_first_step_compiled"] = eager_l[0], comp_l[0]
        res["losses_eager"], res["losses_compiled"] = eager_l, comp_l[: len(eager_l)]
        dump()
        # where the time goes, eager vs compiled: 2 profiled steps each (heap pre-touched, see pretouch_heap)
        pretouch_heap(2.0)
        res["split_ms_per_step"] = {"eager": _split_profile(lambda: run(loss_fn, 2)),
                                    "compiled": _split_profile(lambda: run(compiled, 2))}
    dump()


def _split_profile(fn, steps: int = 2) -> dict:
    """Self-CPU ms / step of: oneDNN convolutions (forward + backward), inductor-generated kernels, the rest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = {"convolutions": 0.0, "inductor_kernels": 0.0, "rest": 0.0}
    for k in prof.key_averages():
        if k.key in ("aten::mkldnn_convolution", "aten::convolution_backward"):
            out["convolutions"] += k.self_cpu_time_total
        elif "CompiledFxGraph" in k.key:
            out["inductor_kernels"] += k.self_cpu_time_total
        else:
            out["rest"] += k.self_cpu_time_total
    return {k: v / steps / 1e3 for k, v in out.items()}


def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items() if k in ("graph_break", "stats", "frames")}


def compile_measurement(name: str, bs: int, iters: int, threads: int, timeout_s: int) -> dict:
    """Run :func:`_compile_child` in a subprocess (so a hung or too-long compile can be stopped)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compile.json"
        cmd = [sys.executable, __file__, "--_compile-child", name, "--batches", str(bs), "--iters", str(iters),
               "--threads", str(threads), "--json", str(out)]
        t = time.perf_counter()
        try:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor_cache")}  # cold compile
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            err = proc.stderr[-3000:] if proc.returncode != 0 else None
        except subprocess.TimeoutExpired:
            proc, err = None, f"timed out after {timeout_s} s (compile did not finish)"
        res = json.loads(out.read_text()) if out.exists() else {"model": name, "batch": bs}
        res["child_wall_s"] = time.perf_counter() - t
        if err and "error" not in res:
            res["error"] = err
        return res


def _fmt_ms(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def breakdown_markdown(results: list[dict], meta: dict) -> str:
    import os

    peak, bw = meta["peak_gflops"], meta["copy_bandwidth_gbs"]
    L = [
        "# Where a ZeroQ distillation step spends its time (benchmarks/cost.py --breakdown)",
        "",
        "Regenerate with:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"* torch {meta['torch']}, **{meta['threads']} thread** (torch.set_num_threads), "
        f"layout channels_last, batch {', '.join(sorted({str(r['batch']) for r in results}))}; CPU: {meta['cpu']}.",
        f"* Load average (1/5/15 min) before: {meta['loadavg_before']}, after: {meta['loadavg_after']} on "
        f"{os.cpu_count()} cores" + (" (other processes were running: not an idle machine; expect a few % of "
                                     "run-to-run noise)." if meta["loadavg_before"][0] > 0.5 else "."),
        f"* fp32 matmul peak ({meta['threads']} thread, 2048x2048, best of 5; measured at the start and at the end): "
        f"{meta['peak_start_gflops']:.1f} / {meta['peak_end_gflops']:.1f} GFLOP/s; the higher, **{peak:.1f} GFLOP/s**, "
        "is used as the peak.",
        f"* Memory bandwidth ({meta['threads']} thread, `dst.copy_(src)` of 256 MB, best of 5, read + write counted): "
        f"**{bw:.1f} GB/s**.",
        f"* Total run time {meta['run_s'] / 60:.1f} min.",
        "",
        "How the time is attributed: one `zsq.distill` call (the same code as cost.py times) runs under",
        "`torch.profiler` (CPU, `record_shapes=True`); after warm-up steps, the events of "
        f"{results[0]['profiled_steps'] if results else '?'} whole steps (between `Optimizer.zero_grad` events) are kept. "
        "Each top-level event and its whole subtree go to one category: `Optimizer.*` -> optimizer; the",
        "`_ChannelStats` autograd.Function and its `_ChannelStatsBackward` node -> BN statistics; `aten::conv2d` and",
        "the `ConvolutionBackward0` node are classified by the recorded weight shape and `groups` argument (so a",
        "conv's backward lands in the same category as its forward); inside an autograd "
        "`evaluate_function`, the ops that are not the node itself are the engine summing gradients of tensors with",
        "two consumers (a conv output feeds channel_stats and the next layer) -> \"autograd sums\"; the rest by op "
        "name and shapes (<= 1-D tensors -> per-channel loss ops). \"untraced\" = wall time of the profiled steps "
        "not inside any profiled op (Python between ops, hooks, profiler).",
        "Before the profiled call the heap is grown by `--pretouch-gb` of touched, freed memory: without it the",
        "profiler's own allocations fragment the glibc heap, the step's large activations then land on fresh pages",
        "every step (~50k page faults, ~0.3 s of kernel time per Lite0 step, none in the unprofiled run) and the",
        "profile blames that on whichever op first writes a large new tensor (pad's fill_, pow, the depthwise backward).",
        "FLOPs are computed from the recorded shapes the way `torch.utils.flop_counter` counts them (conv forward",
        "2·N·C_out·H_out·W_out·C_in/groups·k², the input-gradient backward the same again, no weight gradient;",
        "matmuls 2·M·K·N) and checked against `step_flops` (FlopCounterMode). Bytes: conv = fp32 input + output",
        "activations + weights per call (forward, and grad_out + grad_in + weights for the backward), i.e. the",
        "minimum traffic if each tensor is touched once; other categories = sum over their elementwise/reduction",
        "kernels of (tensor inputs read + output written), from the recorded shapes (an estimate).",
        "",
    ]
    for r in results:
        cats, s_it = r["categories"], r["s_per_iteration"]
        tot_ms = sum(d["ms"] for d in cats.values())
        flops_sum = sum(cats[c]["flops"] for c in FLOP_CATEGORIES)
        n_ops = sum(d["events"] for d in cats.values())
        pu, uu = r["profiled_call_usage"], r["unprofiled_usage"]
        gfs = r["flops_step_flop_counter"] / s_it / 1e9
        L += [
            f"## {r['model']}, batch {r['batch']}",
            "",
            f"* Unprofiled: **{s_it:.3f} s / iteration** (zsq.distill, {r['timed_iterations']} iterations after a warm-up; "
            f"mean of a run before the profile, {r['s_per_iteration_before_profile']:.3f} s, and one after, "
            f"{r['s_per_iteration_after_profile']:.3f} s) = {gfs:.1f} GFLOP/s = "
            f"**{100 * gfs / peak:.0f} % of the matmul peak**.",
            f"* Profiled: {r['step_ms_profiled']:.0f} ms / step wall (sum of the categories below incl. untraced: "
            f"{tot_ms:.0f} ms; {100 * (r['step_ms_profiled'] / 1e3 / s_it - 1):+.0f} % vs unprofiled at {n_ops} profiled "
            "ops / step: the profiler's own overhead is within the run-to-run noise once the heap is pre-touched). "
            f"Activations reduced by channel_stats: {r['channel_stats_input_bytes'] / 1e6:.0f} MB / step. "
            "Page faults during the profiled call: "
            f"{pu['minor_faults']} ({pu['sys_s']:.2f} s kernel time over {pu['iterations']} iterations; heap pre-touched "
            f"with {r['pretouch_gb']:g} GB); during the unprofiled timing runs: {uu[0]['minor_faults']} / {uu[1]['minor_faults']}. "
            f"zsq.fold_batchnorm alone (the per-call setup inside zsq.distill): {r['fold_batchnorm_s']:.2f} s.",
            f"* FLOPs / step: {flops_sum / 1e9:.3f} GFLOP from the profiled shapes vs "
            f"{r['flops_step_flop_counter'] / 1e9:.3f} GFLOP by FlopCounterMode (step_flops); the difference, "
            f"{(r['flops_step_flop_counter'] - flops_sum) / 1e6:.2f} MFLOP, is the classifier's backward, which step_flops "
            "counts (it back-propagates `output.sum()`) but a distillation step never runs (the BN loss does not depend "
            "on the logits). % of peak below uses step_flops, as cost.py does.",
            "",
            "| category | fwd ms | bwd ms | ms / step | share of step | GFLOP / step | share of FLOPs | GFLOP/s | % of peak | MB moved (est.) | GB/s | FLOP / byte | ops / step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c, d in sorted(cats.items(), key=lambda kv: -kv[1]["ms"]):
            if d["ms"] <= 0 and not d["flops"] and c != "untraced":
                continue
            label = BREAKDOWN_CATEGORIES.get(c, "untraced (Python between ops, hooks, profiler)")
            fl = d["flops"]
            rate = fl / (d["ms"] / 1e3) / 1e9 if fl and d["ms"] > 0 else None
            gbs = d["bytes"] / (d["ms"] / 1e3) / 1e9 if d["bytes"] and d["ms"] > 0 else None
            fl_txt = f"{fl / 1e9:.3f}" if fl >= 1e6 or not fl else f"{fl / 1e9:.1e}"
            row = [label, _fmt_ms(d["fwd_ms"]), _fmt_ms(d["bwd_ms"]), _fmt_ms(d["ms"]), f"{100 * d['ms'] / tot_ms:.1f} %",
                   fl_txt, f"{100 * fl / flops_sum:.1f} %",
                   f"{rate:.1f}" if rate else "–", f"{100 * rate / peak:.0f} %" if rate else "–",
                   f"{d['bytes'] / 1e6:.0f}" if gbs else "–", f"{gbs:.1f}" if gbs else "–",
                   f"{fl / d['bytes']:.2f}" if fl and d["bytes"] else "–", str(d["events"])]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        L.append("Heaviest ops by self time in the conv and BN-statistics categories (ms / step): " + "; ".join(
            f"{c}: " + ", ".join(f"`{k}` {v:.1f}" for k, v in list(cats[c]["top_ops"].items())[:3])
            for c in CONV_CATEGORIES + ("bn_stats", "grad_accum") if cats[c]["ms"] > 0) + ".")
        L.append("")
        dw = [x for x in r["conv_layers"] if x["category"] == "depthwise_conv"]
        if dw:
            L += ["Depthwise convolutions by shape (all layers of that shape together; roofline bound = FLOP/byte × copy bandwidth):",
                  "",
                  "| C | H×W in | k | stride | layers | fwd ms | bwd ms | GFLOP | GFLOP/s | % of peak | GB/s | FLOP / byte | roofline GFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for x in dw:
                t = (x["fwd_ms"] + x["bwd_ms"]) / 1e3
                ai = x["flops"] / x["bytes"]
                L.append(f"| {x['c_in']} | {x['h']}×{x['w']} | {x['k']} | {x['stride'][0]} | {x['layers']} | {x['fwd_ms']:.1f} | "
                         f"{x['bwd_ms']:.1f} | {x['flops'] / 1e9:.3f} | {x['flops'] / t / 1e9:.1f} | "
                         f"{100 * x['flops'] / t / 1e9 / peak:.0f} % | {x['bytes'] / t / 1e9:.1f} | {ai:.2f} | {ai * bw:.0f} |")
            L.append("")
        sc = r["scenarios"]
        L += ["What would be needed (times taken off / replaced are the profiled ones, applied to the unprofiled "
              "s / iteration):", "", "| scenario | s / step | % of peak |", "| --- | --- | --- |"]
        for k, label in SCENARIOS.items():
            L.append(f"| {label} | {sc[k]['s_per_step']:.3f} | {sc[k]['pct_of_peak']:.0f} % |")
        tg = sc["target_40pct"]
        non_conv = tot_ms - sum(cats[c]["ms"] for c in FLOP_CATEGORIES)
        line = f"40 % of the peak needs ≤ {tg['s_per_step_needed']:.3f} s / step. "
        if cats["depthwise_conv"]["ms"] > 0:
            allowed = tg["depthwise_ms_allowed_rest_unchanged"]
            line += ("Depthwise time that would allow it with everything else unchanged: "
                     + (f"{allowed:.0f} ms" if allowed > 0 else
                        f"none (the rest alone is {-allowed:.0f} ms over the budget)")
                     + f" (now {cats['depthwise_conv']['ms']:.0f} ms); with only the convs taking time: "
                     f"{tg['depthwise_ms_allowed_only_convs_take_time']:.0f} ms. ")
        line += (f"Non-conv time that would allow it with the convs as they are: "
                 f"{tg['non_conv_ms_allowed_convs_unchanged']:.0f} ms (now {non_conv:.0f} ms profiled).")
        L += ["", line, ""]
    comp = meta.get("compile")
    if comp:
        L += ["## torch.compile (inductor), distillation step", "",
              "The compiled function is forward + BN-statistics loss (the same hooks, `channel_stats` and `bn_loss`) on "
              "the BN-folded channels-last model; `loss.backward()` runs its AOT-compiled backward; Adam and the "
              "clip stay eager, as in zsq.distill. Run in a subprocess with a time limit, a fresh (cold) inductor cache "
              f"directory, inductor `compile_threads = 1`, {meta['threads']} torch thread; eager and compiled "
              f"timed in the same process, best and mean of {meta['iters']} steps.", ""]
        rows, fails = [], []
        for c in comp:
            if "error" in c:
                err = c["error"].strip()
                fails.append(f"* {c['model']} batch {c['batch']}: **failed / not finished** after {c.get('child_wall_s', 0):.0f} s: "
                             f"`{(err.splitlines()[-1] if err else '')[:400]}`"
                             + (f" (eager {c['eager_s_per_iteration']:.3f} s / iteration)" if "eager_s_per_iteration" in c else ""))
                continue
            cnt = c.get("recompiles_or_graph_breaks", {})
            graphs = cnt.get("stats", {}).get("unique_graphs", "?")
            breaks = sum(cnt.get("graph_break", {}).values())
            sp = c.get("split_ms_per_step", {})
            split = " / ".join(f"{sp[m]['convolutions']:.0f} + {sp[m]['inductor_kernels']:.0f} + {sp[m]['rest']:.0f}"
                               for m in ("eager", "compiled") if m in sp)
            rows.append(f"| {c['model']} | {c['batch']} | {c['compile_s']:.0f} | {c['eager_s_per_iteration']:.3f} / "
                        f"{c['eager_s_per_iteration_mean']:.3f} | {c['compiled_s_per_iteration']:.3f} / "
                        f"{c['compiled_s_per_iteration_mean']:.3f} | "
                        f"{c['eager_s_per_iteration'] / c['compiled_s_per_iteration']:.2f}x | {graphs} / {breaks} | {split} | "
                        f"{c['loss_first_step_eager']:.5f} / {c['loss_first_step_compiled']:.5f} |")
        if rows:
            L += ["| model | batch | compile s (first call − eager step) | eager s / it (best / mean) | compiled s / it "
                  "(best / mean) | speed-up (best) | graphs / graph breaks | profiled ms / step, eager / compiled: oneDNN "
                  "convs + inductor kernels + rest | loss step 1 eager / compiled |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
        L += fails
    return "\n".join(L)


def run_breakdown(args) -> None:
    import json
    import os
    import platform
    import shlex
    import sys

    t_start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    threads = args.threads
    torch.set_num_threads(threads)
    pretouch_heap(args.pretouch_gb)  # also for the unprofiled timings: no first-touch page faults in a 5-step run
    peak_start = matmul_peak_gflops()
    bw = copy_bandwidth_gbs()
    print(f"peak {peak_start:.1f} GFLOP/s, copy bandwidth {bw:.1f} GB/s ({threads} thread)", flush=True)
    results = []
    for name in args.models.split(","):
        for bs in [int(b) for b in args.batches.split(",")]:
            r = breakdown_model(name, bs, args.iters, args.warm_steps, args.profile_steps, args.pretouch_gb)
            if r is not None:
                results.append(r)
                print(f"{name} batch {bs}: {r['s_per_iteration']:.3f} s/it, profiled {r['step_ms_profiled']:.0f} ms/step",
                      flush=True)
    comp = []
    if args.compile:
        for cname in args.compile_model.split(","):
            for bs in [int(b) for b in args.batches.split(",")]:
                c = compile_measurement(cname, bs, args.iters, threads, args.compile_timeout)
                comp.append(c)
                print("compile:", {k: v for k, v in c.items() if not k.startswith("losses")}, flush=True)
    peak_end = matmul_peak_gflops()
    peak = max(peak_start, peak_end)
    for r in results:
        r["scenarios"] = _scenarios(r["categories"], r["flops_step_flop_counter"], r["s_per_iteration"], peak, bw,
                                   r["channel_stats_input_bytes"])
        r["pct_of_peak"] = 100 * r["flops_step_flop_counter"] / r["s_per_iteration"] / 1e9 / peak
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                   if k in os.environ)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {
        "command": f"{env} PYTHONPATH=src .venv/bin/python benchmarks/cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch": torch.__version__, "threads": threads, "cpu": cpu, "loadavg_before": load_before,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()], "peak_start_gflops": peak_start,
        "peak_end_gflops": peak_end, "peak_gflops": peak, "copy_bandwidth_gbs": bw, "compile": comp, "iters": args.iters,
        "run_s": time.perf_counter() - t_start,
    }
    md = breakdown_markdown(results, meta)
    print(md)
    Path(args.md or "benchmarks/COST_BREAKDOWN.md").write_text(md + "\n")
    Path(args.json or "benchmarks/cost_breakdown.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=None, help="default 16,32,64 (16 with --breakdown)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default 2 (1 with --breakdown)")
    ap.add_argument("--md", default=None)
    ap.add_argument("--layouts", default="channels_last,contiguous",
                    help="memory layouts to time side by side (DistillConfig.channels_last on / off)")
    ap.add_argument("--breakdown", action="store_true",
                    help="profile the channels-last distillation step and split its time and FLOPs by kind of "
                         "operation; writes --md (default benchmarks/COST_BREAKDOWN.md) and --json "
                         "(default benchmarks/cost_breakdown.json)")
    ap.add_argument("--json", default=None, help="--breakdown: where to write the raw numbers")
    ap.add_argument("--profile-steps", type=int, default=3, help="--breakdown: profiled steps")
    ap.add_argument("--warm-steps", type=int, default=1,
                    help="--breakdown: steps of the profiled zsq.distill call that are not counted (after a separate warm-up call)")
    ap.add_argument("--pretouch-gb", type=float, default=2.0,
                    help="--breakdown: GB of heap touched and freed before profiling (keeps the profiler's own "
                         "allocations from sending the activations to fresh, page-faulting memory; 0 = off)")
    ap.add_argument("--compile", action="store_true",
                    help="--breakdown: also time a torch.compile'd distillation step (in a subprocess)")
    ap.add_argument("--compile-model", default="efficientnet_lite0", help="--compile: comma-separated models")
    ap.add_argument("--compile-timeout", type=int, default=600, help="seconds before the compile subprocess is stopped")
    ap.add_argument("--_compile-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batches is None:
        args.batches = "16" if args.breakdown else "16,32,64"
    if args.threads is None:
        args.threads = 1 if args.breakdown or args._compile_child else 2
    if args._compile_child:
        _compile_child(args._compile_child, int(args.batches.split(",")[0]), args.iters, args.threads, args.json)
        return
    if args.breakdown:
        run_breakdown(args)
        return
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    lines = [f"fp32 matmul peak ({args.threads} threads, 2048x2048): **{peak:.1f} GFLOP/s**", "",
             "| model | layout | batch | s / iteration | GFLOP / iteration | GFLOP/s | % of matmul peak |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    layouts = args.layouts.split(",")
    for name in args.models.split(","):
        w = MODELS.get(name)
        if w is not None and not w.exists():
            print(f"skip {name}: {w} not found")
            continue
        model, spec = load_model(name, weights=w)
        h, wd = spec.preprocessing.input_size
        for bs in [int(b) for b in args.batches.split(",")]:
            flops = step_flops(model, torch.randn(bs, 3, h, wd))
            for layout in layouts:
                cl = layout == "channels_last"
                zsq.distill(model, spec.preprocessing, DistillConfig(batch_size=bs, iterations=1, channels_last=cl),
                            progress=False)
                r = zsq.distill(model, spec.preprocessing,
                                DistillConfig(batch_size=bs, iterations=args.iters, channels_last=cl), progress=False)
                s_it = r.seconds / args.iters
                gfs = flops / s_it / 1e9
                lines.append(f"| {name} | {layout} | {bs} | {s_it:.3f} | {flops / 1e9:.1f} | {gfs:.1f} | "
                             f"{100 * gfs / peak:.0f} % |")
                print(lines[-1], flush=True)
    md = "\n".join(lines)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")


if __name__ == "__main__":
    main()
