"""The zero-shot quantization pipeline, stage by stage, written once:

model -> calibration data (distilled / gaussian / real) -> BN fold -> quantize -> calibrate
-> recovery (optional) -> bias correction -> evaluate (optional) -> save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import BIAS_MODES, DistillConfig, QuantConfig, recover_distill_batches
from .errors import ConfigError

log = logging.getLogger(__name__)

CALIB_SOURCES = ("distilled", "gaussian", "retro")


def check_calib_source(calib: str, *, sources: tuple[str, ...] = CALIB_SOURCES, proxy: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``calib`` names one of ``sources``, a ZeroP spec (``proxy:A,B,...`` or
    ``proxy+distilled:A,B,...``, where ``proxy``) or an existing path to real images or saved inputs."""
    from .proxy import split_calib

    if calib in sources or (proxy and split_calib(calib) is not None) or Path(calib).exists():
        return
    names = [repr(s) for s in sources] + (["'proxy:A,B,...'", "'proxy+distilled:A,B,...'"] if proxy else [])
    raise ConfigError(f"--calib {calib!r}: expected {', '.join(names)} or an existing path to real images or saved "
                      "inputs (.pt/.safetensors, e.g. from `zsq distill`)")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``zsq quantize`` run does (all options in force end up in report.json)."""

    model: str
    weights: str | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    calib: str = "distilled"  # distilled | gaussian | PATH to real images
    calib_size: int | None = None  # images for gaussian / real calibration (default: distill batch total)
    eval: str | None = None
    eval_split: str | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 100
    device: str = "cpu"
    seed: int = 0
    mixed_precision: Any = None  # zsq.mixed_precision.MixedPrecisionConfig: choose per-layer weight bits
    bit_plan: str | None = None  # path of a bit plan JSON (per-layer weight bits) to apply
    export: str | None = None  # "onnx": also write model.int8.onnx + model.fp32.onnx
    export_weight_type: str = "auto"
    recover: Any = None  # zsq.recover.RecoverConfig: AdaRound / BRECQ / fine-tuning on the calibration data
    hybrid: bool = False  # choose per-tensor / per-channel weights per layer (zsq.hybrid)
    hybrid_threshold: float | None = None  # None: chosen on the calibration data
    hybrid_tolerance: float | None = None  # None: zsq.hybrid's default
    bias_correction: str = "auto"  # zsq.bias_correction mode: auto | weight | output | off
    # with ``recover``: distil as many inputs as the recovery recipes were chosen with (config.RECOVER_DISTILL_INPUTS*)
    # instead of distill.num_batches; what `zsq quantize --recover` does when --distill-batches is not given
    recover_distill_default: bool = False

    def __post_init__(self) -> None:
        if not self.hybrid and (self.hybrid_threshold is not None or self.hybrid_tolerance is not None):
            raise ConfigError("hybrid_threshold / hybrid_tolerance need hybrid=True (--weight-granularity hybrid)")
        if self.mixed_precision is not None and self.bit_plan is not None:
            raise ConfigError("a bit plan and mixed precision exclude each other: the plan already fixes the bits")
        if self.export not in (None, "onnx"):
            raise ConfigError(f"export must be 'onnx' or None, got {self.export!r}")
        if self.calib_size is not None and self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")
        if self.bias_correction not in BIAS_MODES:
            raise ConfigError(f"bias_correction must be one of {', '.join(BIAS_MODES)}, got {self.bias_correction!r}")
        if self.device not in ("cpu",) and not str(self.device).startswith("cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quant"] = self.quant.to_dict()
        d["distill"] = self.distill.to_dict()
        if self.mixed_precision is not None:
            d["mixed_precision"] = self.mixed_precision.to_dict()
        if self.recover is not None:
            d["recover"] = self.recover.to_dict()
        return d


@dataclass
class RunResult:
    fp32_model: nn.Module
    quantized_model: nn.Module
    spec: Any
    calib_inputs: torch.Tensor
    report: dict[str, Any]


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available here; use --device cpu")
    return dev


def distill_config_for_run(cfg: RunConfig, input_size: tuple[int, int]) -> DistillConfig:
    """``cfg.distill`` with the run's seed; with ``cfg.recover`` and ``cfg.recover_distill_default``, as many batches
    as recovery's default amount of inputs for this input size (:func:`zsq.config.recover_distill_batches`)."""
    dcfg = dataclasses.replace(cfg.distill, seed=cfg.seed)
    if cfg.recover is not None and cfg.recover_distill_default:
        bsz = dcfg.resolved_batch_size(input_size)
        batches = recover_distill_batches(input_size, bsz)
        if batches != dcfg.num_batches:
            log.info("--recover learns from the calibration inputs: distilling %d inputs (%d batches of %d), the "
                     "amount its recipe was chosen with; --distill-batches N to change", batches * bsz, batches, bsz)
            dcfg = dataclasses.replace(dcfg, num_batches=batches)
    return dcfg


