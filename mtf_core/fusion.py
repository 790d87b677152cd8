"""Multi-task fusion: many predicted scores per candidate -> one ranking score, batched over requests.

Shapes: R requests, N candidates, K tasks. Weights are per request `[R,K]` or per candidate `[R,N,K]`.
Forms (DESIGN §4):
- `sum`:     sum_k w_k * s_k
- `product`: prod_k (s_k + b_k) ** w_k     (IntegratedRL-MTF; b = 0 gives the plain product of powers)
- `logsum`:  sum_k w_k * log(s_k + b_k)    (BatchRL-MTF; the log of `product`, so it ranks the same)
Masked candidates (padding for requests with fewer than N) get -inf and sort last.
"""

from __future__ import annotations

import torch

__all__ = ["FORMS", "fuse", "rank_positions", "top_l"]

FORMS = ("sum", "product", "logsum")
_LOG_FLOOR = 1e-9


def fuse(
    scores: torch.Tensor,
    weights: torch.Tensor,
    form: str = "sum",
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused score `[R,N]` of scores `[R,N,K]` under weights `[R,K]` or `[R,N,K]`; bias `[K]`, `[R,K]` or `[R,N,K]`."""
    if form not in FORMS:
        raise ValueError(f"unknown fusion form {form!r}; expected one of {FORMS}")
    w = weights.unsqueeze(1) if weights.dim() == 2 else weights  # (R, 1|N, K)
    if form == "sum" and weights.dim() == 2:
        fused = torch.bmm(scores, weights.to(scores.dtype).unsqueeze(-1)).squeeze(-1)  # one BLAS call
    elif form == "sum":
        fused = (scores * w.to(scores.dtype)).sum(-1)
    else:
        b = torch.zeros((), dtype=scores.dtype) if bias is None else bias
        if isinstance(b, torch.Tensor) and b.dim() == 2:
            b = b.unsqueeze(1)
        log_terms = torch.log(torch.clamp(scores + b, min=_LOG_FLOOR))
        fused = (log_terms * w).sum(-1)
        if form == "product":
            fused = torch.exp(fused)
    if mask is not None:
        fused = torch.where(mask, fused, float("-inf"))  # a third of masked_fill's time on CPU
    return fused


def rank_positions(fused: torch.Tensor) -> torch.Tensor:
    """0-based rank of each candidate under descending fused score `[R,N]`; ties keep candidate order."""
    order = torch.argsort(fused, dim=1, descending=True, stable=True)
    positions = torch.empty_like(order)
    ranks = torch.arange(fused.shape[1], device=fused.device).expand_as(order)
    positions.scatter_(1, order, ranks)
    return positions


def top_l(fused: torch.Tensor, n_top: int) -> torch.Tensor:
    """Indices `[R,L]` of the top-L candidates, best first (L clipped to N)."""
    n_top = min(n_top, fused.shape[1])
    return torch.argsort(fused, dim=1, descending=True, stable=True)[:, :n_top]
