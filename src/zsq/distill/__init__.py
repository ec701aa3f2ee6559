"""Calibration data without real data: ZeroQ distilled data and baselines."""

from .baselines import gaussian_inputs
from .zeroq import DistillResult, distill, natural_input_stats
from .grid import save_image_grid
from .retro import RetroConfig, RetroResult, retro_synthesize

__all__ = ["distill", "DistillResult", "gaussian_inputs", "natural_input_stats", "save_image_grid",
           "retro_synthesize", "RetroConfig", "RetroResult"]
