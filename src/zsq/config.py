"""Configuration dataclasses, one per stage. Each validates itself and round-trips to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
# output_mse: the range that minimises the expected output error on the calibration inputs, for layers with at
# most OUTPUT_MSE_MAX_FAN_IN weights per output channel (depthwise convs); the other layers fall back to mse.
WEIGHT_ESTIMATORS = ("minmax", "mse", "output_mse")
OUTPUT_MSE_MAX_FAN_IN = 64
WEIGHT_QUANTIZERS = ("uniform", "nonuniform")  # nonuniform: codebook per layer/channel (zsq.quant.nonuniform)
ACT_ESTIMATORS = ("minmax", "percentile", "mse")
LR_SCHEDULES = ("constant", "cosine", "plateau")
DISTILL_INITS = ("gaussian", "uniform")
BIAS_MODES = ("auto", "weight", "output", "off")  # zsq.bias_correction.BiasCorrectionConfig.mode


def check_bits(value: Any, what: str) -> int:
    """Return ``value`` as an int bit width in [2, 8], else raise :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer number of bits in {MIN_BITS}..{MAX_BITS}, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(
            f"{what}={value} is outside the supported range {MIN_BITS}..{MAX_BITS}; "
            f"choose a bit width between {MIN_BITS} and {MAX_BITS}"
        )
    return value


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what}={value!r} is not one of {', '.join(allowed)}")


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**dict(data))


@dataclass(frozen=True)
class LayerOverride(_JsonMixin):
    """Per-layer settings that replace the model-wide ones. ``None`` fields keep the global value."""

    wbits: int | None = None
    abits: int | None = None
    weight_granularity: str | None = None
    weight_quantizer: str | None = None
    weight_estimator: str | None = None

    def __post_init__(self) -> None:
        if self.weight_quantizer is not None:
            _check_choice(self.weight_quantizer, WEIGHT_QUANTIZERS, "override weight_quantizer")
        if self.weight_estimator is not None:
            _check_choice(self.weight_estimator, WEIGHT_ESTIMATORS, "override weight_estimator")
        if self.wbits is not None:
            check_bits(self.wbits, "override wbits")
        if self.abits is not None:
            check_bits(self.abits, "override abits")
        if self.weight_granularity is not None:
            _check_choice(self.weight_granularity, WEIGHT_GRANULARITIES, "override weight_granularity")


# With QuantConfig.weight_symmetric=None, weights of at least this many bits are symmetric (ONNX Runtime's int8
# kernels) and narrower ones asymmetric: a per-channel zero-point lets a skewed channel (e.g. a depthwise kernel
# with one large tap) use all 2^b levels, which halves EfficientNet-Lite0's 4-bit depthwise weight error.
SYMMETRIC_WEIGHT_MIN_BITS = 8