def calibration_inputs(model: nn.Module, spec: Any, cfg: RunConfig, *, progress: bool) -> tuple[torch.Tensor, dict]:
    """The calibration inputs for ``cfg.calib`` and a small info dict for the report."""
    from .distill import distill, gaussian_inputs

    from .proxy import mix_with_distilled, proxy_inputs, split_calib

    dcfg = distill_config_for_run(cfg, spec.preprocessing.input_size)
    n_default = dcfg.num_batches * dcfg.resolved_batch_size(spec.preprocessing.input_size)
    proxy = split_calib(cfg.calib)
    if proxy is not None:  # ZeroP: the candidate closest to the model's BN statistics
        mode, spec_text = proxy
        x, info = proxy_inputs(model, spec.preprocessing, spec_text, num_images=cfg.calib_size or n_default,
                               seed=cfg.seed, device=cfg.device, progress=progress)
        if mode == "proxy+distilled":
            res = distill(model, spec.preprocessing, dcfg, device=cfg.device, progress=progress)
            x = mix_with_distilled(x, res.inputs, seed=cfg.seed)
            info = {**info, "source": "proxy+distilled", "distill": res.to_dict(), "num_inputs": int(x.shape[0])}
        return x, info
    if cfg.calib == "distilled":
        res = distill(model, spec.preprocessing, dcfg, device=cfg.device, progress=progress)
        return res.inputs, {"source": "distilled", **res.to_dict()}
    if cfg.calib == "retro":  # Retro-Synthesis: class-conditional, also for models without BN
        from .distill import RetroConfig, retro_synthesize

        rcfg = RetroConfig.from_distill(dcfg, num_images=cfg.calib_size or n_default)
        rres = retro_synthesize(model, spec.preprocessing, rcfg, device=cfg.device, progress=progress)
        return rres.inputs, {"source": "retro", **rres.to_dict(), "retro_config": rcfg.to_dict()}
    if cfg.calib == "gaussian":
        n = cfg.calib_size or n_default
        return gaussian_inputs(n, spec.preprocessing, seed=cfg.seed), {"source": "gaussian", "num_inputs": n}
    check_calib_source(cfg.calib)  # what is left is a path
    path = Path(cfg.calib)
    from .data import unlabeled_images
    from .data.datasets import TENSOR_EXTENSIONS

    n = cfg.calib_size or n_default
    x = unlabeled_images(path, spec.preprocessing, limit=n)
    info: dict[str, Any] = {"source": "real", "path": str(path), "num_inputs": int(x.shape[0])}
    if path.is_file() and path.suffix.lower() in TENSOR_EXTENSIONS:
        # saved model inputs, e.g. `zsq distill --out DIR`'s distilled.safetensors: not necessarily real images
        info["source"] = "tensors"
        made_by = path.parent / "distill.json"  # what `zsq distill` wrote beside them, recorded in the report
        if made_by.is_file():
            try:
                info["distill"] = json.loads(made_by.read_text())
            except (OSError, ValueError) as e:
                log.warning("%s beside --calib %s is unreadable (%s); not recorded in the report", made_by, path, e)
            else:
                other = info["distill"].get("model") if isinstance(info["distill"], dict) else None
                if other is not None and other != cfg.model:
                    log.warning("--calib %s was distilled from %r (%s), not from %r", path, other, made_by, cfg.model)
    if cfg.recover is not None and cfg.calib_size is None and x.shape[0] < n_default:
        log.warning("--calib %s holds %d inputs; --recover's recipe was chosen with %d (fewer inputs fit them more "
                    "closely and generalise worse)", path, int(x.shape[0]), n_default)
    return x, info


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(cfg: RunConfig, *, out_dir: str | Path | None = None, progress: bool = True) -> RunResult:
    """Run the whole zero-shot pipeline; write checkpoint + report.json + image grid to ``out_dir``."""
    from .calibrate import calibrate
    from .checkpoint import save_quantized
    from .distill import save_image_grid
    from .fold import fold_batchnorm
    from .models import load_model
    from .quant import quantize
    from .size import fp32_size_bytes, quantized_size_bytes

    device = check_device(cfg.device)
    timings: dict[str, float] = {}
    t_total = time.perf_counter()

    model, spec = load_model(cfg.model, weights=cfg.weights)
    model.eval()
    if cfg.recover is not None and cfg.recover_distill_default:  # report.json records what is distilled
        cfg = dataclasses.replace(cfg, distill=distill_config_for_run(cfg, spec.preprocessing.input_size),
                                  recover_distill_default=False)

    eval_ds = None
    if cfg.eval:  # validate the eval set before spending minutes on distillation
        from .data import check_labels, load_dataset

        eval_ds = load_dataset(cfg.eval, spec.preprocessing, limit=cfg.eval_limit, split=cfg.eval_split)
        check_labels(eval_ds, spec.num_classes)

    quant_cfg = cfg.quant
    if cfg.bit_plan is not None:
        from .mixed_precision import apply_bit_plan

        quant_cfg = apply_bit_plan(quant_cfg, cfg.bit_plan)

    # Fold and place quantizers first: a typo in a layer pattern or a bit plan for another model fails in
    # seconds, not after distillation.
    t = time.perf_counter()
    folded, fold_report = fold_batchnorm(model)
    qmodel = quantize(folded, quant_cfg, inplace=False)
    t_prepare = time.perf_counter() - t

    t = time.perf_counter()
    calib_x, calib_info = calibration_inputs(model, spec, cfg, progress=progress)
    timings["distill"] = time.perf_counter() - t

    mp = None
    if cfg.mixed_precision is not None:
        from .mixed_precision import mixed_precision_plan

        t = time.perf_counter()
        mp = mixed_precision_plan(folded, calib_x, quant_cfg, config=cfg.mixed_precision, model_name=cfg.model,
                                  device=device, progress=progress)
        quant_cfg = mp.quant_config
        qmodel = quantize(folded, quant_cfg, inplace=False)
        timings["mixed_precision"] = time.perf_counter() - t

    hybrid_info = hybrid_plan_obj = None
    if cfg.hybrid:
        from .hybrid import HybridConfig, hybrid_plan

        t = time.perf_counter()
        hcfg = HybridConfig() if cfg.hybrid_tolerance is None else HybridConfig(tolerance=cfg.hybrid_tolerance)
        quant_cfg, hybrid_plan_obj, hybrid_info = hybrid_plan(folded, calib_x, quant_cfg, threshold=cfg.hybrid_threshold,
                                                              config=hcfg, device=device, progress=progress,
                                                              model_name=cfg.model)
        qmodel = quantize(folded, quant_cfg, inplace=False)
        timings["hybrid"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("%s", fold_report)
    qmodel.to(device)
    calibrate(qmodel, calib_x, device=device, progress=progress)
    timings["calibrate"] = time.perf_counter() - t + t_prepare
    recover_report = None
    if cfg.recover is not None:  # learned rounding / reconstruction, baked into ordinary quantized weights
        from .recover import recover

        t = time.perf_counter()
        recover_report = recover(qmodel, folded, calib_x, cfg.recover, device=device, progress=progress)
        timings["recover"] = time.perf_counter() - t
    from .bias_correction import BiasCorrectionConfig, correct_bias

    t = time.perf_counter()  # after recovery, on the final weights (auto also weighs "off")
    bias_report = correct_bias(qmodel, folded, calib_x, config=BiasCorrectionConfig(mode=cfg.bias_correction),
                               device=device)
    timings["bias_correction"] = time.perf_counter() - t
    t = time.perf_counter()
    # Biases on the int32 grid the integer kernels use, whether or not this run exports: the saved,
    # evaluated and (now or later) exported models then add the same biases. Unsnapped, the float
    # evaluation of EfficientNet-Lite0 W8A8 agreed with its ONNX export on only 98.8 % of the images.
    from .export import snap_biases

    snap_biases(qmodel)
    timings["calibrate"] += time.perf_counter() - t
    qreport = qmodel.zsq_report  # type: ignore[attr-defined]
    log.info("%s", qreport)

    report: dict[str, Any] = {
        "model": cfg.model,
        "settings": cfg.to_dict(),
        "calibration": calib_info,
        "fold": fold_report.to_dict(),
        "quantizers": qreport.to_dict(),
        "size_bytes": {"fp32": fp32_size_bytes(model), "quantized": quantized_size_bytes(qmodel)},
        "bias_correction": bias_report.to_dict(),
    }
    report["size_bytes"]["ratio"] = round(report["size_bytes"]["fp32"] / report["size_bytes"]["quantized"], 3)
    if mp is not None:
        report["mixed_precision"] = mp.to_dict()
    if cfg.bit_plan is not None:
        report["bit_plan"] = str(cfg.bit_plan)
    if hybrid_info is not None:
        report["hybrid"] = hybrid_info
    if recover_report is not None:
        report["recover"] = recover_report.to_dict()

    if eval_ds is not None:
        from .evaluate import compare

        t = time.perf_counter()
        model.to(device)
        res = compare(model, qmodel, eval_ds, batch_size=cfg.eval_batch_size, device=device, progress=progress)
        timings["evaluate"] = time.perf_counter() - t
        report.update({k: res[k] for k in ("fp32", "quantized", "agreement", "kl")})
        report["eval"] = {"path": cfg.eval, "split": cfg.eval_split, "num_images": res["n"]}
    else:
        timings["evaluate"] = 0.0

    timings["total"] = time.perf_counter() - t_total
    report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    report["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}

    if out_dir is not None:
        out = Path(out_dir)
        save_quantized(qmodel, out, model_name=cfg.model,
                       extra={"preprocessing": spec.preprocessing.to_dict(), "weights": cfg.weights})
        save_image_grid(calib_x, spec.preprocessing, out / f"{calib_info['source']}_images.png")
        from .mixed_precision import plan_from_config, save_bit_plan

        if mp is not None:
            report["mixed_precision"]["files"] = {k: str(v) for k, v in mp.save(out).items()}
        if hybrid_plan_obj is not None:  # bits (from mixed precision or uniform) + granularity in one plan
            save_bit_plan(hybrid_plan_obj, out / "bit_plan.json")
        elif mp is None:  # the plan in force, reusable with --bit-plan
            save_bit_plan(plan_from_config(quant_cfg, folded, model=cfg.model), out / "bit_plan.json")
        if cfg.export == "onnx":
            from .export import export_pair

            t = time.perf_counter()
            report["export"] = export_pair(model.cpu(), qmodel.cpu(), out, example_input=calib_x[:1].cpu(),
                                           weight_type=cfg.export_weight_type, check_inputs=calib_x.cpu())
            timings["export"] = time.perf_counter() - t
            report["timings_s"]["export"] = round(timings["export"], 3)
        (out / "report.json").write_text(json.dumps(report, indent=2))
    elif cfg.export is not None:
        raise ConfigError("export needs an output directory (out_dir)")
    return RunResult(model, qmodel, spec, calib_x, report)
