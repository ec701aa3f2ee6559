"""ZeroP proxy-data selection (``zsq.proxy``): the BN-statistics distance, candidate sources,
ranking, calibration inputs for ``--calib proxy:`` / ``proxy+distilled:``, and ``zsq proxy rank``.

Everything runs on the 16x16 ``tiny_cnn`` / ``tiny_cnn_nobn`` models and small synthetic data in
tmp directories, in a few seconds.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from zsq.bn_stats import batchnorm_targets
from zsq.errors import ConfigError, NoBatchNormError
from zsq.models import load_model
from zsq.proxy import (
    PROCEDURAL_KINDS,
    ProxyScore,
    bn_distance,
    bn_input_stats,
    generate_procedural,
    load_candidate,
    mix_with_distilled,
    parse_candidates,
    proxy_inputs,
    proxy_preprocessing,
    rank_candidates,
    split_calib,
)

SIZE = 16


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def tiny(batch_norm: bool = True) -> tuple[nn.Module, object]:
    model, spec = load_model("tiny_cnn" if batch_norm else "tiny_cnn_nobn", pretrained=False)
    return model.eval(), spec.preprocessing


def own_images(n: int, seed: int) -> np.ndarray:
    """The 'model's own distribution': smooth reddish images (upsampled 4x4 noise, bright red channel)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, (n, 4, 4, 3)) * np.array([30.0, 20.0, 20.0]) + np.array([200.0, 80.0, 60.0])
    img = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    return np.clip(img, 0, 255).astype(np.uint8)


@torch.no_grad()
def set_running_stats_from(model: nn.Module, images: np.ndarray, pre) -> None:
    """Training-style BN statistics: reset, then cumulative averages over train-mode forwards."""
    x = pre.normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for xb in x.split(32):
        model(xb)
    model.eval()