@dataclass(frozen=True)
class QuantConfig(_JsonMixin):
    """How to quantize weights and activations.

    ``overrides`` maps a module name (exact) or ``re:REGEX`` to a :class:`LayerOverride` (or a dict of
    its fields). Overrides are applied in insertion order; a later match wins field by field.
    ``skip`` lists names/patterns whose layers stay in float. A pattern matching nothing raises.
    The special names ``@first`` and ``@last`` mean the first and last quantized conv/linear layer in
    data-flow order.
    """

    wbits: int = 8
    abits: int = 8
    weight_granularity: str = "per_channel"
    # True: signed narrow-range weights (int8 kernels in ONNX Runtime); False: unsigned with a zero-point per
    # channel; None: by bit width, symmetric at >= SYMMETRIC_WEIGHT_MIN_BITS bits and asymmetric below (see
    # weight_symmetric_for; zsq quantize --recover uses None: docs/recovery.md, "Asymmetric low-bit weights").
    weight_symmetric: bool | None = True
    act_symmetric: bool = False
    weight_estimator: str = "minmax"
    # The weight range estimator of depthwise convs (groups == in_channels > 1); None: weight_estimator. Overrides
    # still win. output_mse suits them (docs/recovery.md, "Output-aware depthwise ranges").
    depthwise_weight_estimator: str | None = None
    act_estimator: str = "mse"
    act_percentile: float = 99.99
    overrides: dict[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    weight_quantizer: str = "uniform"  # "uniform" grid or "nonuniform" codebook (zsq.quant.nonuniform)

    def weight_symmetric_for(self, bits: int) -> bool:
        """Whether ``bits``-bit weights are quantized symmetrically under this config."""
        if self.weight_symmetric is None:
            return bits >= SYMMETRIC_WEIGHT_MIN_BITS
        return self.weight_symmetric

    def __post_init__(self) -> None:
        _check_choice(self.weight_quantizer, WEIGHT_QUANTIZERS, "weight_quantizer")
        if self.weight_symmetric is not None and not isinstance(self.weight_symmetric, bool):
            raise ConfigError(f"weight_symmetric must be True, False or None (symmetric at >= "
                              f"{SYMMETRIC_WEIGHT_MIN_BITS} bits, asymmetric below), got {self.weight_symmetric!r}")
        check_bits(self.wbits, "wbits")
        check_bits(self.abits, "abits")
        _check_choice(self.weight_granularity, WEIGHT_GRANULARITIES, "weight_granularity")
        _check_choice(self.weight_estimator, WEIGHT_ESTIMATORS, "weight_estimator")
        if self.depthwise_weight_estimator is not None:
            _check_choice(self.depthwise_weight_estimator, WEIGHT_ESTIMATORS, "depthwise_weight_estimator")
        _check_choice(self.act_estimator, ACT_ESTIMATORS, "act_estimator")
        if not (50.0 < float(self.act_percentile) <= 100.0):
            raise ConfigError(f"act_percentile must be in (50, 100], got {self.act_percentile}")
        overrides = {} if self.overrides is None else self.overrides
        if not isinstance(overrides, Mapping):
            raise ConfigError("overrides must be a dict {module name or 're:' pattern: {wbits/abits/...} or None}, got "
                              f"{type(overrides).__name__}")
        norm: dict[str, LayerOverride | None] = {}
        for key, value in dict(overrides).items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"override keys must be non-empty module names or 're:' patterns, got {key!r}")
            if value is None or isinstance(value, LayerOverride):
                norm[key] = value
            elif isinstance(value, Mapping):
                norm[key] = LayerOverride.from_dict(value)
            else:
                raise ConfigError(f"override for {key!r} must be a dict of wbits/abits/weight_granularity or None")
        object.__setattr__(self, "overrides", norm)
        object.__setattr__(self, "skip", tuple(self.skip))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["overrides"] = {k: (None if v is None else v.to_dict()) for k, v in self.overrides.items()}
        d["skip"] = list(self.skip)
        return d


# Default distillation batch: 32 inputs for small images (CIFAR-sized), 16 above LARGE_INPUT_PIXELS
# (ImageNet-sized), where one forward+backward costs ~50x more. Chosen on distilled data: for
# EfficientNet-Lite0, 16 inputs distilled for 25-100 iterations gave the same held-apart KL at
# W8A8 (see BENCHMARKS.md, "How the defaults were chosen").
DEFAULT_DISTILL_BATCH = 32
DEFAULT_DISTILL_BATCH_LARGE = 16
LARGE_INPUT_PIXELS = 128 * 128


def is_large_input(input_size: tuple[int, int]) -> bool:
    """Whether an (H, W) input is ImageNet-sized (more than LARGE_INPUT_PIXELS), where the size-dependent defaults
    of distillation and recovery switch."""
    return input_size[0] * input_size[1] > LARGE_INPUT_PIXELS


def default_distill_batch(input_size: tuple[int, int]) -> int:
    return DEFAULT_DISTILL_BATCH_LARGE if is_large_input(input_size) else DEFAULT_DISTILL_BATCH


# How many distilled inputs low-bit recovery (zsq.recover) learns from when `zsq quantize --recover` is not given
# --distill-batches: the amounts its recipes were chosen and measured with (docs/recovery.md; BENCHMARKS.md,
# "Low-bit recovery"): 256 CIFAR-sized inputs (8 batches of 32), 80 ImageNet-sized ones (5 of 16, bounded by
# synthesis time on a CPU). ImageNet-sized: 64 until session 27; 80 lowered the real held-apart KL of Lite0 W4A8 +
# BRECQ on 3 of 3 seeds (0.128 -> 0.108 on the mean) for 2.5 more minutes of synthesis at 2 threads
# (BENCHMARKS.md, "Greedy refinement of each block's last layer, 80 distilled inputs").
RECOVER_DISTILL_INPUTS = 256
RECOVER_DISTILL_INPUTS_LARGE = 80


