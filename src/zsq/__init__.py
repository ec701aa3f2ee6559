"""zsq: zero-shot (data-free) quantization of PyTorch models.

The pipeline, one verb per stage::

    model, spec = zsq.models.load_model(name, weights=...)
    data = zsq.distill(model, spec.preprocessing).inputs      # or gaussian_inputs / real images
    folded, report = zsq.fold_batchnorm(model)
    qmodel = zsq.quantize(folded, zsq.QuantConfig(wbits=8, abits=8))
    zsq.calibrate(qmodel, data)
    zsq.correct_bias(qmodel, folded, data)                   # cancel each layer's mean output error
"""

__version__ = "0.1.0"

from .bias_correction import BiasCorrectionConfig, correct_bias
from .calibrate import calibrate
from .config import DistillConfig, LayerOverride, QuantConfig
from .distill import distill, gaussian_inputs
from .errors import ZsqError
from .fold import fold_batchnorm
from .quant import quantize

__all__ = ["calibrate", "correct_bias", "BiasCorrectionConfig", "distill", "gaussian_inputs", "fold_batchnorm", "quantize", "QuantConfig", "DistillConfig",
           "LayerOverride", "ZsqError", "__version__"]