@torch.no_grad()
def match_running_stats(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BN's running stats to the eval-mode statistics of its input on ``x`` (layer by layer:
    one pass per BN, since a BN's input depends on the BNs before it)."""
    targets = batchnorm_targets(model)
    for _ in range(len(targets)):
        stats = bn_input_stats(model, targets, x, batch_size=x.shape[0])
        for t in targets:
            mean, std = stats[t.name]
            t.module.running_mean.copy_(mean.float())
            t.module.running_var.copy_(std.square().float())
        targets = batchnorm_targets(model)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from zsq.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("zsq proxy: error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


@pytest.fixture
def proxy_cli(monkeypatch):
    """Register the plugin for this test (the lead adds it to cli.PLUGIN_MODULES permanently)."""
    from zsq import cli as cli_mod

    if "zsq.proxy.commands" not in cli_mod.PLUGIN_MODULES:
        monkeypatch.setattr(cli_mod, "PLUGIN_MODULES", [*cli_mod.PLUGIN_MODULES, "zsq.proxy.commands"])


@pytest.fixture(scope="module")
def own_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("own") / "own.npz"
    imgs = own_images(64, seed=1)
    np.savez(path, images=imgs, labels=np.zeros(len(imgs), dtype=np.int64))
    return path


@pytest.fixture(scope="module")
def own_model():
    """tiny_cnn whose running statistics come from feeding the own distribution (seed 0 images)."""
    model, pre = tiny()
    set_running_stats_from(model, own_images(256, seed=0), pre)
    return model, pre


# --------------------------------------------------------------------------------------------
# the BN distance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["layer", "channel", "none"])
def test_distance_is_zero_when_batch_stats_equal_running_stats(normalization):
    model, _ = tiny()
    targets = batchnorm_targets(model)
    exact = {t.name: (t.module.running_mean.clone(), t.module.running_var.sqrt()) for t in targets}
    d, per_layer = bn_distance(targets, exact, normalization=normalization)
    assert d == pytest.approx(0.0, abs=1e-6)  # float32 rounding of sqrt(var)
    assert set(per_layer) == {t.name for t in targets}
    shifted = dict(exact)
    name = targets[1].name
    shifted[name] = (exact[name][0] + 0.5, exact[name][1] * 1.5)
    d2, per2 = bn_distance(targets, shifted, normalization=normalization)
    assert d2 > 0.01
    assert per2[name] > 0 and all(v == pytest.approx(0.0, abs=1e-6) for k, v in per2.items() if k != name)


def test_layer_distance_formula_and_width_invariance():
    """d_l = (||dmu|| + ||dsigma||) / ||sigma_r||: the same relative error gives the same d_l at any
    width and activation scale."""
    values = []
    for c, scale in ((4, 1.0), (64, 1.0), (64, 100.0)):
        bn = nn.BatchNorm2d(c, eps=0.0).eval()
        bn.running_mean.fill_(0.0)
        bn.running_var.fill_(scale ** 2)
        targets = batchnorm_targets(nn.Sequential(bn))
        stats = {targets[0].name: (torch.full((c,), 0.3 * scale), torch.full((c,), 1.2 * scale))}
        d, _ = bn_distance(targets, stats)
        values.append(d)
    assert values == pytest.approx([0.3 + 0.2] * 3, rel=1e-6)


def test_end_to_end_distance_is_minimal_on_the_data_that_set_the_statistics(tmp_path):
    model, pre = tiny()
    x = torch.randn(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    match_running_stats(model, x)
    torch.save(x, tmp_path / "x.pt")
    scores = rank_candidates(model, pre, [str(tmp_path / "x.pt"), "gaussian"], num_images=24, progress=False)
    by_name = {s.candidate: s.distance for s in scores}
    assert by_name[str(tmp_path / "x.pt")] < 1e-4
    assert by_name["gaussian"] > 0.01
    assert scores[0].candidate == str(tmp_path / "x.pt")


def test_pooled_statistics_do_not_depend_on_batch_size(own_model):
    model, pre = own_model
    x = load_candidate("procedural:blobs", pre, num_images=40, seed=0)
    targets = batchnorm_targets(model)
    d_all, _ = bn_distance(targets, bn_input_stats(model, targets, x, batch_size=40))
    d_small, _ = bn_distance(targets, bn_input_stats(model, targets, x, batch_size=7))
    assert d_small == pytest.approx(d_all, rel=1e-6)


def test_own_distribution_ranks_above_noise(own_model, own_npz):
    model, pre = own_model
    candidates = ["gaussian", "uniform", "procedural:textures", str(own_npz)]
    scores = rank_candidates(model, pre, candidates, num_images=48, progress=False)
    assert [s.candidate for s in scores][0] == str(own_npz)
    dist = {s.candidate: s.distance for s in scores}
    assert dist[str(own_npz)] < 0.5 * dist["gaussian"]
    assert [s.distance for s in scores] == sorted(s.distance for s in scores)
    assert all(isinstance(s, ProxyScore) and s.num_images == 48 for s in scores)


def test_ranking_leaves_the_model_as_it_was(own_model):
    model, pre = own_model
    model.train()
    model.conv1.weight.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        rank_candidates(model, pre, ["gaussian"], num_images=8, progress=False)
        assert model.training and model.conv1.weight.requires_grad
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


def test_model_without_batchnorm_raises():
    model, pre = tiny(batch_norm=False)
    with pytest.raises(NoBatchNormError, match="BatchNorm"):
        rank_candidates(model, pre, ["gaussian", "uniform"], num_images=4, progress=False)


# --------------------------------------------------------------------------------------------
# candidates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PROCEDURAL_KINDS)
def test_procedural_generators_are_seeded_and_in_range(kind):
    a = generate_procedural(kind, 20, (20, 12), seed=5)
    b = generate_procedural(kind, 20, (20, 12), seed=5)
    c = generate_procedural(kind, 20, (20, 12), seed=6)
    assert a.shape == (20, 3, 20, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.std(dim=(1, 2, 3)).min()) > 0.01  # every image has structure
    assert float((a[0] - a[1]).abs().mean()) > 0.01  # images differ from each other


@pytest.mark.parametrize("candidate", ["procedural:textures", "procedural:blobs", "procedural:deadleaves",
                                       "gaussian", "uniform"])
def test_generated_candidates_are_preprocessed_model_inputs(candidate):
    _, pre = tiny()
    x = load_candidate(candidate, pre, num_images=6, seed=0)
    assert x.shape == (6, 3, SIZE, SIZE)
    lo, hi = pre.input_range()
    assert bool((x >= lo.view(1, 3, 1, 1) - 1e-5).all()) and bool((x <= hi.view(1, 3, 1, 1) + 1e-5).all())
    assert torch.equal(x, load_candidate(candidate, pre, num_images=6, seed=0))


def test_folder_candidate_is_resized_whole_not_centre_cropped(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[:, :, 2] = 255  # blue ...
    img[:20, 10:30] = (255, 0, 0)  # ... with a red patch away from the centre 16x16 crop
    for i in range(3):
        Image.fromarray(img).save(folder / f"im{i}.png")
    _, pre = tiny()
    assert pre.resize is None and proxy_preprocessing(pre).resize == SIZE
    x = load_candidate(str(folder), pre, num_images=10, seed=0)
    assert x.shape == (3, 3, SIZE, SIZE)  # only 3 images: all of them
    red = pre.denormalize(x[0])[0]
    assert float(red.max()) > 0.9  # the red patch survived: the whole image was shrunk


def test_path_sample_is_seeded_random_subset(own_npz):
    _, pre = tiny()
    a = load_candidate(str(own_npz), pre, num_images=10, seed=0)
    b = load_candidate(str(own_npz), pre, num_images=10, seed=0)
    c = load_candidate(str(own_npz), pre, num_images=10, seed=1)
    first = load_candidate(str(own_npz), pre, num_images=64, seed=0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert first.shape[0] == 64


@pytest.mark.parametrize("bad, needle", [
    ("procedural:xyz", "unknown procedural generator"),
    ("/no/such/folder", "no such file or folder"),
    ("", "empty candidate"),
])
def test_bad_candidate_names_it_and_the_accepted_forms(bad, needle):
    with pytest.raises(ConfigError) as exc:
        parse_candidates(["gaussian", bad])
    msg = str(exc.value)
    assert needle in msg and repr(bad) in msg
    assert "procedural:textures" in msg and "skimage" in msg and "path" in msg


def test_skimage_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    _, pre = tiny()
    with pytest.raises(ConfigError, match="pip install scikit-image"):
        load_candidate("skimage", pre, num_images=4)


def test_skimage_photos_through_a_stub_module(monkeypatch):
    """The loader only needs skimage.data's functions: a stub stands in for the optional package."""
    rng = np.random.default_rng(0)
    data = types.ModuleType("skimage.data")
    data.astronaut = lambda: rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)  # RGB
    data.camera = lambda: np.full((30, 30), 128, dtype=np.uint8)  # grayscale
    data.logo = lambda: np.zeros((30, 30, 4), dtype=np.uint8)  # not in the photo list: ignored

    def needs_download():
        raise ModuleNotFoundError("pooch is needed to download this image")

    data.kidney = needs_download
    data.retina = needs_download  # in the list, but fails: skipped
    pkg = types.ModuleType("skimage")
    pkg.data = data
    monkeypatch.setitem(sys.modules, "skimage", pkg)
    monkeypatch.setitem(sys.modules, "skimage.data", data)
    _, pre = tiny()
    x = load_candidate("skimage", pre, num_images=5, seed=0)
    assert x.shape == (5, 3, SIZE, SIZE)
    gray = pre.denormalize(x[1])  # camera (2nd photo in the fixed order): 128 grey in all channels
    assert float((gray - 128 / 255).abs().max()) < 0.01


# --------------------------------------------------------------------------------------------
# calibration inputs for --calib proxy: / proxy+distilled:
# --------------------------------------------------------------------------------------------


def test_proxy_inputs_returns_the_best_candidates_sample(own_model, own_npz):
    model, pre = own_model
    x, info = proxy_inputs(model, pre, f"gaussian,{own_npz},uniform", num_images=12, seed=0, progress=False)
    assert info["source"] == "proxy" and info["selected"] == str(own_npz)
    assert info["ranking"][0] == {"candidate": str(own_npz), "distance": info["distance"]}
    assert len(info["ranking"]) == 3 and info["num_inputs"] == 12
    assert torch.equal(x, load_candidate(str(own_npz), pre, num_images=12, seed=0))


def test_proxy_inputs_single_candidate_without_batchnorm():
    model, pre = tiny(batch_norm=False)
    x, info = proxy_inputs(model, pre, "procedural:blobs", num_images=5, seed=0, progress=False)
    assert x.shape == (5, 3, SIZE, SIZE) and info["selected"] == "procedural:blobs" and info["distance"] is None
    with pytest.raises(NoBatchNormError):
        proxy_inputs(model, pre, "procedural:blobs,gaussian", num_images=5, seed=0, progress=False)


def test_mix_with_distilled_takes_half_of_each():
    proxy = torch.zeros(20, 3, 4, 4)
    distilled = torch.ones(9, 3, 4, 4)
    mixed = mix_with_distilled(proxy, distilled, seed=0)
    assert mixed.shape == (9, 3, 4, 4)
    n_distilled = int((mixed.flatten(1)[:, 0] == 1).sum())
    assert n_distilled == 5  # 9 // 2 = 4 proxy, 5 distilled
    assert torch.equal(mixed, mix_with_distilled(proxy, distilled, seed=0))
    with pytest.raises(ConfigError, match="differ in shape"):
        mix_with_distilled(torch.zeros(4, 3, 8, 8), distilled)


def test_split_calib():
    assert split_calib("proxy:gaussian,procedural:blobs") == ("proxy", "gaussian,procedural:blobs")
    assert split_calib("proxy+distilled:uniform") == ("proxy+distilled", "uniform")
    assert split_calib("distilled") is None and split_calib("some/path") is None
    with pytest.raises(ConfigError, match="procedural:nope"):
        split_calib("proxy:gaussian,procedural:nope")


# --------------------------------------------------------------------------------------------
# CLI: zsq proxy rank
# --------------------------------------------------------------------------------------------


def test_cli_rank_prints_and_writes_json(proxy_cli, capsys, tmp_path, own_npz):
    out = tmp_path / "rank.json"
    rc, stdout, err = cli(capsys, "proxy", "rank", "tiny_cnn", "--candidates", "gaussian", "procedural:blobs",
                          str(own_npz), "--num-images", "8", "--json", out, "-q")
    assert rc == 0, err
    ranking = json.loads(out.read_text())
    assert isinstance(ranking, list) and len(ranking) == 3
    assert all(set(r) == {"candidate", "distance"} for r in ranking)
    assert {r["candidate"] for r in ranking} == {"gaussian", "procedural:blobs", str(own_npz)}
    dists = [r["distance"] for r in ranking]
    assert dists == sorted(dists) and all(math.isfinite(d) and d > 0 for d in dists)
    lines = stdout.splitlines()
    assert lines[1].split()[:2] == ["1", ranking[0]["candidate"]]
    assert f"best proxy: {ranking[0]['candidate']}" in stdout


@pytest.mark.parametrize("argv, needles", [
    (["proxy", "rank", "tiny_cnn", "--candidates", "gaussian", "procedural:xyz"], ["procedural:xyz", "accepted forms"]),
    (["proxy", "rank", "tiny_cnn", "--candidates", "/no/such/dir"], ["/no/such/dir", "no such file"]),
    (["proxy", "rank", "tiny_cnn_nobn", "--candidates", "gaussian"], ["BatchNorm"]),
    (["proxy"], ["zsq proxy rank"]),
])
def test_cli_errors_are_one_line(proxy_cli, capsys, argv, needles):
    rc, _, err = cli(capsys, *argv, *(["-q"] if len(argv) > 1 else []))
    assert_one_line_error(rc, err, *needles)
