"""``zsq quantize`` with the later pipeline stages switched on: ``--mixed-precision``, ``--bit-plan``
and ``--export onnx``, end to end on the registry's tiny model (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zsq.cli import main

FAST = ["--distill-iters", "5", "--distill-batch-size", "8", "-q"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    rc = main(["quantize", "tiny_cnn", "--wbits", "4", "--abits", "8", "--mixed-precision", "--target-size", "4bit",
               "--mp-bits", "2,4,8", "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_mixed_precision_writes_plan_plots_and_meets_budget(mp_run):
    for f in ("bit_plan.json", "sensitivity.json", "sensitivity.png", "pareto.png", "quantized.safetensors"):
        assert (mp_run / f).is_file(), f
    r = report(mp_run)
    mp = r["mixed_precision"]
    plan = json.loads((mp_run / "bit_plan.json").read_text())
    assert plan["format"] == "zsq-bit-plan"
    bits = plan["weight_bits"]
    assert set(bits.values()) <= {2, 4, 8}
    # the quantized model uses exactly the plan's widths
    layers = {l["name"]: l["wbits"] for l in r["quantizers"]["layers"]}
    assert {k: layers[k] for k in bits} == bits
    # the budget (uniform 4-bit weights) holds
    assert mp["allocation"]["budget"]["kind"] == "size"
    assert mp["allocation"]["size_bits"] <= mp["allocation"]["budget"]["value"] + 1e-6
    assert mp["settings"]["method"] == "kl"
    assert r["settings"]["mixed_precision"]["target_size"] == "4bit"
    assert "mixed_precision" in r["timings_s"]


def test_bit_plan_reuse_reproduces_the_widths(mp_run, tmp_path, capsys):
    out = tmp_path / "again"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--abits", "8", "--bit-plan", mp_run / "bit_plan.json",
                     "--out", out, *FAST)
    assert rc == 0, err
    want = json.loads((mp_run / "bit_plan.json").read_text())["weight_bits"]
    layers = {l["name"]: l["wbits"] for l in report(out)["quantizers"]["layers"]}
    assert {k: layers[k] for k in want} == want
    assert report(out)["bit_plan"].endswith("bit_plan.json")
    assert "mixed_precision" not in report(out)


def test_bit_plan_run_reports_the_plan_not_wbits(mp_run, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    npz = tmp_path / "eval.npz"
    np.savez(npz, images=rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8),
             labels=rng.integers(0, 10, 16).astype(np.int64))
    rc, out, err = cli(capsys, "quantize", "tiny_cnn", "--abits", "8", "--bit-plan", mp_run / "bit_plan.json",
                       "--eval", npz, "--out", tmp_path / "run", *[a for a in FAST if a != "-q"])
    assert rc == 0, err
    layers = report(tmp_path / "run")["quantizers"]["layers"]
    avg = sum(l["wbits"] * l["params"] for l in layers) / sum(l["params"] for l in layers)
    line = next(ln for ln in out.splitlines() if ln.startswith("top-1 FP32"))
    assert f"plan W{avg:.2f}/A8" in line and "W8A8" not in line, line


def test_plain_run_writes_its_bit_plan(tmp_path, capsys):
    out = tmp_path / "plain"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "6", "--override", "@first=w8", "--out", out, *FAST)
    assert rc == 0, err
    bits = json.loads((out / "bit_plan.json").read_text())["weight_bits"]
    assert bits["conv1"] == 8 and set(bits.values()) == {6, 8}


def test_mixed_precision_and_bit_plan_exclude_each_other(mp_run, tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--mixed-precision", "--bit-plan", mp_run / "bit_plan.json",
                     "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "exclude each other" in err and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.strip()]) == 1


def test_missing_bit_plan_is_one_line_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--bit-plan", tmp_path / "nope.json", "--out", tmp_path / "x",
                     *FAST)
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_bad_target_size_is_one_line_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--mixed-precision", "--target-size", "lots",
                     "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "Traceback" not in err
    assert len([l for l in err.splitlines() if l.strip()]) == 1


def test_export_onnx_writes_both_models_that_run(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import torch

    from zsq.checkpoint import load_quantized

    out = tmp_path / "ex"
    rc, stdout, err = cli(capsys, "quantize", "tiny_cnn", "--export", "onnx", "--out", out, *FAST)
    assert rc == 0, err
    assert (out / "model.int8.onnx").is_file() and (out / "model.fp32.onnx").is_file()
    ex = report(out)["export"]
    assert ex["int8"]["ort"]["float_convs"] == 0 and ex["int8"]["ort"]["int8_convs"] >= 1
    assert "ONNX export" in stdout
    qmodel, spec, _ = load_quantized(out)
    x = torch.randn(4, 3, *spec.preprocessing.input_size, generator=torch.Generator().manual_seed(0))
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = qmodel(x).numpy()
    assert np.abs(got - want).max() < 0.2 * float(np.abs(want).max()) + 1e-3
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def test_proxy_calibration_picks_the_closest_candidate(tmp_path, capsys):
    out = tmp_path / "proxy"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "proxy:gaussian,procedural:blobs", "--calib-size", "8",
                     "--out", out, *FAST)
    assert rc == 0, err
    c = report(out)["calibration"]
    assert c["source"] == "proxy" and c["num_inputs"] == 8
    ranking = c["ranking"]
    assert [r["candidate"] for r in ranking][0] == c["selected"]
    assert ranking[0]["distance"] <= ranking[-1]["distance"]


def test_proxy_plus_distilled_mixes(tmp_path, capsys):
    out = tmp_path / "pd"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "proxy+distilled:procedural:textures", "--out", out,
                     *FAST)
    assert rc == 0, err
    c = report(out)["calibration"]
    assert c["source"] == "proxy+distilled" and c["num_inputs"] == 8 and "distill" in c


def test_bad_proxy_candidate_is_one_line_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--calib", "proxy:procedural:nope", "--out", tmp_path / "x",
                     *FAST)
    assert rc == 2 and "Traceback" not in err and "procedural:nope" in err
    assert len([l for l in err.splitlines() if l.strip()]) == 1


def test_hybrid_granularity_run_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "hy"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--weight-granularity", "hybrid", "--hybrid-threshold", "1e9",
                     "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    assert r["hybrid"]["threshold_source"] == "given"
    plan = json.loads((out / "bit_plan.json").read_text())
    assert set(plan["weight_granularity"].values()) == {"per_tensor"}  # a huge threshold: all per-tensor
    layers = {l["name"]: l for l in r["quantizers"]["layers"] if l["wbits"] is not None}
    assert all(l["weight_granularity"] == "per_tensor" for l in layers.values())


def test_hybrid_options_need_hybrid(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--hybrid-threshold", "0.1", "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "--weight-granularity hybrid" in err


def test_nonuniform_weights_run_and_refuse_export(tmp_path, capsys):
    out = tmp_path / "nu"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--weight-quantizer", "nonuniform",
                     "--out", out, *FAST)
    assert rc == 0, err
    assert report(out)["settings"]["quant"]["weight_quantizer"] == "nonuniform"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--weight-quantizer", "nonuniform",
                     "--export", "onnx", "--out", tmp_path / "nu2", *FAST)
    assert rc == 2 and "non-uniform" in err


def test_override_spec_nonuniform():
    from zsq.cli import parse_override

    assert parse_override("re:.*conv.*=w4,nu") == ("re:.*conv.*", {"wbits": 4, "weight_quantizer": "nonuniform"})
    assert parse_override("fc=w8,pt,uni")[1] == {"wbits": 8, "weight_granularity": "per_tensor",
                                                  "weight_quantizer": "uniform"}
    assert parse_override("re:.*dw.*=mse") == ("re:.*dw.*", {"weight_estimator": "mse"})
    assert parse_override("re:.*dw.*=w4,output_mse")[1] == {"wbits": 4, "weight_estimator": "output_mse"}
    assert parse_override("conv1=w4,pc,minmax")[1] == {"wbits": 4, "weight_granularity": "per_channel",
                                                      "weight_estimator": "minmax"}


@pytest.mark.parametrize("model", ["tiny_cnn", "tiny_cnn_nobn"])
def test_retro_calibration(tmp_path, capsys, model):
    out = tmp_path / "retro"
    rc, _, err = cli(capsys, "quantize", model, "--calib", "retro", "--out", out, *FAST)
    assert rc == 0, err
    c = report(out)["calibration"]
    assert c["source"] == "retro"
    assert (out / "retro_images.png").is_file()


@pytest.mark.parametrize("method", ["adaround", "brecq", "finetune"])
def test_recover_runs_and_exports(tmp_path, capsys, method):
    out = tmp_path / method
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", method, "--recover-iters", "4",
                     "--export", "onnx", "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    assert r["settings"]["recover"]["method"] == method and "recover" in r and "recover" in r["timings_s"]
    assert r["export"]["int8"]["ort"]["float_convs"] == 0


@pytest.mark.parametrize("recover, extra, n_inputs", [
    (True, [], 256),  # the amount the recovery recipe was chosen with (CIFAR-sized inputs), 32 batches of 8
    (True, ["--distill-batches", "2"], 16),  # an explicit amount is kept
    (False, [], 8),  # plain calibration: one batch
])
def test_recover_distils_the_recipe_amount_unless_batches_are_given(tmp_path, capsys, recover, extra, n_inputs):
    out = tmp_path / "amount"
    rec = ["--recover", "adaround", "--recover-iters", "2"] if recover else []
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", *rec, *extra, "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    assert r["calibration"]["num_inputs"] == n_inputs
    assert r["settings"]["distill"]["num_batches"] == n_inputs // 8  # report.json records what was distilled
    assert r["settings"]["recover_distill_default"] is False  # resolved: settings.distill is what ran


@pytest.mark.parametrize("explicit", [None, "mse", "minmax"])
def test_recover_starts_from_percentile_unless_an_estimator_is_given(tmp_path, capsys, explicit):
    out = tmp_path / f"start-{explicit}"
    extra = ["--act-estimator", explicit] if explicit else []
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "adaround", "--recover-iters", "2",
                     *extra, "--out", out, *FAST)
    assert rc == 0, err
    s = report(out)["settings"]
    assert s["quant"]["act_estimator"] == (explicit or "mse")
    assert s["recover"]["act_estimator"] == (None if explicit else "percentile")


@pytest.mark.parametrize("recover, flag, expected", [
    (True, None, {"conv1": True, "conv2": False, "fc": False}),  # the recovery recipe: asymmetric below 8 bits
    (True, "--weight-symmetric", {"conv1": True, "conv2": True, "fc": True}),
    (False, None, {"conv1": True, "conv2": True, "fc": True}),  # plain PTQ keeps symmetric weights
    (False, "--weight-asymmetric", {"conv1": False, "conv2": False, "fc": False}),
])
def test_weight_symmetry_defaults_to_by_bits_with_recover(tmp_path, capsys, recover, flag, expected):
    out = tmp_path / "sym"
    extra = (["--recover", "adaround", "--recover-iters", "2"] if recover else []) + ([flag] if flag else [])
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--override", "@first=w8", *extra,
                     "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    layers = {l["name"]: l["weight_symmetric"] for l in r["quantizers"]["layers"]}
    assert {k: layers[k] for k in expected} == expected
    assert r["settings"]["quant"]["weight_symmetric"] == (None if recover and not flag else
                                                           {"--weight-symmetric": True, "--weight-asymmetric": False,
                                                            None: True}[flag])


@pytest.mark.parametrize("recover, flag, expected", [
    (True, None, "output_mse"),  # the recovery recipe (session 22): output-aware depthwise ranges
    (True, "minmax", "minmax"),  # an explicit choice wins
    (False, None, "minmax"),  # plain PTQ: the depthwise conv follows --weight-estimator
    (False, "output_mse", "output_mse"),
])
def test_depthwise_weight_estimator_defaults_to_output_mse_with_recover(tmp_path, capsys, recover, flag, expected):
    out = tmp_path / "dwest"
    extra = (["--recover", "adaround", "--recover-iters", "2"] if recover else []) + (
        ["--depthwise-weight-estimator", flag] if flag else [])
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", *extra, "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    estimators = {l["name"]: l["weight_estimator"] for l in r["quantizers"]["layers"]}
    assert estimators["conv3"] == expected  # tiny_cnn's depthwise conv
    assert {estimators[k] for k in ("conv1", "conv2", "conv4", "fc")} == {"minmax"}  # dense layers unaffected
    assert r["settings"]["quant"]["depthwise_weight_estimator"] == (flag or ("output_mse" if recover else None))


def test_weight_symmetric_and_asymmetric_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: usage + one error line
        cli(capsys, "quantize", "tiny_cnn", "--weight-symmetric", "--weight-asymmetric", "--out", tmp_path / "x", *FAST)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not allowed with argument --weight-symmetric" in err and "Traceback" not in err


@pytest.mark.parametrize("method, extra, mirror", [
    ("brecq", [], False),  # 16x16 inputs: off (on by default for brecq on ImageNet-sized inputs)
    ("brecq", ["--recover-mirror"], True), ("adaround", ["--recover-mirror"], True),
    ("brecq", ["--no-distill-flip", "--recover-mirror"], True), ("adaround", ["--no-recover-mirror"], False)])
def test_recover_mirror_flag(tmp_path, capsys, method, extra, mirror):
    out = tmp_path / "mirror"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", method, "--recover-iters", "2",
                     "--distill-batch-size", "8", "--distill-batches", "1", *extra, "--out", out, "--distill-iters", "3",
                     "-q")
    assert rc == 0, err
    r = report(out)
    assert r["recover"]["config"]["mirror"] is mirror
    assert r["recover"]["num_inputs"] == 8 * (2 if mirror else 1)


def _recover_config(tmp_path, monkeypatch, extra):
    """The RecoverConfig `zsq quantize tiny_cnn --wbits 4 --recover brecq *extra` hands the pipeline (not run)."""
    import zsq.pipeline

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(zsq.pipeline, "run", fake_run)
    with pytest.raises(Stop):
        main(["quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", *extra, "--out", str(tmp_path / "x")])
    return seen["cfg"].recover


@pytest.mark.parametrize("extra, mirror", [([], None), (["--no-distill-flip"], False),
                                           (["--no-distill-flip", "--recover-mirror"], True)])
def test_no_distill_flip_turns_the_mirror_default_off(tmp_path, monkeypatch, extra, mirror):
    """None leaves the choice to RecoverConfig (on for brecq on ImageNet-sized inputs); a model whose classes are
    not mirror-symmetric (--no-distill-flip) gets no mirror images unless asked for."""
    assert _recover_config(tmp_path, monkeypatch, extra).mirror is mirror


@pytest.mark.parametrize("extra, shifts, pixels", [
    ([], 0, None),  # off by default
    (["--recover-shifts", "2"], 2, None), (["--recover-shifts", "1", "--distill-jitter", "3"], 1, 3)])
def test_recover_shifts_flag(tmp_path, capsys, extra, shifts, pixels):
    out = tmp_path / "shifts"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", "--recover-iters", "2",
                     "--distill-batch-size", "8", "--distill-batches", "1", "--no-recover-mirror", *extra, "--out", out,
                     "--distill-iters", "3", "-q")
    assert rc == 0, err
    r = report(out)
    assert r["recover"]["config"]["shifts"] == shifts and r["recover"]["config"]["shift_pixels"] == pixels
    assert r["recover"]["num_inputs"] == 8 * (1 + shifts)


@pytest.mark.parametrize("extra, shifts, pixels", [([], None, None), (["--distill-jitter", "0"], None, None),
                                                   (["--distill-jitter", "0", "--recover-shifts", "2"], 2, None),
                                                   (["--distill-jitter", "12", "--recover-shifts", "1"], 1, 12)])
def test_distill_jitter_sets_the_shift_size(tmp_path, monkeypatch, extra, shifts, pixels):
    """Shifted copies are the views distillation's jitter showed the model: a set --distill-jitter is their size
    (0 or unset: RecoverConfig's default for the input size)."""
    rcfg = _recover_config(tmp_path, monkeypatch, extra)
    assert (rcfg.shifts, rcfg.shift_pixels) == (shifts, pixels)


@pytest.mark.parametrize("extra, lr", [([], 1e-2), (["--recover-lr", "0.05"], 0.05)])
def test_recover_lr_flag(tmp_path, capsys, extra, lr):
    out = tmp_path / "lr"
    rc, so, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", "--recover-iters", "2",
                      *extra, "--out", out, *FAST)
    assert rc == 0, err
    r = report(out)
    assert r["recover"]["config"]["lr"] == lr and 0.0 <= r["recover"]["undecided"] <= 1.0
    assert f"{100 * r['recover']['undecided']:.1f}% of the learned roundings undecided at the end" in so


