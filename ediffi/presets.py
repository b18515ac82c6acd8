"""Named network presets in one table, and their parameter counts and forward FLOPs."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ediffi.conditioning import Cond, CondSpec, empty_cond
from ediffi.edm import EDMPrecond
from ediffi.unet import UNet, UNetConfig

# Shapes produced by the tiny offline encoders (see ediffi.encoders) and by T5-XXL + CLIP ViT-L/14.
TINY_COND = CondSpec(t5_len=128, t5_dim=32, clip_len=77, clip_dim=32, clip_embed_dim=32)
PAPER_COND = CondSpec(t5_len=128, t5_dim=4096, clip_len=77, clip_dim=768, clip_embed_dim=768)

# Unit tests: well under 5M parameters, 16x16.
_TINY = UNetConfig(
    img_resolution=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    head_dim=32,
    ctx_dim=64,
    cond=TINY_COND,
)

# eDiff-I's exact widths were not published; the paper-scale presets follow its cascade
# (64 -> 256 -> 1024) with ADM/Imagen-like widths, attention only where it is affordable.
PRESETS: dict[str, UNetConfig] = {
    "tiny": _TINY,
    # The end-to-end demo's default: 32px folded into 4x4 patches, levels at 8 and 4 px with
    # attention at both (the output conv still sees every input pixel); the standardized mean of the
    # T5 tokens and learned attention-pooling queries summarise the text into the embedding vector
    # (the tiny T5 reads bytes: a word spans several tokens, which plain cross-attention learns slowly);
    # a 16-channel full-resolution head refines the unfolded output (clean backgrounds, sharper edges).
    "tiny32": replace(
        _TINY,
        img_resolution=32,
        patch_size=4,
        attn_resolutions=(8, 4),
        pool_heads=4,
        pooled_t5=True,
        head_channels=16,
    ),
    # A wider 32x32 network (no patches).
    # Attention at 8x8 only: at 32x32, 16x16 attention cost ~40% of a CPU training step.
    "demo": UNetConfig(
        img_resolution=32,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_blocks=1,
        attn_resolutions=(8,),
        head_dim=32,
        ctx_dim=128,
        cond=TINY_COND,
    ),
    # A super-resolution stage for the demo cascade (32 -> 64).
    "demo_sr": UNetConfig(
        img_resolution=64,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_blocks=1,
        attn_resolutions=(16,),
        head_dim=32,
        ctx_dim=64,
        sr=True,
        cond=TINY_COND,
    ),
    # Unit tests: a super-resolution stage 16 -> 32.
    "tiny_sr": replace(_TINY, img_resolution=32, attn_resolutions=(16,), sr=True),
    # Paper-scale base model at 64x64.
    "base64": UNetConfig(
        img_resolution=64,
        model_channels=256,
        channel_mult=(1, 2, 3, 4),
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        head_dim=64,
        ctx_dim=1024,
        cond=PAPER_COND,
    ),
    # Paper-scale super-resolution 64 -> 256.
    "sr256": UNetConfig(
        img_resolution=256,
        model_channels=128,
        channel_mult=(1, 2, 4, 8, 8),
        num_blocks=2,
        attn_resolutions=(32, 16),
        head_dim=64,
        ctx_dim=1024,
        sr=True,
        cond=PAPER_COND,
    ),
    # Paper-scale super-resolution 256 -> 1024 (cross-attention at the lowest resolutions only).
    "sr1024": UNetConfig(
        img_resolution=1024,
        model_channels=128,
        channel_mult=(1, 1, 2, 4, 8, 8),
        num_blocks=2,
        attn_resolutions=(32,),
        head_dim=64,
        ctx_dim=1024,
        sr=True,
        cond=PAPER_COND,
    ),
}


def get_preset(name: str, **overrides) -> UNetConfig:
    """A preset's config, with field overrides (unknown names are an error)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def build_denoiser(cfg: UNetConfig, device: torch.device | str = "cpu") -> EDMPrecond:
    """A preconditioned denoiser D(x, sigma, cond) for cfg; device='meta' allocates nothing."""
    with torch.device(device):
        return EDMPrecond(UNet(cfg))


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def memory_format(name: str, device: torch.device | str) -> torch.memory_format:
    """The layout for a memory-format setting: "auto" is channels_last on the CPU, where oneDNN's
    convolutions run 20-35 % faster in it (tiny32, 2 cores: train step 203 -> 264-275 img/s,
    forward 646-735 -> 834-891 img/s), and the default layout elsewhere (not measured there yet)."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, got {name!r}")
    if name == "auto":
        name = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (meta tensors included)."""
    return sum(p.numel() for p in module.parameters())


def forward_flops(cfg: UNetConfig, batch: int = 1) -> int:
    """Forward FLOPs per image (matmul/conv/attention, counted on the meta device)."""
    D = build_denoiser(cfg, "meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        D(*_meta_inputs(cfg, batch))
    return counter.get_total_flops() // batch


def _meta_inputs(cfg: UNetConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """(x, sigma, cond) of a batch on the meta device (SR stages: with their low-resolution input)."""
    R = cfg.img_resolution
    cond = empty_cond(cfg.cond, batch, "meta")
    if cfg.sr:
        cond.lowres = torch.empty(batch, cfg.in_channels, R // 4, R // 4, device="meta")
        cond.aug_sigma = torch.empty(batch, device="meta")
    return torch.empty(batch, cfg.in_channels, R, R, device="meta"), torch.empty(batch, device="meta"), cond


def preset_report(name: str) -> dict:
    """Parameter count and forward FLOPs per image of a preset, built on the meta device."""
    cfg = get_preset(name)
    return {
        "preset": name,
        "resolution": cfg.img_resolution,
        "params": count_parameters(build_denoiser(cfg, "meta")),
        "forward_flops_per_image": forward_flops(cfg),
    }


def activation_bytes(cfg: UNetConfig, checkpointed: bool = False) -> int:
    """Bytes per image the forward keeps for the backward in float32, counted on the meta device:
    each saved tensor once, attention as a fused (flash) kernel keeps it (no L x L score matrices);
    with activation checkpointing, what the blocks keep is their inputs."""
    from ediffi.training import checkpoint_activations
    from ediffi.unet import AttnBlock, ResBlock

    D = build_denoiser(cfg, "meta")
    if checkpointed:
        checkpoint_activations(D)
    saved: dict[int, torch.Tensor] = {}
    block_inputs = [0]

    def keep(t: torch.Tensor) -> torch.Tensor:
        scores = t.ndim == 4 and t.shape[-1] == t.shape[-2] > cfg.img_resolution  # self-attention's
        if not scores:
            saved.setdefault(id(t), t)
        return t

    def count_input(module, args) -> None:
        block_inputs[0] += args[0].numel() * args[0].element_size()

    hooks = [m.register_forward_pre_hook(count_input) for m in D.modules() if isinstance(m, ResBlock | AttnBlock)]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        D(*_meta_inputs(cfg, 1))
    for h in hooks:
        h.remove()
    total = sum(t.numel() * t.element_size() for t in saved.values())
    return total + (block_inputs[0] if checkpointed else 0)
