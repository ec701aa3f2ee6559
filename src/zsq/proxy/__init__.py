"""ZeroP: choose proxy calibration data among candidate data sets by BatchNorm-statistics distance.

Public API::

    rank_candidates(model, preprocessing, candidates, *, num_images=64, seed=0, device=None,
                    progress=True, normalization="layer", batch_size=32) -> list[ProxyScore]
    proxy_inputs(model, preprocessing, spec_text, *, num_images, seed=0, device=None,
                 progress=True, normalization="layer", batch_size=32) -> (inputs, info)
    mix_with_distilled(proxy, distilled, *, seed=0) -> inputs           # --calib proxy+distilled:
    split_calib(text) -> ("proxy" | "proxy+distilled", spec_text) or None

Candidates: a path (image folder, labels.csv folder, ImageFolder, .npz, tensor file),
``procedural:textures``, ``procedural:blobs``, ``procedural:deadleaves``, ``gaussian``, ``uniform``,
``skimage`` (optional: ``pip install scikit-image``). The BN distance is documented in
:mod:`zsq.proxy.select` and ``docs/proxy.md``.
"""

from __future__ import annotations

from .candidates import (
    ACCEPTED_FORMS,
    PROCEDURAL_KINDS,
    Candidate,
    generate_procedural,
    load_candidate,
    parse_candidate,
    parse_candidates,
    proxy_preprocessing,
)
from .select import (
    NORMALIZATIONS,
    ProxyScore,
    bn_distance,
    bn_input_stats,
    mix_with_distilled,
    proxy_inputs,
    rank_candidates,
)

PROXY_PREFIX = "proxy:"
PROXY_DISTILLED_PREFIX = "proxy+distilled:"


def split_calib(text: str) -> tuple[str, str] | None:
    """``("proxy", SPEC)`` for ``proxy:SPEC``, ``("proxy+distilled", SPEC)`` for
    ``proxy+distilled:SPEC``, ``None`` for any other ``--calib`` value. SPEC is validated (every
    candidate must parse; paths must exist), so a typo fails before distillation starts."""
    for prefix in (PROXY_DISTILLED_PREFIX, PROXY_PREFIX):
        if isinstance(text, str) and text.startswith(prefix):
            spec = text[len(prefix):]
            parse_candidates(spec)
            return prefix[:-1], spec
    return None


__all__ = [
    "ACCEPTED_FORMS",
    "NORMALIZATIONS",
    "PROCEDURAL_KINDS",
    "PROXY_DISTILLED_PREFIX",
    "PROXY_PREFIX",
    "Candidate",
    "ProxyScore",
    "bn_distance",
    "bn_input_stats",
    "generate_procedural",
    "load_candidate",
    "mix_with_distilled",
    "parse_candidate",
    "parse_candidates",
    "proxy_inputs",
    "proxy_preprocessing",
    "rank_candidates",
    "split_calib",
]