@pytest.mark.parametrize("flag, key", [("--recover-iters", "iters"), ("--recover-batch-size", "batch_size"),
                                       ("--recover-lr", "lr")])
def test_recover_flag_help_shows_each_methods_defaults(capsys, flag, key):
    """The help reads the defaults from zsq.recover, so it follows them when they change (both input sizes)."""
    from zsq.recover import METHODS, method_defaults

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    text = out.split(f"{flag} ", 2)[2].split(" --", 1)[0]  # after the usage line's mention: the flag's help
    brecq_small, brecq_large = method_defaults("brecq")[key], method_defaults("brecq", (224, 224))[key]
    assert all(m in text for m in METHODS)
    assert f"brecq {brecq_small:g} ({brecq_large:g} for inputs larger than 128x128 pixels)" in text


def test_recover_lr_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse type check: usage + one error line
        cli(capsys, "quantize", "tiny_cnn", "--recover", "brecq", "--recover-lr", "0", "--out", tmp_path / "x", *FAST)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--recover-lr" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [("--recover-iters", "3"), ("--recover-lr", "0.1"), ("--recover-drop-prob", "0.3"),
                                  ("--recover-fisher", "0.5"), ("--recover-mirror",),
                                  ("--recover-shifts", "1"), ("--recover-input-drop", "0.5"),
                                  ("--recover-crops", "1"), ("--recover-revert-worse",), ("--recover-anchor", "0.1"),
                                  ("--recover-harden", "0.5"), ("--recover-harden-fallback",), ("--recover-refine",),
                                  ("--recover-harden-average", "0.9"), ("--recover-sampling", "epochs"),
                                  ("--recover-polish", "3"), ("--recover-channels-last",)])
