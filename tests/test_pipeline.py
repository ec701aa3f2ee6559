"""Tests of ``zsq.pipeline.run`` (the library form of ``zsq quantize``) on the registry's tiny models."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from zsq.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_quantized
from zsq.config import DistillConfig, QuantConfig
from zsq.errors import ConfigError, DatasetError, NoBatchNormError, ScopeError, UnknownModelError, WeightsError
from zsq.pipeline import RunConfig, RunResult, run

FAST_DISTILL = DistillConfig(iterations=5, batch_size=8)
SIZE = 16
NUM_CLASSES = 10
N_EVAL = 20


def fast_config(**kwargs) -> RunConfig:
    kwargs.setdefault("model", "tiny_cnn")
    kwargs.setdefault("distill", FAST_DISTILL)
    return RunConfig(**kwargs)


def fixed_inputs(n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return torch.randn(n, 3, SIZE, SIZE, generator=g).clamp(-2.0, 2.0)


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (N_EVAL, 4, 4, 3)).astype(np.uint8)
    images = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    path = tmp_path_factory.mktemp("pipeline_data") / "eval.npz"
    np.savez(path, images=images, labels=rng.integers(0, NUM_CLASSES, N_EVAL).astype(np.int64))
    return path


@pytest.fixture(scope="module")
def bad_label_npz(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("pipeline_bad") / "bad.npz"
    np.savez(path, images=rng.integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.uint8),
             labels=np.array([0, 1, 2, 10, 20, 50], dtype=np.int64))
    return path


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, eval_npz) -> tuple[RunResult, Path]:
    out = tmp_path_factory.mktemp("pipeline_run") / "ckpt"
    res = run(fast_config(eval=str(eval_npz)), out_dir=out, progress=False)
    return res, out


@pytest.fixture
def no_distill(monkeypatch):
    """Make any distillation fail loudly (for checks that must happen before it)."""
    import importlib

    distill_pkg = importlib.import_module("zsq.distill")  # the package (zsq.distill is also a function)
    def boom(*args, **kwargs):
        raise AssertionError("distillation ran, but the error should have been raised before it")

    monkeypatch.setattr(distill_pkg, "distill", boom)


# --------------------------------------------------------------------------------------------
# report and outputs
# --------------------------------------------------------------------------------------------


def test_run_result_and_report_structure(saved_run, eval_npz):
    res, _ = saved_run
    assert isinstance(res, RunResult)
    assert res.spec.name == "tiny_cnn" and res.spec.num_classes == NUM_CLASSES
    assert res.calib_inputs.shape == (8, 3, SIZE, SIZE)
    r = res.report
    for key in ("model", "settings", "calibration", "fold", "quantizers", "size_bytes", "timings_s",
                "fp32", "quantized", "agreement", "kl", "eval"):
        assert key in r, key
    assert r["model"] == "tiny_cnn"
    assert r["settings"] == fast_config(eval=str(eval_npz)).to_dict()
    assert set(r["timings_s"]) >= {"distill", "calibrate", "evaluate", "total"}
    assert all(v >= 0 for v in r["timings_s"].values())
    assert r["size_bytes"]["fp32"] > r["size_bytes"]["quantized"] > 0
    for side in ("fp32", "quantized"):
        assert 0.0 <= r[side]["top1"] <= r[side]["top5"] <= 100.0
    assert 0.0 <= r["agreement"] <= 100.0 and r["kl"] >= 0.0
    assert r["eval"]["num_images"] == N_EVAL
    assert r["calibration"]["source"] == "distilled"
    json.dumps(r)  # JSON-serialisable as is


def test_bias_correction_is_reported_and_changes_only_biases(saved_run, seed):
    res, _ = saved_run
    bc = res.report["bias_correction"]
    assert bc["requested"] == "auto" and bc["mode"] in ("off", "weight", "output")
    assert set(bc["heldout_kl"]) == {"off", "weight", "output"}
    assert bc["mode"] == min(bc["heldout_kl"], key=bc["heldout_kl"].get) and set(bc["gain_z"]) == {"weight", "output"}
    assert "bias_correction" in res.report["timings_s"]
    off = run(fast_config(bias_correction="off"), out_dir=None, progress=False)
    assert off.report["bias_correction"]["mode"] == "off"
    weight = run(fast_config(bias_correction="weight"), out_dir=None, progress=False)
    assert weight.report["bias_correction"]["mode"] == "weight" and weight.report["bias_correction"]["layers"] > 0
    a, b = off.quantized_model.state_dict(), weight.quantized_model.state_dict()
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(k.endswith(".bias") for k in changed), changed  # same distilled data, same ranges


def test_saved_files_match_result(saved_run):
    res, out = saved_run
    assert (out / WEIGHTS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    assert (out / "distilled_images.png").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(res.report))


def test_out_dir_none_writes_nothing(tmp_path, monkeypatch, eval_npz):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    res = run(fast_config(eval=str(eval_npz)), out_dir=None, progress=False)
    assert "quantized" in res.report
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in eval_npz.parent.iterdir()) == ["eval.npz"]


def test_no_eval_no_accuracy_keys():
    res = run(fast_config(calib="gaussian"), out_dir=None, progress=False)
    r = res.report
    for key in ("fp32", "quantized", "agreement", "kl", "eval"):
        assert key not in r
    assert r["timings_s"]["evaluate"] == 0.0
    assert r["calibration"] == {"source": "gaussian", "num_inputs": 8}


def test_fp32_model_is_left_untouched(saved_run):
    """Folding/quantizing must not modify the FP32 model returned (and used as the reference)."""
    from zsq.models import load_model

    res, _ = saved_run
    fresh, _ = load_model("tiny_cnn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in res.fp32_model.modules())
    x = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(res.fp32_model(x), fresh(x))


def test_quantized_model_close_to_fp32_at_w8a8(saved_run):
    res, _ = saved_run
    x = fixed_inputs()
    with torch.no_grad():
        ref = res.fp32_model(x)
        q = res.quantized_model(x)
    assert q.shape == ref.shape
    assert not torch.equal(q, ref)  # it is quantized
    assert (q - ref).abs().max() < 0.25 * ref.abs().max()


def test_distilled_inputs_within_pixel_range(saved_run):
    res, _ = saved_run
    pre = res.spec.preprocessing
    lo = pre.normalize(torch.zeros(1, 3, 1, 1)).reshape(3)
    hi = pre.normalize(torch.ones(1, 3, 1, 1)).reshape(3)
    x = res.calib_inputs
    for c in range(3):
        assert x[:, c].min() >= lo[c] - 1e-5 and x[:, c].max() <= hi[c] + 1e-5


def test_saved_model_has_biases_on_the_integer_grid(saved_run):
    """The pipeline snaps biases to the int32 grid of the integer kernels even without --export, so
    the evaluated, saved and later exported models add the same biases."""
    from zsq.export import snap_biases

    res, out = saved_run
    assert snap_biases(res.quantized_model) == []  # nothing left to snap
    qmodel, _, _ = load_quantized(out)
    assert snap_biases(qmodel) == []


def test_load_quantized_reproduces_outputs_exactly(saved_run):
    res, out = saved_run
    qmodel, spec, meta = load_quantized(out)
    assert meta["model"] == "tiny_cnn" and spec.name == "tiny_cnn"
    x = torch.cat([fixed_inputs(), res.calib_inputs])
    with torch.no_grad():
        assert torch.equal(qmodel(x), res.quantized_model(x))


def test_load_quantized_reproduces_outputs_with_overrides(tmp_path):
    qcfg = QuantConfig(wbits=4, abits=6, weight_symmetric=False, weight_granularity="per_tensor",
                       overrides={"@first": {"wbits": 8, "abits": 8}, "@last": None}, skip=("conv3",))
    res = run(fast_config(calib="gaussian", quant=qcfg), out_dir=tmp_path / "ck", progress=False)
    assert set(res.report["quantizers"]["float_layers"]) == {"conv3", "fc"}
    qmodel, _, _ = load_quantized(tmp_path / "ck")
    x = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(qmodel(x), res.quantized_model(x))


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_same_result(seed):
    cfg = fast_config(seed=3)
    torch.manual_seed(111)  # the caller's global RNG state must not matter
    a = run(cfg, out_dir=None, progress=False)
    torch.manual_seed(222)
    torch.rand(5)
    b = run(cfg, out_dir=None, progress=False)
    assert torch.equal(a.calib_inputs, b.calib_inputs)
    x = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(a.quantized_model(x), b.quantized_model(x))
    assert a.report["calibration"]["final_loss"] == b.report["calibration"]["final_loss"]


def test_different_seed_different_distilled_data(seed):
    a = run(fast_config(seed=0), out_dir=None, progress=False)
    b = run(fast_config(seed=1), out_dir=None, progress=False)
    assert a.calib_inputs.shape == b.calib_inputs.shape
    assert not torch.allclose(a.calib_inputs, b.calib_inputs)
    # the model itself does not depend on the seed
    x = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(a.fp32_model(x), b.fp32_model(x))


def test_seed_reaches_distillation(seed):
    """RunConfig.seed wins over DistillConfig.seed (report shows the one in force)."""
    res = run(fast_config(seed=5), out_dir=None, progress=False)
    assert res.report["settings"]["seed"] == 5
    other = run(fast_config(seed=5, distill=DistillConfig(iterations=5, batch_size=8, seed=99)), out_dir=None,
                progress=False)
    assert torch.equal(res.calib_inputs, other.calib_inputs)


def test_gaussian_calibration_deterministic(seed):
    a = run(fast_config(calib="gaussian", calib_size=5), out_dir=None, progress=False)
    b = run(fast_config(calib="gaussian", calib_size=5), out_dir=None, progress=False)
    assert a.calib_inputs.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(a.calib_inputs, b.calib_inputs)


# --------------------------------------------------------------------------------------------
# calibration sources
# --------------------------------------------------------------------------------------------


def test_multiple_distill_batches():
    res = run(fast_config(distill=DistillConfig(iterations=3, batch_size=4, num_batches=2)), out_dir=None,
              progress=False)
    assert res.calib_inputs.shape == (8, 3, SIZE, SIZE)
    assert res.report["calibration"]["num_inputs"] == 8


def test_real_calibration_from_tensor_file(tmp_path):
    from safetensors.torch import save_file

    x = fixed_inputs(10)
    path = tmp_path / "calib.safetensors"
    save_file({"images": x.contiguous()}, str(path))
    res = run(fast_config(calib=str(path), calib_size=6), out_dir=None, progress=False)
    assert torch.equal(res.calib_inputs, x[:6])
    # saved model inputs are "tensors", not "real" images: they may be distilled ones
    assert res.report["calibration"] == {"source": "tensors", "path": str(path), "num_inputs": 6}


def test_calibration_source_unknown(tmp_path, no_distill):
    with pytest.raises(ConfigError, match="'nothere' *: expected 'distilled', 'gaussian', 'retro', 'proxy:A,B,...'"):
        run(fast_config(calib="nothere"), out_dir=None, progress=False)


def test_tensor_file_calibration_records_the_distillation_beside_it(tmp_path, caplog):
    """``zsq distill --out DIR`` writes distill.json beside distilled.safetensors: a run calibrated on the file
    records it (and warns when it came from another model); with --recover, fewer inputs than the recipe's
    amount are named in a warning."""
    from safetensors.torch import save_file

    from zsq.recover import RecoverConfig

    path = tmp_path / "distilled.safetensors"
    save_file({"images": fixed_inputs(10).contiguous()}, str(path))
    (tmp_path / "distill.json").write_text(json.dumps({"model": "tiny_cnn", "seconds": 1.5}))
    r = run(fast_config(calib=str(path)), out_dir=None, progress=False).report
    assert r["calibration"]["source"] == "tensors"
    assert r["calibration"]["distill"] == {"model": "tiny_cnn", "seconds": 1.5}
    assert "distilled from" not in caplog.text and "holds 10 inputs" not in caplog.text

    (tmp_path / "distill.json").write_text(json.dumps({"model": "resnet18"}))
    cfg = fast_config(calib=str(path), quant=QuantConfig(wbits=4, abits=8),
                      recover=RecoverConfig(method="adaround", iters=1), recover_distill_default=True)
    with caplog.at_level(logging.WARNING, logger="zsq"):
        r = run(cfg, out_dir=None, progress=False).report
    assert r["calibration"]["num_inputs"] == 10
    assert "was distilled from 'resnet18'" in caplog.text
    assert "holds 10 inputs; --recover's recipe was chosen with 256" in caplog.text

    (tmp_path / "distill.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zsq"):
        r = run(fast_config(calib=str(path)), out_dir=None, progress=False).report
    assert "distill" not in r["calibration"] and "unreadable" in caplog.text


def test_nobn_model_gaussian_ok_distilled_error(no_distill):
    res = run(fast_config(model="tiny_cnn_nobn", calib="gaussian"), out_dir=None, progress=False)
    assert res.report["fold"]["num_folded"] == 0


def test_nobn_model_distilled_raises():
    with pytest.raises(NoBatchNormError, match="(?i)batchnorm"):
        run(fast_config(model="tiny_cnn_nobn"), out_dir=None, progress=False)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_runconfig_validation():
    with pytest.raises(ConfigError):
        RunConfig(model="tiny_cnn", calib_size=0)
    with pytest.raises(ConfigError, match="bias_correction must be one of auto, weight, output, off"):
        RunConfig(model="tiny_cnn", bias_correction="yes")
    with pytest.raises(ConfigError, match="device"):
        RunConfig(model="tiny_cnn", device="tpu")
    d = RunConfig(model="tiny_cnn").to_dict()
    assert d["quant"]["wbits"] == 8 and d["quant"]["abits"] == 8
    json.dumps(d)


def test_bad_calib_path(tmp_path):
    with pytest.raises(ConfigError, match="gaussian"):
        run(fast_config(calib=str(tmp_path / "missing")), out_dir=None, progress=False)


def test_labels_exceeding_classes_fail_before_distillation(bad_label_npz, no_distill, tmp_path):
    with pytest.raises(DatasetError, match="50"):
        run(fast_config(eval=str(bad_label_npz)), out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_missing_eval_fails_before_distillation(tmp_path, no_distill):
    with pytest.raises(DatasetError, match="does not exist"):
        run(fast_config(eval=str(tmp_path / "nope.npz")), out_dir=None, progress=False)


def test_unknown_model_and_bad_weights(tmp_path):
    with pytest.raises(UnknownModelError):
        run(fast_config(model="not_a_model"), out_dir=None, progress=False)
    with pytest.raises(WeightsError, match="does not exist"):
        run(fast_config(weights=str(tmp_path / "none.pt")), out_dir=None, progress=False)


def test_skip_pattern_matching_nothing_raises(tmp_path):
    with pytest.raises(ScopeError, match="nothing_here"):
        run(fast_config(calib="gaussian", quant=QuantConfig(skip=("nothing_here",))), out_dir=tmp_path / "o",
            progress=False)
    assert not (tmp_path / "o").exists()


def test_cuda_unavailable_is_config_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    with pytest.raises(ConfigError, match="cuda"):
        run(fast_config(device="cuda"), out_dir=None, progress=False)


@pytest.mark.parametrize("quant", [QuantConfig(skip=("nothing_here",)),
                                   QuantConfig(overrides={"nothing_here": {"wbits": 4}})],
                         ids=["skip", "override"])
def test_layer_patterns_checked_before_distillation(quant, no_distill):
    """Like the eval set, --skip/--override patterns only need the model: a typo must fail at once,
    not after a distillation that takes minutes on a real model."""
    with pytest.raises(ScopeError, match="nothing_here"):
        run(fast_config(quant=quant), out_dir=None, progress=False)


@pytest.mark.parametrize("calib_size, expected", [(None, 256), (20, 20)])
def test_recover_default_amount_also_sizes_gaussian_calibration(calib_size, expected):
    from zsq.recover import RecoverConfig

    cfg = fast_config(calib="gaussian", calib_size=calib_size, quant=QuantConfig(wbits=4, abits=8),
                      recover=RecoverConfig(method="adaround", iters=1), recover_distill_default=True)
    r = run(cfg, out_dir=None, progress=False).report
    assert r["calibration"] == {"source": "gaussian", "num_inputs": expected}
    assert r["settings"]["distill"]["num_batches"] * 8 == 256  # FAST_DISTILL's batch of 8, resolved in the report
