"""Expert ensembles: routing by sigma, interval plans, splitting, and the manifest."""

import json
import math

import pytest
import torch

from conftest import Counting, random_cond, randomize
from ediffi.checkpoint import read_weights, save_checkpoint
from ediffi.edm import NoiseDistribution
from ediffi.ensemble import (
    EDIFFI_BASE_QUANTILES,
    ExpertEnsemble,
    Interval,
    boundaries_from_quantiles,
    intervals_from_boundaries,
    load_ensemble,
    read_manifest,
    spawn_children,
    split_interval,
    tree_quantiles,
    write_manifest,
)
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser
from ediffi.samplers import network_evaluations


def _x(cfg, b):
    return torch.randn(b, 3, cfg.img_resolution, cfg.img_resolution, generator=torch.Generator().manual_seed(0))


def test_single_expert_ensemble_equals_base(tiny_D, tiny_cfg):
    ens = ExpertEnsemble([tiny_D], [Interval(0.0, math.inf)])
    x, sigma, cond = _x(tiny_cfg, 3), torch.tensor([0.01, 1.0, 50.0]), random_cond(tiny_cfg.cond, 3)
    assert torch.equal(ens(x, sigma, cond), tiny_D(x, sigma, cond))


def test_two_experts_route_mixed_batches(tiny_cfg):
    a, b = (randomize(build_denoiser(tiny_cfg), seed=s).eval() for s in (1, 2))
    ca, cb = Counting(a), Counting(b)
    ens = ExpertEnsemble([ca, cb], intervals_from_boundaries([1.0]))
    sigma = torch.tensor([0.1, 5.0, 0.9, 1.0, 30.0])
    x, cond = _x(tiny_cfg, 5), random_cond(tiny_cfg.cond, 5)
    out = ens(x, sigma, cond)
    assert torch.equal(torch.cat(ca.calls), torch.tensor([0.1, 0.9]))
    assert torch.equal(torch.cat(cb.calls), torch.tensor([5.0, 1.0, 30.0]))  # 1.0 belongs to [1, inf)
    for i, s in enumerate(sigma.tolist()):
        ref = (a if s < 1.0 else b)(x[i : i + 1], sigma[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-6)


def test_sampling_through_an_ensemble_costs_no_extra_evaluations(tiny_cfg):
    experts = [Counting(randomize(build_denoiser(tiny_cfg), seed=s).eval()) for s in range(3)]
    intervals = intervals_from_boundaries(boundaries_from_quantiles(EDIFFI_BASE_QUANTILES))
    ens = ExpertEnsemble(experts, intervals)
    sample(
        ens,
        random_cond(tiny_cfg.cond, 2),
        (3, 16, 16),
        [0, 1],
        SamplerConfig(sampler="heun", steps=12),
    )
    assert sum(len(e.calls) for e in experts) == network_evaluations("heun", 12)
    for e, iv in zip(experts, intervals, strict=True):
        assert e.calls and all(bool(iv.contains(s).all()) for s in e.calls)


def test_ediffi_three_expert_plan_has_the_paper_mass_split():
    noise = NoiseDistribution()
    ivs = intervals_from_boundaries(boundaries_from_quantiles(EDIFFI_BASE_QUANTILES))
    mass = [noise.cdf(iv.hi) - noise.cdf(iv.lo) for iv in ivs]
    assert mass == pytest.approx([1 / 8, 1 - 1 / 8 - 1 / 512, 1 / 512], rel=1e-9)


def test_binary_tree_and_split():
    noise = NoiseDistribution()
    assert tree_quantiles(2) == [0.25, 0.5, 0.75]
    lo, hi = split_interval(Interval(0.5, 4.0), noise)
    assert lo.hi == hi.lo and lo.lo == 0.5 and hi.hi == 4.0
    assert noise.cdf(lo.hi) - noise.cdf(0.5) == pytest.approx(noise.cdf(4.0) - noise.cdf(lo.hi))
    root_children = split_interval(Interval(0.0, math.inf), noise)
    assert root_children[0].hi == pytest.approx(noise.quantile(0.5))


def test_children_start_from_parent_weights_and_are_independent(tiny_D):
    kids = spawn_children(tiny_D, 2)
    for k in kids:
        for (n, p), q in zip(k.named_parameters(), tiny_D.parameters(), strict=True):
            assert torch.equal(p, q), n
    with torch.no_grad():
        next(kids[0].parameters()).add_(1.0)
    assert not torch.equal(next(kids[0].parameters()), next(kids[1].parameters()))


@pytest.mark.parametrize("bounds", [[], [2.0, 1.0], [0.0]])
def test_bad_boundaries_are_errors(bounds):
    if not bounds:
        assert len(intervals_from_boundaries(bounds)) == 1
        return
    with pytest.raises(ValueError, match="strictly increasing"):
        intervals_from_boundaries(bounds)


def test_coverage_errors_name_the_problem(tiny_D):
    with pytest.raises(ValueError, match="gap"):
        ExpertEnsemble([tiny_D, tiny_D], [Interval(0, 1), Interval(2, math.inf)])
    with pytest.raises(ValueError, match="overlap"):
        ExpertEnsemble([tiny_D, tiny_D], [Interval(0, 2), Interval(1, math.inf)])
    with pytest.raises(ValueError, match="end at inf"):
        ExpertEnsemble([tiny_D], [Interval(0, 1)])


def _write_ensemble(tmp_path, cfg, n=2, ema=(True, True)):
    """n experts whose EMA weights (where they have them) differ from their weights."""
    intervals = intervals_from_boundaries(boundaries_from_quantiles(tree_quantiles(1))[: n - 1])
    names = []
    for i in range(n):
        D = randomize(build_denoiser(cfg), seed=10 + i)
        E = randomize(build_denoiser(cfg), seed=20 + i) if ema[i] else None
        save_checkpoint(tmp_path / f"expert{i}", cfg, D, ema=E, metadata={"interval": i})
        names.append(f"expert{i}")
    return write_manifest(tmp_path / "ensemble.json", intervals, names), intervals


def _holds(D, file) -> bool:
    return all(torch.equal(v, read_weights(file)[k]) for k, v in D.net.state_dict().items())


def test_manifest_round_trip_and_sampling(tmp_path, tiny_cfg):
    path, intervals = _write_ensemble(tmp_path, tiny_cfg)
    got, ckpts, _ = read_manifest(path)
    assert got == intervals and ckpts[0] == tmp_path / "expert0"
    ens, raw = load_ensemble(path), load_ensemble(path, use_ema=False)
    for i, c in enumerate(ckpts):
        assert _holds(ens.experts[i], c / "ema.safetensors") and _holds(raw.experts[i], c / "model.safetensors")
    cond = random_cond(tiny_cfg.cond, 2)
    imgs = sample(ens, cond, (3, 16, 16), [1, 2], SamplerConfig(steps=4))
    assert imgs.shape == (2, 3, 16, 16) and torch.isfinite(imgs).all()
    assert not torch.equal(imgs, sample(raw, cond, (3, 16, 16), [1, 2], SamplerConfig(steps=4)))


def test_an_expert_without_ema_serves_its_weights(tmp_path, tiny_cfg):
    path, _ = _write_ensemble(tmp_path, tiny_cfg, ema=(True, False))
    ens = load_ensemble(path)
    assert _holds(ens.experts[0], tmp_path / "expert0" / "ema.safetensors")
    assert _holds(ens.experts[1], tmp_path / "expert1" / "model.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["experts"][1].update(sigma_lo=99.0), "gap"),
        (lambda d: d["experts"][0].update(sigma_lo=0.1), "start at 0"),
        (lambda d: d["experts"][1].update(sigma_hi=50.0), "end at inf"),
        (lambda d: d["experts"][1].update(checkpoint="nowhere"), "nowhere/config.json not found"),
        (lambda d: d["experts"][0].pop("sigma_lo"), "expert 0 is malformed"),
        (lambda d: d.update(format="something"), "not an ediffi ensemble manifest"),
    ],
)
def test_manifest_validation_errors(tmp_path, tiny_cfg, edit, message):
    path, _ = _write_ensemble(tmp_path, tiny_cfg)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        read_manifest(path)


def test_manifest_not_json_is_named(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m\.json: ensemble manifest is not valid JSON"):
        read_manifest(tmp_path / "m.json")
