"""End-to-end tests of the ``zsq`` command line (``zsq.cli.main``) on the registry's tiny models.

Every run uses the 16x16, 10-class ``tiny_cnn`` / ``tiny_cnn_nobn`` with a 5-iteration, 8-image
distillation and small synthetic eval sets written into tmp directories, so the whole file takes
seconds. The bad-input tests check the contract of issue 3 item 7: a non-zero exit and exactly one
line on stderr that starts with ``zsq <command>: error:``, never a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zsq.cli import main

FAST = ["--distill-iters", "5", "--distill-batch-size", "8", "-q"]
NUM_CLASSES = 10
SIZE = 16
N_EVAL = 24

REPORT_TIMINGS = ("distill", "calibrate", "evaluate", "total")
QUANT_SETTINGS = ("wbits", "abits", "weight_granularity", "weight_symmetric", "weight_estimator",
                  "act_estimator", "act_percentile", "overrides", "skip")
DISTILL_SETTINGS = ("num_batches", "batch_size", "iterations", "lr", "schedule", "input_weight", "seed")
RUN_SETTINGS = ("model", "weights", "quant", "distill", "calib", "calib_size", "eval", "eval_split",
                "eval_limit", "device", "seed")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``zsq argv`` in-process; return (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def cli_quiet(*argv: str) -> tuple[int, str, str]:
    """Like :func:`cli` for module-scoped fixtures (no capsys there)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Non-zero exit, one non-empty stderr line ``zsq COMMAND: error: ...``, no traceback."""
    assert rc != 0, f"expected a non-zero exit, got {rc}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith(f"zsq {command}: error:"), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def tiny_predictions(images: np.ndarray, model_name: str = "tiny_cnn") -> np.ndarray:
    """Top-1 predictions of the registry model (fixed-seed init) on uint8 NHWC images."""
    from zsq.models import load_model

    model, spec = load_model(model_name)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return model(spec.preprocessing.normalize(x)).argmax(1).numpy().astype(np.int64)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 16, 16, 3) images with some spatial structure (upsampled 4x4 noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images.astype(np.uint8), labels=labels.astype(np.int64))
    return path


def write_labels_csv_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "class_index"])
        for i, (img, lab) in enumerate(zip(images, labels)):
            name = f"img_{i:03d}.png"
            Image.fromarray(img).save(root / "images" / name)
            w.writerow([name, int(lab)])
    return root


def read_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text())


# --------------------------------------------------------------------------------------------
# fixtures (module-scoped: data sets and one reference quantize run shared by many tests)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def eval_npz(data_dir) -> Path:
    """Eval set labelled with the FP32 tiny_cnn's own predictions (FP32 top-1 is 100 %)."""
    images = smooth_images(N_EVAL, seed=1)
    return write_npz(data_dir / "eval.npz", images, tiny_predictions(images))


@pytest.fixture(scope="module")
def random_label_npz(data_dir) -> Path:
    rng = np.random.default_rng(2)
    return write_npz(data_dir / "random.npz", smooth_images(N_EVAL, seed=2), rng.integers(0, NUM_CLASSES, N_EVAL))


@pytest.fixture(scope="module")
def bad_label_npz(data_dir) -> Path:
    """Labels up to 50 for a 10-class model."""
    labels = np.arange(N_EVAL, dtype=np.int64) * 50 // (N_EVAL - 1)
    assert labels.max() == 50
    return write_npz(data_dir / "labels_up_to_50.npz", smooth_images(N_EVAL, seed=3), labels)


@pytest.fixture(scope="module")
def image_folder(data_dir) -> Path:
    """A labels.csv folder of PNGs (real images for --calib PATH and a folder eval set)."""
    images = smooth_images(12, seed=4)
    return write_labels_csv_folder(data_dir / "real_images", images, tiny_predictions(images))