def recover_distill_batches(input_size: tuple[int, int], batch_size: int) -> int:
    """Distillation batches of ``batch_size`` that give recovery its default amount of inputs for ``input_size``."""
    n = RECOVER_DISTILL_INPUTS_LARGE if is_large_input(input_size) else RECOVER_DISTILL_INPUTS
    return max(1, -(-n // batch_size))


# Default random shift of the synthesis views (DistillConfig.jitter / RetroConfig.jitter = None): DeepInversion's
# 30 pixels at 224x224 (Yin et al., 2020), scaled with the shorter input side (4 pixels at 32x32). Chosen on
# held-apart real images that are never evaluated (BENCHMARKS.md, "Synthesis views").
DEFAULT_JITTER_FRACTION = 30 / 224

# Distillation steps by input size (DistillConfig.iterations / coarse_iterations = None). CIFAR-sized inputs keep
# the 100 full-size steps of sessions 1-10. Above LARGE_INPUT_PIXELS (ImageNet-sized) the inputs start with
# DeepInversion's coarse phase and get more full-size steps: chosen on held-apart real images that are never
# evaluated (BENCHMARKS.md, "Longer and coarse-to-fine synthesis").
DEFAULT_DISTILL_ITERS = 100
DEFAULT_DISTILL_ITERS_LARGE = 300
DEFAULT_COARSE_ITERS = 0
DEFAULT_COARSE_ITERS_LARGE = 200


def default_distill_iterations(input_size: tuple[int, int]) -> int:
    return DEFAULT_DISTILL_ITERS_LARGE if is_large_input(input_size) else DEFAULT_DISTILL_ITERS


def default_coarse_iterations(input_size: tuple[int, int]) -> int:
    return DEFAULT_COARSE_ITERS_LARGE if is_large_input(input_size) else DEFAULT_COARSE_ITERS


# Weight of the first BN layer in the distillation loss (DistillConfig.first_bn_weight = None; DeepInversion's
# first-BN multiplier, its published value 10). ImageNet-sized inputs: 10 since session 13 (real held-apart KL
# after Lite0 W4A8 + BRECQ 0.342 -> 0.305, lower on 3 of 3 seeds); CIFAR-sized: 1 (ResNet-20 W4A4 was mixed).
# BENCHMARKS.md, "First-BN weight".
DEFAULT_FIRST_BN_WEIGHT = 1.0
DEFAULT_FIRST_BN_WEIGHT_LARGE = 10.0


def default_first_bn_weight(input_size: tuple[int, int]) -> float:
    return DEFAULT_FIRST_BN_WEIGHT_LARGE if is_large_input(input_size) else DEFAULT_FIRST_BN_WEIGHT


# Smallest side of the inputs in distillation's coarse phase (DistillConfig.coarse_iterations): below this the
# strided convolutions of a classifier leave almost no spatial extent.
MIN_COARSE_SIDE = 8


def default_jitter(input_size: tuple[int, int]) -> int:
    return int(round(DEFAULT_JITTER_FRACTION * min(input_size)))


class _ViewsMixin:
    """``resolved_jitter`` of a synthesis config with ``flip`` / ``jitter`` fields (DistillConfig, RetroConfig)."""

    jitter: int | None

    def resolved_jitter(self, input_size: tuple[int, int]) -> int:
        return self.jitter if self.jitter is not None else default_jitter(input_size)


def check_views(flip: object, jitter: object, owner: str) -> None:
    """Validate the ``flip`` / ``jitter`` fields of a synthesis config (jitter ``None``: :func:`default_jitter`)."""
    if not isinstance(flip, bool):
        raise ConfigError(f"{owner}.flip must be True or False, got {flip!r}")
    if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0):
        raise ConfigError(f"{owner}.jitter must be a non-negative integer (pixels; 0: off) or None (the default: "
                          f"{DEFAULT_JITTER_FRACTION:.3f} of the shorter input side), got {jitter!r}")


@dataclass(frozen=True)
class DistillConfig(_ViewsMixin, _JsonMixin):
    """ZeroQ distilled-data settings (see :func:`zsq.distill.distill`)."""

    def resolved_batch_size(self, input_size: tuple[int, int]) -> int:
        return self.batch_size if self.batch_size is not None else default_distill_batch(input_size)

    def resolved_iterations(self, input_size: tuple[int, int]) -> int:
        """Full-size steps per batch (``None``: :func:`default_distill_iterations` of the input size)."""
        return self.iterations if self.iterations is not None else default_distill_iterations(input_size)

    def resolved_coarse_iterations(self, input_size: tuple[int, int]) -> int:
        """Coarse-phase steps per batch (``None``: :func:`default_coarse_iterations` of the input size)."""
        c = self.coarse_iterations
        return c if c is not None else default_coarse_iterations(input_size)

    num_batches: int = 1
    batch_size: int | None = None  # None: DEFAULT_DISTILL_BATCH by input size (see resolved_batch_size)
    iterations: int | None = None  # None: by input size (see resolved_iterations)
    lr: float = 0.2
    schedule: str = "cosine"
    input_weight: float = 1.0
    init: str = "gaussian"
    early_stop_loss: float = 0.0
    seed: int = 0
    # Optimise in the channels-last memory layout: the same computation up to float rounding, 1.05-1.25x
    # faster per step on this CPU for ResNet-20 and EfficientNet-Lite0 (BENCHMARKS.md, "Distillation cost").
    channels_last: bool = True
    # DeepInversion-style views (Yin et al., 2020): each step the model sees the inputs randomly flipped
    # horizontally (``flip``) and circularly shifted by up to ``jitter`` pixels in each direction (``None``:
    # default_jitter of the input size, 0: off). The inputs being optimised are not changed; only the view the
    # model sees in that step. On by default since session 10 (BENCHMARKS.md, "Synthesis views").
    flip: bool = True
    jitter: int | None = None
    # DeepInversion's multi-resolution start (Yin et al., 2020): first ``coarse_iterations`` steps on inputs
    # ``coarse_factor`` times smaller per side (the model sees them at that size, so a step costs about
    # 1/coarse_factor^2), then bilinearly upsampled and optimised ``iterations`` more steps at full size.
    # 0: off; None: by input size (off up to 128x128 pixels, see resolved_coarse_iterations).
    coarse_iterations: int | None = None
    coarse_factor: int = 2
    # A pyramid of coarse phases: with ``coarse_levels`` L > 1 the start runs ``coarse_iterations`` steps at each of
    # the sizes 1/coarse_factor^L, ..., 1/coarse_factor per side (smallest first), upsampling between them.
    coarse_levels: int = 1
    # Weight of the first BN layer's term in the BN-statistics loss (the first one the forward pass reaches;
    # DeepInversion's first-BN multiplier). 1: all layers alike, as in ZeroQ. None: by input size
    # (default_first_bn_weight: 10 for ImageNet-sized inputs, else 1).
    first_bn_weight: float | None = None

    def resolved_first_bn_weight(self, input_size: tuple[int, int]) -> float:
        w = self.first_bn_weight
        return float(w) if w is not None else default_first_bn_weight(input_size)

    def resolved_coarse_sizes(self, input_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The input sizes of the coarse phases, smallest first ([] when it is off); raises ConfigError when the
        smallest is too small."""
        if self.resolved_coarse_iterations(input_size) == 0:
            return []
        sizes = [(input_size[0] // self.coarse_factor ** k, input_size[1] // self.coarse_factor ** k)
                 for k in range(self.coarse_levels, 0, -1)]
        if min(sizes[0]) < MIN_COARSE_SIDE:
            what = (f"coarse_factor {self.coarse_factor}" if self.coarse_levels == 1
                    else f"coarse_factor {self.coarse_factor} over {self.coarse_levels} levels")
            raise ConfigError(f"{what} makes the {input_size[0]}x{input_size[1]} inputs {sizes[0][0]}x{sizes[0][1]} "
                              f"in the coarsest phase; each side needs at least {MIN_COARSE_SIDE} pixels: use a "
                              f"smaller coarse_factor{'' if self.coarse_levels == 1 else ' or fewer coarse_levels'} "
                              f"or coarse_iterations=0")
        return sizes

    def resolved_coarse_size(self, input_size: tuple[int, int]) -> tuple[int, int] | None:
        """The input size of the (last, largest) coarse phase, or None when it is off."""
        sizes = self.resolved_coarse_sizes(input_size)
        return sizes[-1] if sizes else None

    def __post_init__(self) -> None:
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"channels_last must be True or False, got {self.channels_last!r}")
        check_views(self.flip, self.jitter, "DistillConfig")
        # (field, smallest value, None allowed (resolved by input size), what it must be)
        for name, lowest, none_ok, what in (
                ("num_batches", 1, False, "a positive integer"),
                ("batch_size", 1, True, "a positive integer"),
                ("iterations", 1, True, "a positive integer"),
                ("coarse_iterations", 0, True, "a non-negative integer (0: no coarse phase) or None (by input size)"),
                ("coarse_factor", 2, False, "an integer >= 2 (how many times smaller each side is in the coarse "
                                            "phase)"),
                ("coarse_levels", 1, False, "a positive integer (how many coarse phases, each coarse_factor times "
                                            "smaller than the next)")):
            v = getattr(self, name)
            if v is None and none_ok:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
                raise ConfigError(f"{name} must be {what}, got {v!r}")
        fw = self.first_bn_weight
        if fw is not None and (isinstance(fw, bool) or not isinstance(fw, (int, float)) or not 0 < fw < float("inf")):
            raise ConfigError(f"first_bn_weight must be a number > 0 (1: every BN layer weighs the same) or None "
                              f"(by input size), got {fw!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.input_weight < 0:
            raise ConfigError(f"input_weight must be >= 0, got {self.input_weight}")
        if self.early_stop_loss < 0:
            raise ConfigError(f"early_stop_loss must be >= 0, got {self.early_stop_loss}")
        _check_choice(self.schedule, LR_SCHEDULES, "schedule")
        _check_choice(self.init, DISTILL_INITS, "init")
