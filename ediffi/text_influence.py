"""How much the text changes the denoiser at each noise level, and expert boundaries placed from it.

eDiff-I's analysis: early in sampling (high sigma) the prediction depends strongly on the text,
late (low sigma) it is almost ignored; its experts were placed by hand at quantiles of the training
noise. `influence_curve` measures the effect on a trained model and held-out rows: at each sigma,
the mean squared difference between the conditional and unconditional (every embedding dropped)
predictions, and the EDM loss there. `boundaries_from_influence` places k - 1 boundaries so that
each expert holds an equal share of the text's influence weighted by the training noise density:

    w(sigma) = influence(sigma) * p_train(sigma),   boundary j at the sigma where W reaches j / k,

W the normalised cumulative of w over ln(sigma) (the rule the expert job's `plan.auto` uses).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser, NoiseDistribution, loss_weight


@torch.no_grad()
def influence_curve(
    D: Denoiser,
    batches: Sequence[tuple[torch.Tensor, Cond]],
    sigmas: Sequence[float],
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per sigma: `influence` = mean ||D(x; cond) - D(x; null)||^2 per pixel, `loss` = the EDM loss,
    over the rows of `batches` (x0 in [-1, 1]); the same noise draw at every sigma."""
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x0.shape, generator=g) for x0, _ in batches]
    out = {"sigma": [float(s) for s in sigmas], "influence": [], "loss": []}
    for s in out["sigma"]:
        infl = loss = n = 0.0
        for (x0, cond), eps in zip(batches, noise, strict=True):
            B = x0.shape[0]
            x = x0 + s * eps.to(x0.device)
            sigma = torch.full((2 * B,), s, device=x0.device)
            both = D(torch.cat([x, x]), sigma, Cond.cat([cond, cond.null()]))
            c, u = both[:B], both[B:]
            infl += (c - u).square().flatten(1).mean(1).sum().item()
            loss += (loss_weight(sigma[:B]) * (c - x0).square().flatten(1).mean(1)).sum().item()
            n += B
        out["influence"].append(infl / n)
        out["loss"].append(loss / n)
    return out


def log_sigmas(n: int, noise: NoiseDistribution = NoiseDistribution(), tails: float = 1e-3) -> list[float]:
    """n sigmas evenly spaced in ln(sigma) between the training distribution's tails quantiles."""
    lo, hi = math.log(noise.quantile(tails)), math.log(noise.quantile(1 - tails))
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def boundaries_from_influence(
    sigmas: Sequence[float], influence: Sequence[float], k: int, noise: NoiseDistribution = NoiseDistribution()
) -> list[float]:
    """k - 1 increasing sigma boundaries giving each of k experts an equal share of the text's
    influence weighted by the training noise density (see the module docstring)."""
    if k < 2:
        raise ValueError(f"need at least 2 experts, got {k}")
    if len(sigmas) < 3 or any(b <= a for a, b in itertools.pairwise(sigmas)):
        raise ValueError("sigmas must be increasing, at least 3 of them")
    ln = [math.log(s) for s in sigmas]
    density = [math.exp(-0.5 * ((v - noise.P_mean) / noise.P_std) ** 2) for v in ln]  # of ln(sigma)
    w = [max(i, 0.0) * d for i, d in zip(influence, density, strict=True)]
    # Cumulative by the trapezoid rule over ln(sigma), then inverted by linear interpolation.
    cum = [0.0]
    for j in range(1, len(ln)):
        cum.append(cum[-1] + 0.5 * (w[j] + w[j - 1]) * (ln[j] - ln[j - 1]))
    if cum[-1] <= 0:
        raise ValueError("the text changes the prediction at no measured noise level: no boundaries to place")
    out = []
    for q in (j / k for j in range(1, k)):
        t = q * cum[-1]
        i = next(i for i in range(1, len(cum)) if cum[i] >= t)
        f = (t - cum[i - 1]) / (cum[i] - cum[i - 1]) if cum[i] > cum[i - 1] else 0.0
        out.append(math.exp(ln[i - 1] + f * (ln[i] - ln[i - 1])))
    return out
