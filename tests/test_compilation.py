"""torch.compile on CPU: compiled training steps and sampling match eager to float tolerance, a
batch of any size reuses one of a few graphs, and activation checkpointing changes no gradient."""

import copy

import pytest
import torch

from conftest import random_cond, randomize
from ediffi.compilation import (
    COMPILED_UNITS,
    Bucketed,
    bucket,
    check_compile,
    compile_blocks,
    for_sampling,
    use_compile,
)
from ediffi.conditioning import DropoutConfig
from ediffi.edm import NoiseDistribution, edm_loss
from ediffi.ensemble import ExpertEnsemble, intervals_from_boundaries
from ediffi.pipeline import SamplerConfig, sample
from ediffi.presets import build_denoiser, get_preset
from ediffi.training import checkpoint_activations, train_step


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A torch.compile backend that records each graph's input shapes and runs it as traced."""

    def __init__(self):
        self.graphs: list[list[tuple]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward


def _batches(cfg, n: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R = cfg.img_resolution
    return [(torch.randn(B, 3, R, R, generator=g), random_cond(cfg.cond, B, seed=seed + i)) for i in range(n)]


def _train(D, micro_batches: list, steps: int) -> list[float]:
    opt = torch.optim.AdamW(D.parameters(), lr=1e-3)
    losses = []
    for s in range(steps):
        gen = torch.Generator().manual_seed(s)
        res = train_step(D, opt, micro_batches, NoiseDistribution(), DropoutConfig(), generator=gen)
        losses.append(res.loss.item())
    return losses


def test_compiled_training_matches_eager_with_accumulation():
    # Inductor compiles each graph with the C++ compiler: one level keeps this to a few graphs.
    cfg = get_preset("tiny", channel_mult=(1,), attn_resolutions=(16,))
    eager = randomize(build_denoiser(cfg), seed=3)
    compiled = compile_blocks(copy.deepcopy(eager))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and EMA unchanged
    micro = _batches(cfg, 2, 4)  # two micro-batches a step: gradient accumulation through the graphs
    want, got = _train(eager, micro, 2), _train(compiled, micro, 2)
    assert got == pytest.approx(want, rel=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_bucketed_sampling_matches_eager_for_a_short_last_batch(tiny_D, tiny_cfg):
    # aot_eager: dynamo's and AOTAutograd's graph of the whole denoiser, run as traced (inductor's
    # numbers are the test above's; its C++ compile of this graph would cost another 20 s here).
    cond = random_cond(tiny_cfg.cond, 3, seed=5)
    scfg = SamplerConfig(steps=3, guidance=2.0)
    want = sample(tiny_D, cond, (3, 16, 16), [1, 2, 3], scfg)
    got = sample(Bucketed(tiny_D, backend="aot_eager"), cond, (3, 16, 16), [1, 2, 3], scfg)  # 6 run as 8
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_compiled_blocks_compile_once_per_block_shape():
    cfg = get_preset("tiny")
    backend = CountingBackend()
    D = compile_blocks(randomize(build_denoiser(cfg)), backend=backend)
    micro = _batches(cfg, 1, 4)
    _train(D, micro, 1)
    first = len(backend.graphs)
    units = sum(isinstance(m, COMPILED_UNITS) for m in D.modules())
    assert 0 < first <= 2 * units  # at most a forward and a backward graph a block
    _train(D, micro, 2)
    assert len(backend.graphs) == first  # later steps compile nothing


def test_an_ensemble_with_changing_batches_compiles_a_few_graphs(tiny_cfg):
    experts = [randomize(build_denoiser(tiny_cfg), seed=s).eval() for s in range(3)]
    ensemble = ExpertEnsemble(experts, intervals_from_boundaries([0.5, 5.0]))
    backend = CountingBackend()
    D = for_sampling(ensemble, True, backend=backend)
    assert isinstance(D, ExpertEnsemble) and all(isinstance(e, Bucketed) for e in D.experts)
    scfg = SamplerConfig(steps=6, guidance=2.0)
    for B in (8, 8, 5, 3):  # a prompt file's batches, its last one short
        cond = random_cond(tiny_cfg.cond, B, seed=B)
        got = sample(D, cond, (3, 16, 16), list(range(B)), scfg)
        want = sample(ensemble, cond, (3, 16, 16), list(range(B)), scfg)
        assert torch.allclose(got, want, atol=1e-5)
    batch_sizes = {g[0][0] for g in backend.graphs}
    assert batch_sizes <= {16, 8}  # guidance doubles 8, 5 and 3 into buckets 16 and 8
    assert len(backend.graphs) <= len(experts) * len(batch_sizes)  # each expert at most once a bucket


def test_activation_checkpointing_changes_no_gradient(tiny_cfg):
    plain = randomize(build_denoiser(tiny_cfg), seed=2)
    ckpt = checkpoint_activations(copy.deepcopy(plain))
    x, cond = _batches(tiny_cfg, 1, 3)[0]
    for D in (plain, ckpt):
        edm_loss(D, x, cond, NoiseDistribution(), torch.Generator().manual_seed(0))[0].mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_compile_settings():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert use_compile(True, "cpu", "train") and not use_compile(False, "cuda", "sample")
    assert use_compile("auto", "cuda", "train")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile must be auto, true or false"):
            check_compile(bad)
