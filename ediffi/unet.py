"""The denoiser network: an ADM/EDM-family U-Net with cross-attention over the conditioning sequence.

Residual blocks with group norm and an adaptive scale/shift from the embedding vector; self- and
cross-attention at chosen resolutions. The embedding vector is the noise-level embedding plus the
projected pooled CLIP text embedding and CLIP image embedding (optionally the mean of the T5 tokens,
standardized per feature by running statistics of the training prompts, as Imagen adds pooled T5
text; optionally an attention-pooled summary of the whole conditioning sequence; for
super-resolution, the augmentation level). Optionally the input is folded into patches (pixel
unshuffle), so the levels start at img_resolution / patch_size; the output conv then also sees the
folded input pixels, scaled per channel by a gain from the embedding vector, so how much of each
pixel passes through can follow the noise level (a fixed weight could denoise at one noise level
only), and optionally a small full-resolution conv head refines the unfolded output. The pooled
CLIP text can be left out of the embedding vector (`pooled_text=False`: text only through
cross-attention).
Cross-attention reads [null; T5 tokens; CLIP text tokens; CLIP image token],
each projected to `ctx_dim`, with a key-padding mask; the always-present learned null token keeps
the softmax defined when every embedding is dropped.
The masks are authoritative: every value a mask marks absent is read as zero (`Cond.present_values`),
whatever it holds; the pooled CLIP text belongs to the CLIP text embedding, present iff any of the
sample's CLIP tokens is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ediffi.conditioning import Cond, CondSpec


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network (stored as JSON beside checkpoints)."""

    img_resolution: int = 64  # output resolution (square)
    in_channels: int = 3  # image channels
    model_channels: int = 128  # width at the highest resolution
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # width multiplier per resolution level
    num_blocks: int = 2  # residual blocks per level (encoder side)
    attn_resolutions: tuple[int, ...] = (32, 16, 8)  # resolutions with self- and cross-attention
    head_dim: int = 64  # channels per attention head
    ctx_dim: int = 512  # width of the projected cross-attention sequence
    dropout: float = 0.0  # dropout inside residual blocks
    sr: bool = False  # super-resolution: also conditioned on cond.lowres and cond.aug_sigma
    patch_size: int = 1  # pixels per side folded into channels at the input (1 = none)
    pool_heads: int = 0  # > 0: learned queries attention-pool the conditioning sequence into the embedding vector
    pooled_text: bool = True  # pooled CLIP text in the embedding vector (False: text via cross-attention only)
    pooled_t5: bool = False  # also the standardized mean of the T5 tokens in the embedding vector
    head_channels: int = 0  # > 0 (patched networks): a full-resolution conv head of this width refines the output
    cond: CondSpec = field(default_factory=CondSpec)  # shapes of the conditioning embeddings

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"UNetConfig.patch_size must be >= 1, got {self.patch_size}")
        if self.img_resolution % (self.patch_size * 2 ** (len(self.channel_mult) - 1)):
            raise ValueError(
                f"UNetConfig.img_resolution={self.img_resolution} is not divisible by "
                f"patch_size * 2^(len(channel_mult)-1)={self.patch_size * 2 ** (len(self.channel_mult) - 1)}"
            )
        for name in (
            "img_resolution",
            "in_channels",
            "model_channels",
            "num_blocks",
            "head_dim",
            "ctx_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"UNetConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.head_channels < 0 or (self.head_channels and self.patch_size == 1):
            raise ValueError(
                f"UNetConfig.head_channels must be >= 0 and needs patch_size > 1, got {self.head_channels} "
                f"with patch_size={self.patch_size}"
            )
        if self.pool_heads < 0 or (self.pool_heads and self.ctx_dim % self.pool_heads):
            raise ValueError(
                f"UNetConfig.pool_heads must be >= 0 and divide ctx_dim={self.ctx_dim}, got {self.pool_heads}"
            )
        for m in self.channel_mult:
            if (self.model_channels * m) % self.head_dim:
                raise ValueError(
                    f"UNetConfig: width {self.model_channels * m} must be a multiple of head_dim={self.head_dim}"
                )

    @property
    def base_resolution(self) -> int:
        """Resolution of the first level (after folding patches into channels)."""
        return self.img_resolution // self.patch_size

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @staticmethod
    def from_dict(d: dict) -> UNetConfig:
        """Rebuild from `to_dict` output; unknown keys are an error that names them."""
        known = {f.name for f in fields(UNetConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {unknown}")
        d = dict(d)
        if "cond" in d and isinstance(d["cond"], dict):
            unknown = sorted(set(d["cond"]) - {f.name for f in fields(CondSpec)})
            if unknown:
                raise ValueError(f"unknown UNetConfig.cond keys: {unknown}")
            d["cond"] = CondSpec(**d["cond"])
        for k in ("channel_mult", "attn_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return UNetConfig(**d)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(c: int) -> nn.GroupNorm:
    """Group norm with the largest group count <= 32 that divides c (and >= 4 channels per group)."""
    groups = max(g for g in range(1, 33) if c % g == 0 and (c // g >= 4 or g == 1))
    return nn.GroupNorm(groups, c, eps=1e-6)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (fixed frequencies, saved with the weights)."""

    def __init__(self, channels: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        freqs = torch.randn(channels // 2, generator=g, device="cpu") * scale
        # get_default_device() honours an enclosing `with torch.device(...)` (meta, cuda).
        self.register_buffer("freqs", freqs.to(torch.get_default_device()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.freqs.dtype).outer(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, adaptive scale/shift from the embedding, GN-SiLU-dropout-conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, resample: str = "", dropout: float = 0.0):
        super().__init__()
        self.resample = resample
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.norm1(x)))
        h = self.conv1(h)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        h = self.conv2(self.dropout(h))
        return (self.skip(self._resample(x)) + h) * (0.5**0.5)


class AttnBlock(nn.Module):
    """Self-attention over positions, then cross-attention to the conditioning sequence."""

    def __init__(self, c: int, ctx_dim: int, head_dim: int):
        super().__init__()
        self.heads = c // head_dim
        self.norm_self = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_self = _zero(nn.Conv2d(c, c, 1))
        self.norm_cross = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.kv = nn.Linear(ctx_dim, 2 * c)
        self.proj_cross = _zero(nn.Conv2d(c, c, 1))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, L, C] -> [B, heads, L, C/heads]
        B, L, C = t.shape
        return t.reshape(B, L, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm_self(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
        h = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + self.proj_self(h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W))

        q = self._heads(self.q(self.norm_cross(x)).flatten(2).transpose(1, 2))
        k, v = (self._heads(t) for t in self.kv(ctx).chunk(2, dim=2))
        h = self.cross_attention(q, k, v, ctx_mask[:, None, None, :], (H, W))
        return x + self.proj_cross(h.transpose(1, 2).reshape(B, H * W, C).transpose(1, 2).reshape(B, C, H, W))

    def cross_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        hw: tuple[int, int],
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d), key padding mask) V; a separate method so wrappers can bias it."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class OutputHead(nn.Module):
    """A light full-resolution head for patched networks: 3x3 convs over [the unfolded output; the
    input pixels, after their noise-level gain], modulated by the embedding vector, add a per-pixel
    correction (zero at init). The patch levels see each pixel only as one of patch_size^2 x 3
    channels; the head works on pixel neighbourhoods, where edges are sharpened and leftover noise removed."""

    def __init__(self, c_out: int, c_in: int, width: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_out + c_in, width, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = _zero(nn.Conv2d(width, c_out, 3, padding=1))

    def forward(self, y: torch.Tensor, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.conv1(torch.cat([y, x], dim=1)), scale + 1))
        return self.conv3(F.silu(self.conv2(h)))


class AttnPool(nn.Module):
    """Learned queries (one per head) attend over the conditioning sequence; the heads' outputs,
    projected, join the embedding vector. Zero queries start as the mean over present tokens."""

    def __init__(self, ctx_dim: int, emb_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(heads, ctx_dim // heads))
        self.kv = nn.Linear(ctx_dim, 2 * ctx_dim)
        self.proj = nn.Linear(ctx_dim, emb_dim)

    def forward(self, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = ctx.shape
        k, v = (t.reshape(B, L, self.heads, D // self.heads).transpose(1, 2) for t in self.kv(ctx).chunk(2, dim=2))
        q = self.query[None, :, None].expand(B, -1, -1, -1).to(ctx.dtype)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :])
        return self.proj(h.reshape(B, D))


class UNet(nn.Module):
    """F(c_in x, c_noise, cond) -> raw output; wrap in EDMPrecond to get a denoiser."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C, E, spec = cfg.model_channels, 4 * cfg.model_channels, cfg.cond
        # Embedding vector: noise level + pooled CLIP text + CLIP image (+ SR augmentation level).
        self.noise_fourier = FourierEmbedding(C)
        self.noise_mlp = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        self.pooled_proj = nn.Linear(spec.clip_embed_dim, E) if cfg.pooled_text else None
        self.image_proj = nn.Linear(spec.clip_embed_dim, E)
        if cfg.pooled_t5:
            self.t5_pooled_proj = nn.Linear(spec.t5_dim, E)
            self.register_buffer("t5_mean", torch.zeros(spec.t5_dim))
            self.register_buffer("t5_var", torch.ones(spec.t5_dim))
            self.register_buffer("t5_updates", torch.zeros((), dtype=torch.long))
        if cfg.sr:
            self.aug_fourier = FourierEmbedding(C, seed=1)
            self.aug_mlp = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        # Cross-attention sequence: [null; T5; CLIP text; CLIP image], each projected to ctx_dim.
        D = cfg.ctx_dim
        self.null_token = nn.Parameter(torch.zeros(1, 1, D))
        self.t5_proj = nn.Linear(spec.t5_dim, D)
        self.clip_proj = nn.Linear(spec.clip_dim, D)
        self.image_token_proj = nn.Linear(spec.clip_embed_dim, D)
        self.ctx_norm = nn.LayerNorm(D)
        self.pool = AttnPool(D, E, cfg.pool_heads) if cfg.pool_heads else None

        c_img_in = cfg.in_channels * (2 if cfg.sr else 1) * cfg.patch_size**2
        self.conv_in = nn.Conv2d(c_img_in, C, 3, padding=1)
        # Each stage is [ResBlock] or [ResBlock, AttnBlock]; encoder stages each leave one skip.
        self.enc = nn.ModuleList()
        skips, c = [C], C
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.base_resolution >> level
            if level > 0:
                self.enc.append(nn.ModuleList([ResBlock(c, c, E, "down", cfg.dropout)]))
                skips.append(c)
            for _ in range(cfg.num_blocks):
                self.enc.append(self._stage(c, C * mult, res, "", cfg))
                c = C * mult
                skips.append(c)
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, E, "", cfg.dropout),
                AttnBlock(c, D, cfg.head_dim),
                ResBlock(c, c, E, "", cfg.dropout),
            ]
        )
        # Decoder stages: an upsampling stage per level, then blocks that each take one skip.
        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.base_resolution >> level
            if level < len(cfg.channel_mult) - 1:
                self.dec.append(nn.ModuleList([ResBlock(c, c, E, "up", cfg.dropout)]))
                self.dec_takes_skip.append(False)
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(self._stage(c + skips.pop(), C * mult, res, "", cfg))
                self.dec_takes_skip.append(True)
                c = C * mult
        self.norm_out = _norm(c)
        # With patches, the output conv also sees the folded input pixels: the per-pixel detail that
        # conv_in compresses (patch_size^2 * 3 values into model_channels) stays reachable, so fine
        # noise can still be removed at low noise levels. Their per-channel gain comes from the
        # embedding vector: removing noise of level sigma takes a weight that depends on sigma.
        c_skip_in = c_img_in if cfg.patch_size > 1 else 0
        self.skip_gain = _zero(nn.Linear(E, c_skip_in)) if c_skip_in else None
        self.conv_out = _zero(nn.Conv2d(c + c_skip_in, cfg.in_channels * cfg.patch_size**2, 3, padding=1))
        self.head = (
            OutputHead(cfg.in_channels, c_img_in // cfg.patch_size**2, cfg.head_channels, E)
            if cfg.head_channels
            else None
        )

    @staticmethod
    def _stage(c_in: int, c_out: int, res: int, resample: str, cfg: UNetConfig) -> nn.ModuleList:
        blocks = [ResBlock(c_in, c_out, 4 * cfg.model_channels, resample, cfg.dropout)]
        if res in cfg.attn_resolutions:
            blocks.append(AttnBlock(c_out, cfg.ctx_dim, cfg.head_dim))
        return nn.ModuleList(blocks)

    def context(self, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected cross-attention sequence and its key-padding mask (True = attend); `cond` as
        `forward` passes it, masked-out values zeroed (`Cond.present_values`)."""
        B = len(cond)
        ctx = torch.cat(
            [
                self.null_token.expand(B, -1, -1).to(cond.t5.dtype),
                self.t5_proj(cond.t5),
                self.clip_proj(cond.clip),
                self.image_token_proj(cond.clip_image)[:, None],
            ],
            dim=1,
        )
        ones = torch.ones(B, 1, dtype=torch.bool, device=ctx.device)
        mask = torch.cat([ones, cond.t5_mask, cond.clip_mask, cond.clip_image_mask[:, None]], dim=1)
        return self.ctx_norm(ctx), mask

    def embedding(
        self, c_noise: torch.Tensor, cond: Cond, ctx: torch.Tensor | None = None, ctx_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample embedding vector fed to every residual block (ctx: `context(cond)`, if known;
        `cond` masked-out values zeroed, as `forward` passes it)."""
        emb = self.noise_mlp(self.noise_fourier(c_noise))
        emb = emb + self.image_proj(cond.clip_image)
        if self.cfg.pooled_text:
            emb = emb + self.pooled_proj(cond.clip_pooled)
        if self.cfg.pooled_t5:
            emb = emb + self.t5_pooled_proj(self._pooled_t5(cond))
        if self.pool is not None:
            emb = emb + self.pool(*((ctx, ctx_mask) if ctx is not None else self.context(cond)))
        if self.cfg.sr:
            emb = emb + self.aug_mlp(self.aug_fourier(cond.aug_sigma))
        return F.silu(emb)

    def _pooled_t5(self, cond: Cond) -> torch.Tensor:
        """The mean of each prompt's T5 tokens, standardized per feature by running statistics of the
        training prompts (updated in training mode); zero where the T5 embedding is absent or dropped."""
        m = cond.t5_mask[..., None].to(cond.t5.dtype)
        n = m.sum(1)
        present = (n > 0).to(cond.t5.dtype)
        mean = (cond.t5 * m).sum(1) / n.clamp(min=1)
        if self.training:
            with torch.no_grad():
                k = present.sum()
                mu = (mean * present).sum(0) / k.clamp(min=1)
                var = ((mean - mu).square() * present).sum(0) / k.clamp(min=1)
                counts = (k > 1).long()  # one present row gives no variance: no update
                # the exact average over the first updates, then an exponential one
                rate = (counts / (self.t5_updates + 1).clamp(max=100)).float()
                self.t5_mean.lerp_(mu.float(), rate)
                self.t5_var.lerp_(var.float(), rate)
                self.t5_updates += counts
        return (mean - self.t5_mean) * torch.rsqrt(self.t5_var + 1e-6) * present

    @staticmethod
    def _run(stage: nn.ModuleList, h, emb, ctx, ctx_mask) -> torch.Tensor:
        for block in stage:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h, ctx, ctx_mask)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Raw network output F for scaled input x [B, C, H, W] and c_noise [B]."""
        if self.cfg.sr:
            if cond.lowres is None or cond.aug_sigma is None:
                raise ValueError("super-resolution network needs cond.lowres and cond.aug_sigma")
            lowres = F.interpolate(cond.lowres.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, lowres], dim=1)
        if self.cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, self.cfg.patch_size)
        cond = cond.present_values()  # the masks are authoritative: absent values read as zero, once
        ctx, ctx_mask = self.context(cond)
        emb = self.embedding(c_noise, cond, ctx, ctx_mask)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.enc:
            h = self._run(stage, h, emb, ctx, ctx_mask)
            skips.append(h)
        h = self._run(self.mid, h, emb, ctx, ctx_mask)
        for stage, takes_skip in zip(self.dec, self.dec_takes_skip, strict=True):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(stage, h, emb, ctx, ctx_mask)
        if self.cfg.patch_size == 1:
            return self.conv_out(F.silu(self.norm_out(h)))
        x = x * (1 + self.skip_gain(emb))[:, :, None, None]
        out = F.pixel_shuffle(self.conv_out(torch.cat([F.silu(self.norm_out(h)), x], dim=1)), self.cfg.patch_size)
        if self.head is not None:
            out = out + self.head(out, F.pixel_shuffle(x, self.cfg.patch_size), emb)
        return out