@pytest.fixture(scope="module")
def mismatched_weights(data_dir) -> Path:
    """A state dict of another architecture (cifar_resnet20) saved with torch.save."""
    from zsq.models import load_model

    other, _ = load_model("cifar_resnet20", pretrained=False)
    path = data_dir / "resnet20_random.pt"
    torch.save(other.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_weights(data_dir) -> Path:
    """A matching state dict for tiny_cnn (its fixed-seed init), saved with torch.save."""
    from zsq.models import load_model

    model, _ = load_model("tiny_cnn")
    path = data_dir / "tiny_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, eval_npz) -> tuple[Path, str]:
    """One ``zsq quantize tiny_cnn --wbits 8 --abits 8 --eval NPZ --out DIR`` shared by several tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny-w8a8"
    rc, stdout, err = cli_quiet("quantize", "tiny_cnn", "--wbits", "8", "--abits", "8", "--eval", eval_npz,
                                "--out", out, *FAST)
    assert rc == 0, err
    return out, stdout


# --------------------------------------------------------------------------------------------
# zsq models / layers / --help
# --------------------------------------------------------------------------------------------


def test_models_lists_registry(capsys):
    rc, out, _ = cli(capsys, "models")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    for name in ("efficientnet_lite0", "cifar_resnet20", "tiny_cnn"):
        assert name in names
    assert "torchvision:NAME" in out


def test_models_json_parses(capsys):
    rc, out, _ = cli(capsys, "models", "--json")
    assert rc == 0
    entries = json.loads(out)
    by_name = {e["name"]: e for e in entries}
    assert {"efficientnet_lite0", "cifar_resnet20"} <= set(by_name)
    assert by_name["cifar_resnet20"]["num_classes"] == 10
    assert by_name["efficientnet_lite0"]["num_classes"] == 1000
    assert by_name["efficientnet_lite0"]["input_size"] == [224, 224]
    for e in entries:
        assert set(e) >= {"name", "num_classes", "dataset", "input_size", "description"}


def test_layers_tiny_cnn(capsys):
    rc, out, _ = cli(capsys, "layers", "tiny_cnn")
    assert rc == 0
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert "(@first)" in lines[0]
    assert "Linear" in lines[-1]


def test_layers_factory_with_weights(capsys, tiny_weights):
    rc, out, _ = cli(capsys, "layers", "zsq.models.tiny:tiny_cnn", "--weights", tiny_weights)
    assert rc == 0
    assert out.splitlines()[0].startswith("conv1\t")


def test_no_command_prints_help(capsys):
    rc, out, _ = cli(capsys)
    assert rc != 0
    assert "quantize" in out


@pytest.mark.parametrize("command", ["quantize", "distill", "eval", "layers", "models"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zsq " + command)


def test_quantize_help_documents_options(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for opt in ("--wbits", "--abits", "--calib", "--eval", "--out", "--device", "--seed", "--weights",
                "--override", "--skip", "--act-estimator", "--distill-iters", "--bias-correction"):
        assert opt in out
    assert "2-8" in out


# --------------------------------------------------------------------------------------------
# zsq quantize
# --------------------------------------------------------------------------------------------


def test_quantize_writes_checkpoint_report_and_grid(quantized_run):
    out, stdout = quantized_run
    files = {p.name for p in out.iterdir()}
    assert {"quantized.safetensors", "zsq_config.json", "report.json"} <= files
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs, files
    assert (out / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 FP32" in stdout and str(out) in stdout


def test_quantize_report_contents(quantized_run, eval_npz):
    out, _ = quantized_run
    r = read_report(out)
    assert r["model"] == "tiny_cnn"

    s = r["settings"]
    assert set(RUN_SETTINGS) <= set(s)
    assert set(QUANT_SETTINGS) <= set(s["quant"])
    assert set(DISTILL_SETTINGS) <= set(s["distill"])
    assert s["quant"]["wbits"] == 8 and s["quant"]["abits"] == 8
    assert s["distill"]["iterations"] == 5 and s["distill"]["batch_size"] == 8
    assert s["calib"] == "distilled" and s["device"] == "cpu" and s["seed"] == 0
    assert s["eval"] == str(eval_npz)

    t = r["timings_s"]
    for k in REPORT_TIMINGS:
        assert isinstance(t[k], (int, float)) and t[k] >= 0, k
    assert t["total"] >= t["distill"]
    assert t["total"] + 1e-3 >= t["distill"] + t["calibrate"] + t["evaluate"] - 0.01

    sz = r["size_bytes"]
    assert sz["fp32"] > 0 and 0 < sz["quantized"] < sz["fp32"]
    # W8 weights: roughly 4x smaller (scales and biases stay 32-bit)
    assert sz["fp32"] / sz["quantized"] > 2.5

    for side in ("fp32", "quantized"):
        for k in ("top1", "top5"):
            assert 0.0 <= r[side][k] <= 100.0, (side, k)
        assert r[side]["top1"] <= r[side]["top5"]
    assert r["fp32"]["top1"] == pytest.approx(100.0)  # labels are the FP32 predictions
    assert r["fp32"]["top5"] == pytest.approx(100.0)
    assert r["quantized"]["top1"] == pytest.approx(r["agreement"])  # same reason
    assert 0.0 <= r["agreement"] <= 100.0
    assert r["kl"] >= 0.0 and np.isfinite(r["kl"])
    assert r["eval"]["num_images"] == N_EVAL

    assert r["calibration"]["source"] == "distilled"
    assert r["calibration"]["num_inputs"] == 8
    assert r["fold"]["num_folded"] == 4
    assert r["quantizers"]["num_weight_quantizers"] == 5
    assert r["quantizers"]["num_act_quantizers"] >= 5


def test_quantize_checkpoint_config(quantized_run):
    out, _ = quantized_run
    cfg = json.loads((out / "zsq_config.json").read_text())
    assert cfg["model"] == "tiny_cnn"
    assert cfg["quant_config"]["wbits"] == 8
    assert cfg["calibrated"] is True


def test_eval_checkpoint_matches_report(capsys, quantized_run, eval_npz, tmp_path):
    out, _ = quantized_run
    report = read_report(out)
    res_file = tmp_path / "eval.json"
    rc, stdout, err = cli(capsys, "eval", out, eval_npz, "--json", res_file, "-q")
    assert rc == 0, err
    res = json.loads(res_file.read_text())
    assert res["n"] == N_EVAL
    assert res["quantized"]["top1"] == pytest.approx(report["quantized"]["top1"])
    assert res["quantized"]["top5"] == pytest.approx(report["quantized"]["top5"])
    assert res["fp32"]["top1"] == pytest.approx(report["fp32"]["top1"])
    assert res["agreement"] == pytest.approx(report["agreement"])
    assert res["kl"] == pytest.approx(report["kl"], abs=1e-6)
    assert "quantized top-1" in stdout


def test_eval_checkpoint_with_integer_arithmetic(capsys, quantized_run, eval_npz, tmp_path):
    """--integer evaluates the checkpoint as its int8 ONNX graph computes it (zsq.export.IntegerModel):
    the same quantized model, so nearly the same numbers as the float evaluation."""
    out, _ = quantized_run
    report = read_report(out)
    res_file = tmp_path / "eval.json"
    rc, stdout, err = cli(capsys, "eval", out, eval_npz, "--integer", "--json", res_file, "-q")
    assert rc == 0, err
    res = json.loads(res_file.read_text())
    assert res["arithmetic"] == "integer" and res["n"] == N_EVAL
    assert abs(res["quantized"]["top1"] - report["quantized"]["top1"]) <= 100.0 * 2 / N_EVAL
    assert "integer arithmetic" in stdout
    rc, _, err = cli(capsys, "eval", "tiny_cnn", eval_npz, "--integer", "-q")
    assert rc == 2 and "--integer evaluates a quantized checkpoint" in err
    rc, _, err = cli(capsys, "eval", out, eval_npz, "--integer", "--device", "cuda", "-q")
    assert rc == 2 and "--integer runs on the CPU" in err


def test_eval_checkpoint_reload_in_python(quantized_run, eval_npz):
    from zsq.checkpoint import load_quantized

    out, _ = quantized_run
    qmodel, spec, meta = load_quantized(out)
    assert meta["model"] == "tiny_cnn" and spec.num_classes == NUM_CLASSES
    with torch.no_grad():
        y = qmodel(torch.zeros(2, 3, SIZE, SIZE))
    assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all()


def test_eval_registry_model(capsys, eval_npz, tmp_path):
    res_file = tmp_path / "eval.json"
    rc, stdout, err = cli(capsys, "eval", "tiny_cnn", eval_npz, "--json", res_file, "-q")
    assert rc == 0, err
    res = json.loads(res_file.read_text())
    assert res["top1"] == pytest.approx(100.0)  # labels are its own predictions
    assert "top-1 100.00" in stdout


def test_eval_labels_csv_folder(capsys, image_folder):
    rc, stdout, err = cli(capsys, "eval", "tiny_cnn", image_folder, "--limit", "5", "-q")
    assert rc == 0, err
    assert "on 5 images" in stdout


def test_quantize_gaussian_calib(tmp_path, capsys, random_label_npz):
    out = tmp_path / "g"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "gaussian", "--calib-size", "6",
                     "--eval", random_label_npz, "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["calibration"]["source"] == "gaussian" and r["calibration"]["num_inputs"] == 6
    assert r["settings"]["calib"] == "gaussian" and r["settings"]["calib_size"] == 6
    assert list(out.glob("*.png"))


@pytest.mark.parametrize("mode", ["off", "weight"])
def test_quantize_bias_correction_option(tmp_path, capsys, mode):
    out = tmp_path / mode
    rc, stdout, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--bias-correction", mode, "--out", out,
                          *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["settings"]["bias_correction"] == mode and r["bias_correction"]["mode"] == mode
    assert ("bias correction: weight" in stdout) == (mode == "weight")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "tiny_cnn", "--bias-correction", "sometimes", "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--bias-correction" in err and "'auto'" in err


def test_quantize_real_images_calib(tmp_path, capsys, image_folder):
    out = tmp_path / "real"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", image_folder, "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["calibration"]["source"] == "real"
    assert r["calibration"]["num_inputs"] == 8  # calib_size defaults to the distill batch total
    assert r["timings_s"]["evaluate"] == 0.0
    assert "quantized" not in r  # no --eval: no accuracy keys
    assert (out / "quantized.safetensors").is_file()


def test_quantize_nobn_with_gaussian_works(tmp_path, capsys):
    out = tmp_path / "nobn"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn_nobn", "--calib", "gaussian", "--out", out, *FAST)
    assert rc == 0, err
    assert read_report(out)["fold"]["num_folded"] == 0


def test_quantize_overrides(tmp_path, capsys, eval_npz):
    out = tmp_path / "ov"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--abits", "8",
                     "--override", "@first=w8a8", "--override", "@last=float", "--eval", eval_npz,
                     "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    layers = {l["name"]: l for l in r["quantizers"]["layers"]}
    assert layers["conv1"]["wbits"] == 8 and layers["conv1"]["abits"] == 8
    assert layers["conv2"]["wbits"] == 4
    assert layers["fc"]["wbits"] is None
    assert r["quantizers"]["float_layers"] == ["fc"]
    assert r["quantizers"]["num_weight_quantizers"] == 4
    assert r["settings"]["quant"]["overrides"]["@last"] is None
    assert r["settings"]["quant"]["overrides"]["@first"]["wbits"] == 8


def test_quantize_override_granularity_and_regex(tmp_path, capsys):
    out = tmp_path / "ov2"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "gaussian", "--override", "re:conv[23]=w6,pt",
                     "--out", out, *FAST)
    assert rc == 0, err
    layers = {l["name"]: l for l in read_report(out)["quantizers"]["layers"]}
    for name in ("conv2", "conv3"):
        assert layers[name]["wbits"] == 6 and layers[name]["weight_granularity"] == "per_tensor"
    assert layers["conv4"]["wbits"] == 8 and layers["conv4"]["weight_granularity"] == "per_channel"


def test_quantize_skip(tmp_path, capsys, eval_npz):
    out = tmp_path / "skip"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--skip", "conv3", "--skip", "re:fc",
                     "--calib", "gaussian", "--eval", eval_npz, "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert set(r["quantizers"]["float_layers"]) == {"conv3", "fc"}
    assert r["settings"]["quant"]["skip"] == ["conv3", "re:fc"]
    # the checkpoint of a partly-float model reloads and evaluates
    rc, _, err = cli(capsys, "eval", out, eval_npz, "-q")
    assert rc == 0, err


@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_quantize_act_estimator(tmp_path, capsys, eval_npz, estimator):
    out = tmp_path / estimator
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--act-estimator", estimator, "--eval", eval_npz,
                     "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["settings"]["quant"]["act_estimator"] == estimator
    assert 0.0 <= r["quantized"]["top1"] <= 100.0


def test_quantize_low_bits_and_weight_options(tmp_path, capsys, eval_npz):
    out = tmp_path / "w2a4"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "2", "--abits", "4", "--weight-granularity",
                     "per_tensor", "--weight-asymmetric", "--weight-estimator", "mse", "--calib", "gaussian",
                     "--eval", eval_npz, "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    q = r["settings"]["quant"]
    assert (q["wbits"], q["abits"], q["weight_granularity"], q["weight_symmetric"], q["weight_estimator"]) == (
        2, 4, "per_tensor", False, "mse")
    # 2-bit weights are far smaller than the 8-bit run's
    assert r["size_bytes"]["fp32"] / r["size_bytes"]["quantized"] > 5
    rc, _, err = cli(capsys, "eval", out, eval_npz, "-q")
    assert rc == 0, err


def test_quantize_with_matching_weights_file(tmp_path, capsys, tiny_weights):
    out = tmp_path / "w"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--weights", tiny_weights, "--calib", "gaussian",
                     "--out", out, *FAST)
    assert rc == 0, err
    assert read_report(out)["settings"]["weights"] == str(tiny_weights)


def test_quantize_default_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "gaussian", "--wbits", "6", "--abits", "7", *FAST)
    assert rc == 0, err
    assert (tmp_path / "runs" / "tiny_cnn-w6a7" / "report.json").is_file()


# --------------------------------------------------------------------------------------------
# zsq distill
# --------------------------------------------------------------------------------------------


def test_distill_then_calibrate_with_saved_tensors(tmp_path, capsys):
    from safetensors.torch import load_file

    d = tmp_path / "distilled"
    rc, stdout, err = cli(capsys, "distill", "tiny_cnn", "--out", d, *FAST)
    assert rc == 0, err
    assert (d / "distilled.safetensors").is_file()
    pngs = list(d.glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"
    x = load_file(str(d / "distilled.safetensors"))["images"]
    assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert "distilled 8 inputs" in stdout

    out = tmp_path / "q"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", d / "distilled.safetensors", "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["calibration"]["source"] == "tensors"  # saved inputs, and distill.json beside them says what made them
    assert r["calibration"]["num_inputs"] == 8 and r["calibration"]["distill"]["model"] == "tiny_cnn"


def test_distill_augmentation_flags(tmp_path, capsys):
    """Views are on by default (jitter resolved from the input size and recorded); both can be switched off."""
    out = tmp_path / "q"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["settings"]["distill"]["flip"] is True and r["settings"]["distill"]["jitter"] is None
    assert r["calibration"]["views"] == {"flip": True, "jitter": 2}  # 16x16 inputs
    out = tmp_path / "off"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--no-distill-flip", "--distill-jitter", "0", "--out", out, *FAST)
    assert rc == 0, err
    assert read_report(out)["calibration"]["views"] == {"flip": False, "jitter": 0}
    out = tmp_path / "r"  # the same views for Retro-Synthesis inputs
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "retro", "--no-distill-flip", "--distill-jitter", "3",
                     "--out", out, *FAST)
    assert rc == 0, err
    c = read_report(out)["calibration"]
    assert c["source"] == "retro" and c["retro_config"]["flip"] is False and c["retro_config"]["jitter"] == 3
    with pytest.raises(SystemExit) as exc:
        main(["distill", "tiny_cnn", "--distill-jitter", "-1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "non-negative integer" in err and "Traceback" not in err


def test_distill_coarse_start_flags(tmp_path, capsys):
    """--distill-coarse-iters runs the multi-resolution start and records it; a coarse size below the minimum and the
    flag with --calib retro (which has no coarse start) are one-line errors."""
    out = tmp_path / "c"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--distill-coarse-iters", "3", "--out", out, *FAST)
    assert rc == 0, err
    r = read_report(out)
    assert r["settings"]["distill"]["coarse_iterations"] == 3
    assert r["calibration"]["coarse"] == {"iterations": 3, "size": [8, 8], "levels": [[8, 8]]}  # 16x16, factor 2
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--distill-coarse-iters", "3", "--distill-coarse-factor", "4",
                     "--out", tmp_path / "small", *FAST)
    assert_one_line_error(rc, err, "quantize", "coarse_factor 4", "at least 8")
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--distill-coarse-iters", "3", "--distill-coarse-levels", "2",
                     "--out", tmp_path / "pyr", *FAST)
    assert_one_line_error(rc, err, "quantize", "over 2 levels", "4x4", "fewer coarse_levels")
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "retro", "--distill-coarse-iters", "3",
                     "--out", tmp_path / "r", *FAST)
    assert_one_line_error(rc, err, "quantize", "retro", "coarse")


def test_distill_first_bn_weight_flag(tmp_path, capsys):
    """--distill-first-bn-weight reaches DistillConfig and the report (which records the weight used, resolved by
    input size when the flag is left out); a weight <= 0 is a one-line error."""
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--distill-first-bn-weight", "10", "--out", tmp_path / "w", *FAST)
    assert rc == 0, err
    r = read_report(tmp_path / "w")
    assert r["settings"]["distill"]["first_bn_weight"] == 10.0 and r["calibration"]["first_bn_weight"] == 10.0
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--out", tmp_path / "d", *FAST)
    assert rc == 0, err
    r = read_report(tmp_path / "d")  # 16x16 inputs: the CIFAR-sized default, every layer alike
    assert r["settings"]["distill"]["first_bn_weight"] is None and r["calibration"]["first_bn_weight"] == 1.0
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--distill-first-bn-weight", "0", "--out", tmp_path / "z", *FAST)
    assert_one_line_error(rc, err, "quantize", "first_bn_weight", "> 0")
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "retro", "--distill-first-bn-weight", "10",
                     "--out", tmp_path / "r", *FAST)
    assert_one_line_error(rc, err, "quantize", "retro", "first-bn-weight")
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "retro", "--distill-coarse-levels", "2",
                     "--out", tmp_path / "r2", *FAST)
    assert_one_line_error(rc, err, "quantize", "retro", "coarse-levels")


def test_distill_nobn_is_an_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "distill", "tiny_cnn_nobn", "--out", tmp_path / "d", *FAST)
    assert_one_line_error(rc, err, "distill", "batchnorm", "gaussian")


# --------------------------------------------------------------------------------------------
# bad inputs: one line on stderr, non-zero exit, no traceback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["quantize", "layers", "distill"])
def test_unknown_model(tmp_path, capsys, command):
    extra = ["--out", tmp_path / "o", *FAST] if command != "layers" else []
    rc, _, err = cli(capsys, command, "tiny_cnnn", *extra)
    assert_one_line_error(rc, err, command, "unknown model", "did you mean tiny_cnn", "cifar_resnet20")


def test_unknown_model_eval(capsys, eval_npz):
    rc, _, err = cli(capsys, "eval", "no_such_model", eval_npz)
    assert_one_line_error(rc, err, "eval", "no_such_model")


@pytest.mark.parametrize("model", ["zsq_no_such_module_xyz:build", "zsq.models.tiny:no_such_factory"])
def test_factory_that_does_not_exist(tmp_path, capsys, model, tiny_weights):
    rc, _, err = cli(capsys, "quantize", model, "--weights", tiny_weights, "--out", tmp_path / "o", *FAST)
    line = assert_one_line_error(rc, err, "quantize", model)
    assert "import" in line or "no attribute" in line


def test_factory_without_weights_suggests_weights(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "zsq.models.tiny:tiny_cnn", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "--weights")


def test_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--weights", missing, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "does not exist", str(missing))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["quantize", "eval", "layers"])
def test_weights_do_not_match_architecture(tmp_path, capsys, mismatched_weights, eval_npz, command):
    if command == "quantize":
        argv = ["quantize", "tiny_cnn", "--weights", mismatched_weights, "--out", tmp_path / "o", *FAST]
    elif command == "eval":
        argv = ["eval", "tiny_cnn", eval_npz, "--weights", mismatched_weights]
    else:
        argv = ["layers", "tiny_cnn", "--weights", mismatched_weights]
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, command, "do not fit", "tiny_cnn", "missing key")


def test_garbage_weights_file(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a torch file")
    rc, _, err = cli(capsys, "layers", "tiny_cnn", "--weights", bad)
    assert_one_line_error(rc, err, "layers", str(bad))


def test_nobn_model_with_distilled_calib(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn_nobn", "--out", out, *FAST)
    assert_one_line_error(rc, err, "quantize", "batchnorm", "--calib gaussian")
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_labels_exceed_classes(tmp_path, capsys, bad_label_npz, command):
    if command == "quantize":
        argv = ["quantize", "tiny_cnn", "--eval", bad_label_npz, "--out", tmp_path / "o", *FAST]
    else:
        argv = ["eval", "tiny_cnn", bad_label_npz, "-q"]
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, command, "50", "10 classes")


def test_labels_exceed_classes_for_checkpoint(capsys, quantized_run, bad_label_npz):
    out, _ = quantized_run
    rc, _, err = cli(capsys, "eval", out, bad_label_npz, "-q")
    assert_one_line_error(rc, err, "eval", "50", "10 classes")


@pytest.mark.parametrize("argv", [["--wbits", "9"], ["--abits", "1"], ["--wbits", "0"], ["--abits", "eight"]])
def test_bits_outside_range(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "tiny_cnn", *argv, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: zsq quantize")
    last = err.strip().splitlines()[-1]
    assert last.startswith("zsq quantize: error: argument")
    assert argv[0] in last and "2" in last and "8" in last
    assert not (tmp_path / "o").exists()


def test_calib_nonexistent_path(tmp_path, capsys):
    bad = tmp_path / "nonexistent" / "path"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", bad, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", str(bad), "distilled", "gaussian")


def test_calib_path_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", empty, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", str(empty))


@pytest.mark.parametrize("spec", ["@first", "@first=int8", "=w8", "conv1=w8b4", "conv1="])
def test_bad_override_syntax(tmp_path, capsys, spec):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--override", spec, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "--override", spec, "w8a8")


def test_override_bits_outside_range(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--override", "@first=w9a8", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "override", "wbits=9", "2..8")


def test_override_pattern_matching_nothing(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--override", "no_such_layer=w8", "--calib", "gaussian",
                     "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "no_such_layer")


@pytest.mark.parametrize("pattern", ["no_such_layer", "re:^zzz.*"])
def test_skip_pattern_matching_nothing(tmp_path, capsys, pattern):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--skip", pattern, "--calib", "gaussian",
                     "--out", tmp_path / "o", *FAST)
    line = assert_one_line_error(rc, err, "quantize", pattern)
    assert "conv1" in line or "zsq layers" in line  # says what the layers are called


@pytest.mark.parametrize("option", [["--skip", "no_such_layer"], ["--override", "no_such_layer=w8"]])
def test_bad_layer_pattern_is_reported_before_distillation(tmp_path, capsys, monkeypatch, option):
    """A typo in --skip/--override must not cost a whole distillation (minutes on a real model) first:
    like the eval set, layer patterns can be checked as soon as the model is loaded."""
    import importlib

    distill_pkg = importlib.import_module("zsq.distill")  # the package (zsq.distill is also a function)
    def distill_must_not_run(*args, **kwargs):
        raise AssertionError("distillation ran before the --skip/--override pattern was validated")

    monkeypatch.setattr(distill_pkg, "distill", distill_must_not_run)
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", *option, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "no_such_layer")


def test_eval_directory_that_is_not_a_checkpoint(tmp_path, capsys, eval_npz):
    """A directory given as MODEL_OR_CHECKPOINT without zsq_config.json: say it is not a checkpoint,
    rather than 'unknown model <path>' followed by the registry listing."""
    d = tmp_path / "not_a_checkpoint"
    d.mkdir()
    rc, _, err = cli(capsys, "eval", d, eval_npz, "-q")
    assert_one_line_error(rc, err, "eval", str(d), "zsq_config.json")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_eval_target_path_that_is_not_a_checkpoint_directory(tmp_path, capsys, eval_npz, kind):
    """A checkpoint path that does not exist (a typo) or names a file: say so, rather than 'unknown model <path>'
    followed by the registry listing."""
    target = tmp_path / "runs" / "typo"
    if kind == "file":
        target.parent.mkdir()
        target.write_text("")
    rc, _, err = cli(capsys, "eval", target, eval_npz, "-q")
    assert_one_line_error(rc, err, "eval", str(target), "does not exist" if kind == "missing" else "is a file",
                          "zsq quantize --out DIR")
    assert "Registered models" not in err


def test_quantize_calib_source_unknown(tmp_path, capsys):
    """Neither a source name, a ZeroP spec nor an existing path: one line naming every accepted form."""
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", tmp_path / "nothere.pt", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "nothere.pt", "'distilled', 'gaussian', 'retro', 'proxy:A,B,...', "
                          "'proxy+distilled:A,B,...' or an existing path", "saved inputs")


def test_quantize_eval_path_missing(tmp_path, capsys):
    missing = tmp_path / "missing.npz"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--eval", missing, "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", str(missing), "does not exist")


@pytest.mark.parametrize("target", ["tiny_cnn", "checkpoint"])
def test_eval_path_missing(tmp_path, capsys, quantized_run, target):
    missing = tmp_path / "missing_dir"
    model = quantized_run[0] if target == "checkpoint" else "tiny_cnn"
    rc, _, err = cli(capsys, "eval", model, missing, "-q")
    assert_one_line_error(rc, err, "eval", str(missing), "does not exist")


def test_eval_unlabelled_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.fromarray(smooth_images(1, seed=5)[0]).save(folder / "a.png")
    rc, _, err = cli(capsys, "eval", "tiny_cnn", folder, "-q")
    assert_one_line_error(rc, err, "eval", "labels.csv")


def test_cifar_resnet20_without_weights(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "cifar_resnet20", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "cifar_resnet20", "--weights")
    rc, _, err = cli(capsys, "eval", "cifar_resnet20", tmp_path / "whatever.npz", "-q")
    assert_one_line_error(rc, err, "eval", "--weights")


def test_cuda_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--device", "cuda", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "cuda", "--device cpu")


def test_bad_device_name(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--device", "tpu", "--out", tmp_path / "o", *FAST)
    assert_one_line_error(rc, err, "quantize", "tpu")


def test_real_process_prints_one_error_line(tmp_path):
    """The console entry point itself (logging to stderr, no pytest capture): still one line, rc != 0."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "ZSQ_NO_REEXEC": "1"}
    proc = subprocess.run([sys.executable, "-m", "zsq.cli", "quantize", "no_such_model", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zsq quantize: error: unknown model"), proc.stderr


def test_threads_apply_to_the_command_only(tmp_path, capsys, monkeypatch):
    """--threads sets torch's threads for the command and main() restores them, also when the command fails; the
    ONNX Runtime --threads of bench-deploy does not touch torch's."""
    before = torch.get_num_threads()
    want = before + 1
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--threads", str(want), "--out", tmp_path / "q", *FAST)
    assert rc == 0, err
    assert seen == [want, before] and torch.get_num_threads() == before
    seen.clear()
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--threads", str(want), "--weights", tmp_path / "none.pt",
                     "--out", tmp_path / "bad", *FAST)
    assert rc == 2 and "Traceback" not in err and seen == [want, before] and torch.get_num_threads() == before
    seen.clear()
    rc, _, err = cli(capsys, "bench-deploy", str(tmp_path / "missing.onnx"), "--threads", "3")
    assert rc == 2 and "does not exist" in err and seen == [] and torch.get_num_threads() == before
