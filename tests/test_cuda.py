"""GPU checks (skipped where no CUDA GPU is available, as in CI): a model that already lives on the GPU is
quantized, calibrated, recovered and evaluated there, with every quantizer buffer on the GPU."""

from __future__ import annotations

import pytest
import torch

import zsq
from zsq.config import QuantConfig
from zsq.recover import RecoverConfig, recover

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (optional check)")


@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_quantize_model_on_gpu(tiny_model, tiny_inputs, estimator):
    folded, _ = zsq.fold_batchnorm(tiny_model)
    folded.to("cuda")
    q = zsq.quantize(folded, QuantConfig(wbits=4, abits=8, weight_symmetric=None, weight_estimator=estimator))
    off = [n for n, b in q.named_buffers() if b.device.type != "cuda"]
    assert not off, f"buffers left on the CPU: {off}"
    zsq.calibrate(q, tiny_inputs, progress=False)
    x = tiny_inputs.to("cuda")
    with torch.no_grad():
        err = (q(x) - folded(x)).pow(2).mean() / folded(x).pow(2).mean()
    assert 0 < float(err) < 0.5


def test_recover_on_gpu(tiny_model, tiny_inputs):
    # with the GPU's default flags (TF32 convolutions on Ampere and later): recover's float-reference check must
    # not mistake TF32 rounding for a model that was already recovered (it runs in full FP32)
    folded, _ = zsq.fold_batchnorm(tiny_model)
    q = zsq.quantize(folded.to("cuda"), QuantConfig(wbits=4, abits=8, weight_symmetric=None))
    zsq.calibrate(q, tiny_inputs, progress=False)
    rep = recover(q, tiny_model.to("cuda"), tiny_inputs, RecoverConfig(method="brecq", iters=20, seed=0),
                  progress=False, holdout_inputs=tiny_inputs, device="cuda")
    assert {p.device.type for p in q.parameters()} == {"cuda"}
    assert rep.holdout_kl_after < rep.holdout_kl_before