def test_recover_options_without_recover(tmp_path, capsys, flag):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", *flag, "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "--recover" in err and "Traceback" not in err


def test_recover_harden_fallback_reaches_the_recipe(tmp_path, capsys):
    out = tmp_path / "ok"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", "--recover-iters", "4",
                     "--recover-harden", "0.5", "--recover-harden-fallback", "--out", out, *FAST)
    assert rc == 0, err
    assert report(out)["settings"]["recover"]["harden_fallback"] is True
    # tiny_cnn's inputs are small: harden defaults to 0, so there is nothing to fall back from
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--recover", "brecq", "--recover-harden-fallback",
                     "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "harden is 0" in err and "Traceback" not in err
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--recover", "finetune", "--recover-harden-fallback",
                     "--out", tmp_path / "y", *FAST)
    assert rc == 2 and "harden_fallback" in err and "Traceback" not in err


def test_recover_drop_prob_out_of_range(tmp_path, capsys):
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--recover", "brecq", "--recover-drop-prob", "1.5",
                     "--out", tmp_path / "x", *FAST)
    assert rc == 2 and "drop_prob" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,key,value", [(("--recover-fisher", "1"), "fisher", 1.0),
                                            (("--recover-input-drop", "0.25"), "input_drop", 0.25),
                                            (("--recover-revert-worse",), "revert_worse", True),
                                            (("--recover-crops", "1"), "crops", 1),
                                            (("--recover-anchor", "0.3"), "anchor", 0.3),
                                            (("--recover-harden", "0.4"), "harden", 0.4),
                                            (("--recover-refine",), "refine", True),
                                            (("--recover-polish", "3"), "polish", 3),
                                            (("--recover-channels-last",), "channels_last", True)])
