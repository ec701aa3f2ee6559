"""Output-distribution metrics shared by every stage that compares a quantized model with its float one
(evaluation, sensitivity, bias correction, recovery, hybrid choice, mixed-precision checks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(ref) || softmax(logits)) in nats, computed in float64 (terms where the reference
    probability underflows to 0 count 0, even against a -inf log-probability; rounding below 0 is clamped).
    The one KL zsq uses everywhere."""
    log_p = F.log_softmax(ref_logits.double(), dim=1)
    log_q = F.log_softmax(logits.double(), dim=1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=1).clamp_min(0.0)


__all__ = ["kl_divergence"]
