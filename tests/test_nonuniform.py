"""Non-uniform weight quantization (zsq.quant.nonuniform): clustering and level apportioning, nearest-level
mapping, quantization error vs uniform, bit packing, the quantize/checkpoint/size integration, the ONNX
refusal, and an end-to-end run on a tiny model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import zsq
from zsq.checkpoint import CODEBOOK_SUFFIX, CODES_SUFFIX, WEIGHTS_FILE, load_quantized, save_quantized
from zsq.config import LayerOverride, QuantConfig
from zsq.errors import ConfigError, ExportError, UnsupportedLayerError
from zsq.models import load_model
from zsq.quant import quantize, weight_layers
from zsq.quant.modules import WeightQuantizer
from zsq.quant.nonuniform import (NonUniformWeightQuantizer, apportion_levels, cluster_edges, cluster_stats,
                                  codebook_from_clusters, codebook_storage_dtype, fit_codebook, nearest_level,
                                  nonuniform_mse, pack_indices, packed_bytes, uniform_mse, unpack_indices)
from zsq.size import quantized_size_bytes


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _laplace(shape, seed: int = 0) -> torch.Tensor:
    u = torch.rand(shape, generator=_gen(seed)) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _tiny(name: str = "tiny_cnn", **cfg):
    torch.manual_seed(0)
    model, spec = load_model(name, pretrained=False)
    model.eval()
    folded, _ = zsq.fold_batchnorm(model)
    q = quantize(folded, QuantConfig(**cfg))
    x = zsq.gaussian_inputs(8, spec.preprocessing, seed=1)
    zsq.calibrate(q, x, progress=False)
    return model, q, spec, x


# ------------------------------------------------------------------------------------------------
# Clusters and level apportioning
# ------------------------------------------------------------------------------------------------


def test_cluster_edges_are_ordered_and_cover_the_range():
    rows = torch.randn(5, 400, generator=_gen(1))
    rows[1] *= 0.01
    rows[2, :] = 0.3  # constant row: every edge collapses onto the value
    edges = cluster_edges(rows, (1.0, 2.0))
    assert edges.shape == (5, 6)
    assert torch.all(edges[:, 1:] >= edges[:, :-1])
    assert torch.allclose(edges[:, 0], rows.double().min(1).values)
    assert torch.allclose(edges[:, -1], rows.double().max(1).values)
    counts, widths = cluster_stats(rows, edges)
    assert torch.all(counts.sum(1) == 400)
    # a Gaussian row: most weights in the central cluster [mu - s, mu + s], few in the tails
    assert counts[0, 2] > 0.6 * 400 and counts[0, 0] + counts[0, 4] < 0.06 * 400
    assert torch.all(widths >= 0)
    with pytest.raises(ConfigError):
        cluster_edges(rows, (2.0, 1.0))


def test_levels_sum_to_two_to_the_bits_and_follow_population_and_range():
    counts = torch.tensor([[10.0, 1000.0, 10.0], [100.0, 100.0, 100.0], [50.0, 0.0, 50.0]])
    widths = torch.tensor([[1.0, 1.0, 1.0], [1.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    for bits in (2, 3, 4, 8):
        alloc = apportion_levels(counts, widths, 2 ** bits)
        assert torch.all(alloc.sum(1) == 2 ** bits)
        assert alloc[2, 1] == 0  # an empty cluster gets nothing
        if 2 ** bits >= 3:
            assert torch.all(alloc[:2] >= 1)
    alloc = apportion_levels(counts, widths, 16)
    assert alloc[0, 1] > alloc[0, 0] and alloc[0, 1] > alloc[0, 2]  # more weights -> more levels
    assert alloc[1, 1] > alloc[1, 0]  # wider range (same population) -> more levels
    # continuous optimum: a_i proportional to (n_i r_i^2)^(1/3)
    big = apportion_levels(counts[:1], widths[:1], 256)[0].double()
    w = (counts[0] * widths[0] ** 2) ** (1 / 3)
    assert torch.all((big - 256 * w / w.sum()).abs() <= 1.0)


def test_greedy_apportioning_is_the_exact_integer_optimum():
    g = _gen(3)
    for _ in range(10):
        counts = torch.randint(1, 200, (1, 4), generator=g).double()
        widths = torch.rand(1, 4, generator=g).double() + 0.1
        alloc = apportion_levels(counts, widths, 8)[0]
        cost = lambda a: float((counts[0] * widths[0] ** 2 / torch.tensor(a).double() ** 2).sum())
        best = min((a for a in itertools.product(range(1, 6), repeat=4) if sum(a) == 8), key=cost)
        assert cost(tuple(alloc.tolist())) == pytest.approx(cost(best), rel=1e-12)


def test_codebook_has_two_to_the_bits_sorted_levels_dense_in_the_centre():
    w = torch.randn(4, 2000, generator=_gen(4))
    cb = fit_codebook(w, bits=4, per_channel=True)
    assert cb.shape == (4, 16) and cb.dtype == torch.float32
    assert torch.all(cb[:, 1:] >= cb[:, :-1])
    assert torch.all(cb[:, 0] >= w.min(1).values - 1e-3) and torch.all(cb[:, -1] <= w.max(1).values + 1e-3)
    sigma = w.std(1, keepdim=True)
    central = (cb.abs() <= sigma).sum(1)
    # 2 sigma of a ~7 sigma wide range holds more than 2/7 of the levels
    assert torch.all(central >= 6)
    gaps = cb[:, 1:] - cb[:, :-1]
    mid = gaps[:, 7]
    assert torch.all(mid < gaps[:, 0]) and torch.all(mid < gaps[:, -1])  # fine steps in the middle, coarse in tails
    # the same thing built from the primitives directly
    rows = w.double()
    edges = cluster_edges(rows)
    counts, widths = cluster_stats(rows, edges)
    raw = codebook_from_clusters(edges, apportion_levels(counts, widths, 16))
    assert torch.allclose(raw.float(), cb, atol=2e-3)


def test_nearest_level_mapping_is_correct():
    w = torch.randn(3, 500, generator=_gen(5))
    cb = fit_codebook(w, bits=3, per_channel=True)
    idx = nearest_level(w, cb)
    assert idx.min() >= 0 and idx.max() < 8
    dist = (w[:, :, None] - cb[:, None, :]).abs()
    chosen = torch.gather(dist, 2, idx[:, :, None])[..., 0]
    assert torch.allclose(chosen, dist.min(dim=2).values)
    q = NonUniformWeightQuantizer(bits=3, per_channel=True, channels=3)
    q.calibrate_from(w)
    out = q(w)
    assert torch.allclose(out, torch.gather(cb, 1, idx))
    assert torch.equal(q.dequantize(q.integer(w)), out)


@pytest.mark.parametrize("dist", ["gaussian", "laplacian"])
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_nonuniform_error_not_above_uniform_at_the_same_bits(dist, bits, per_channel):
    w = torch.randn(32, 288, generator=_gen(6)) if dist == "gaussian" else _laplace((32, 288), seed=6)
    u = uniform_mse(w, bits=bits, per_channel=per_channel)
    n = nonuniform_mse(w, bits=bits, per_channel=per_channel)
    assert n <= u, (n, u)


def test_lloyd_refinement_never_increases_the_error():
    w = _laplace((8, 300), seed=7)
    base = nonuniform_mse(w, bits=4, per_channel=True)
    assert nonuniform_mse(w, bits=4, per_channel=True, refine_iters=3) <= base + 1e-12


def test_straight_through_gradient():
    w = torch.randn(4, 10, generator=_gen(8), requires_grad=True)
    q = NonUniformWeightQuantizer(bits=2, per_channel=False, channels=4)
    q.calibrate_from(w.detach())
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip(bits):
    idx = torch.randint(0, 2 ** bits, (1001,), generator=_gen(bits))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8) == packed_bytes(1001, bits)
    assert torch.equal(unpack_indices(packed, bits, 1001), idx)
    with pytest.raises(ConfigError):
        pack_indices(torch.tensor([2 ** bits]), bits)


def test_codebook_float16_when_lossless():
    assert codebook_storage_dtype(torch.tensor([[0.5, -0.25, 0.0]])) == torch.float16
    assert codebook_storage_dtype(torch.tensor([[0.1]])) == torch.float32  # 0.1 is not a float16 number
    cb = fit_codebook(torch.randn(2, 100, generator=_gen(9)), bits=4, per_channel=True)
    assert codebook_storage_dtype(cb) == torch.float16  # fit_codebook rounds to float16 when it can


# ------------------------------------------------------------------------------------------------
# Configuration, quantize, checkpoint, size, export
# ------------------------------------------------------------------------------------------------


def test_config_field_and_per_layer_override():
    cfg = QuantConfig(wbits=4, weight_quantizer="nonuniform", overrides={"fc": {"weight_quantizer": "uniform"}})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig().weight_quantizer == "uniform"
    with pytest.raises(ConfigError, match="weight_quantizer"):
        QuantConfig(weight_quantizer="kmeans")
    with pytest.raises(ConfigError, match="weight_quantizer"):
        LayerOverride(weight_quantizer="log")
    # old configs (no weight_quantizer key) still load
    d = QuantConfig().to_dict()
    d.pop("weight_quantizer")
    assert QuantConfig.from_dict(d).weight_quantizer == "uniform"
    _, q, _, _ = _tiny(wbits=4, abits=8, weight_quantizer="nonuniform",
                       overrides={"fc": {"weight_quantizer": "uniform"}})
    layers = weight_layers(q)
    assert isinstance(layers["fc"].weight_quantizer, WeightQuantizer)
    assert all(isinstance(m.weight_quantizer, NonUniformWeightQuantizer) for n, m in layers.items() if n != "fc")
    plans = {p.name: p.weight_quantizer for p in q.zsq_report.layers}
    assert plans["fc"] == "uniform" and plans["conv1"] == "nonuniform"


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_checkpoint_stores_codes_and_codebook_and_reloads_identically(tmp_path, granularity):
    from safetensors import safe_open

    _, q, _, x = _tiny(wbits=3, abits=8, weight_quantizer="nonuniform", weight_granularity=granularity)
    with torch.no_grad():
        ref = q(x)
    out = save_quantized(q, tmp_path / "ck", model_name="tiny_cnn")
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in weight_layers(q).items():
        assert f"{name}.weight" not in stored
        codes = stored[f"{name}{CODES_SUFFIX}"]
        assert codes.dtype == torch.uint8 and codes.numel() == packed_bytes(m.weight.numel(), 3)
        cb = stored[f"{name}{CODEBOOK_SUFFIX}"]
        assert cb.dtype == torch.float16 and cb.shape == m.weight_quantizer.codebook.shape
    loaded, _, _ = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    for name, m in weight_layers(loaded).items():
        orig = weight_layers(q)[name]
        assert torch.equal(m.weight_quantizer.codebook, orig.weight_quantizer.codebook)
        assert torch.equal(m.quantized_weight(), orig.quantized_weight())


def test_size_counts_packed_indices_and_codebooks():
    _, qu, _, _ = _tiny(wbits=4, abits=8)
    _, qn, _, _ = _tiny(wbits=4, abits=8, weight_quantizer="nonuniform")
    extra = 0
    for name, m in weight_layers(qn).items():
        wq = m.weight_quantizer
        assert wq.storage_bytes(m.weight.numel()) == packed_bytes(m.weight.numel(), 4) + wq.codebook.numel() * 2
        extra += wq.codebook.numel() * 2 - weight_layers(qu)[name].weight_quantizer.scale.numel() * 4
    assert quantized_size_bytes(qn) - quantized_size_bytes(qu) == extra


def test_onnx_export_refuses_nonuniform_weights(tmp_path):
    pytest.importorskip("onnx")
    from zsq.export import export_onnx, snap_biases

    _, q, _, _ = _tiny("tiny_cnn_nobn", wbits=4, abits=8, weight_quantizer="nonuniform")
    assert snap_biases(q) == []  # codebook layers have no int32 bias grid: left alone, no crash
    with pytest.raises(ExportError, match="non-uniform") as exc:
        export_onnx(q, tmp_path / "m.onnx", example_input=torch.zeros(1, 3, 16, 16))
    assert isinstance(exc.value, UnsupportedLayerError)
    assert "weight_quantizer='uniform'" in str(exc.value) and not (tmp_path / "m.onnx").exists()


def test_end_to_end_tiny_model_pipeline(tmp_path):
    """The whole pipeline with non-uniform 3-bit weights: closer to the float weights than uniform 3-bit,
    runs, saves a checkpoint that reloads to the same outputs, and reports the true (smaller) size."""
    from zsq.pipeline import RunConfig, run

    model, qu, spec, x = _tiny(wbits=3, abits=8)
    cfg = RunConfig(model="tiny_cnn", quant=QuantConfig(wbits=3, abits=8, weight_quantizer="nonuniform"),
                    calib="gaussian", calib_size=8)
    res = run(cfg, out_dir=tmp_path / "run", progress=False)
    qn = res.quantized_model
    err = {tag: sum(float((m.quantized_weight() - m.weight).detach().pow(2).sum()) for m in weight_layers(q).values())
           for tag, q in (("uniform", qu), ("nonuniform", qn))}
    assert err["nonuniform"] < err["uniform"]
    assert res.report["quantizers"]["layers"][0]["weight_quantizer"] == "nonuniform"
    assert res.report["size_bytes"]["quantized"] == quantized_size_bytes(qn) < res.report["size_bytes"]["fp32"] / 3
    loaded, _, _ = load_quantized(tmp_path / "run")
    with torch.no_grad():
        out = qn(x)
        assert torch.equal(loaded(x), out)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