def test_recover_options_reach_the_recipe(tmp_path, capsys, flag, key, value):
    # brecq's alone: refused, in one line, for another method
    if key not in ("crops", "anchor", "harden", "polish", "channels_last"):
        rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--recover", "adaround", *flag, "--out", tmp_path / "x", *FAST)
        assert rc == 2 and key in err and "brecq" in err and "Traceback" not in err
    if key in ("anchor", "harden"):  # not for fine-tuning, and not out of range: one line each
        for bad in (("--recover", "finetune", *flag), ("--recover", "brecq", f"--recover-{key}", "-1")):
            rc, _, err = cli(capsys, "quantize", "tiny_cnn", *bad, "--out", tmp_path / "x", *FAST)
            assert rc == 2 and key in err and "Traceback" not in err
    out = tmp_path / "ok"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", "--recover-iters", "2",
                     *flag, "--out", out, *FAST)
    assert rc == 0, err
    assert report(out)["settings"]["recover"][key] == value


def test_recover_harden_average_and_sampling_reach_the_recipe(tmp_path, capsys):
    out = tmp_path / "ok"
    rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--wbits", "4", "--recover", "brecq", "--recover-iters", "4",
                     "--recover-harden", "0.5", "--recover-harden-average", "0.9", "--recover-sampling", "epochs",
                     "--out", out, *FAST)
    assert rc == 0, err
    settings = report(out)["settings"]["recover"]
    assert settings["harden_average"] == 0.9 and settings["sampling"] == "epochs"
    for args, words in ((("--recover-harden-average", "0.9"), "harden is 0"),  # tiny_cnn's default harden is 0
                        (("--recover-harden-average", "1.5"), "harden_average")):
        rc, _, err = cli(capsys, "quantize", "tiny_cnn", "--recover", "brecq", *args, "--out", tmp_path / "x", *FAST)
        assert rc == 2 and words in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error
        cli(capsys, "quantize", "tiny_cnn", "--recover", "brecq", "--recover-sampling", "shuffle", *FAST)
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
