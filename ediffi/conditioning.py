"""The conditioning schema: names, shapes, dtypes and masks of the text/image embeddings.

The embedding writer, the training reader and the generator all import this module, so the
precomputed shards, the network and the sampler agree on one layout:

    t5              [B, t5_len, t5_dim]      T5 token embeddings
    t5_mask         [B, t5_len]   bool       True where a T5 token is present
    clip            [B, clip_len, clip_dim]  CLIP text token embeddings
    clip_mask       [B, clip_len] bool       True where a CLIP token is present
    clip_pooled     [B, clip_embed_dim]      pooled CLIP text embedding (joint text-image space)
    clip_image      [B, clip_embed_dim]      CLIP image embedding (joint text-image space)
    clip_image_mask [B]           bool       True where an image embedding is present

An embedding that is "dropped" (training-time dropout, or absent at sampling time) has its
values zeroed and its mask False; the null condition has every embedding dropped.
Super-resolution stages add `lowres` [B, C, H, W] (the upsampled low-resolution image) and
`aug_sigma` [B] (its noise-augmentation level).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

SCHEMA_VERSION = 1

# The embeddings that can be dropped independently, and the fields each one owns.
EMBEDDINGS: dict[str, tuple[str, ...]] = {
    "t5": ("t5", "t5_mask"),
    "clip_text": ("clip", "clip_mask", "clip_pooled"),
    "clip_image": ("clip_image", "clip_image_mask"),
}
GUIDANCE_MODES: dict[str, tuple[str, ...]] = {
    "text": ("t5", "clip_text"),
    "image": ("clip_image",),
    "all": ("t5", "clip_text", "clip_image"),
}


@dataclass(frozen=True)
class CondSpec:
    """Shapes of the conditioning embeddings (set by the encoders, read by the network)."""

    t5_len: int = 128  # T5 tokens kept per prompt
    t5_dim: int = 4096  # T5 hidden width (T5-XXL: 4096)
    clip_len: int = 77  # CLIP text context length
    clip_dim: int = 768  # CLIP text token width (ViT-L/14: 768)
    clip_embed_dim: int = 768  # CLIP joint embedding width: pooled text and image (ViT-L/14: 768)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"CondSpec.{f.name} must be a positive int, got {v!r}")

    def first_difference(self, expected: CondSpec) -> tuple[str, int, int] | None:
        """(field, this value, expected value) of the first field that differs, or None."""
        for f in fields(self):
            got, want = getattr(self, f.name), getattr(expected, f.name)
            if got != want:
                return f.name, got, want
        return None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every schema field."""
        return {
            "t5": (self.t5_len, self.t5_dim),
            "t5_mask": (self.t5_len,),
            "clip": (self.clip_len, self.clip_dim),
            "clip_mask": (self.clip_len,),
            "clip_pooled": (self.clip_embed_dim,),
            "clip_image": (self.clip_embed_dim,),
            "clip_image_mask": (),
        }


MASK_FIELDS = ("t5_mask", "clip_mask", "clip_image_mask")
EMBEDDING_FIELDS = ("t5", "clip", "clip_pooled", "clip_image")


@dataclass
class Cond:
    """A batch of conditioning tensors following the schema above."""

    t5: torch.Tensor
    t5_mask: torch.Tensor
    clip: torch.Tensor
    clip_mask: torch.Tensor
    clip_pooled: torch.Tensor
    clip_image: torch.Tensor
    clip_image_mask: torch.Tensor
    lowres: torch.Tensor | None = None
    aug_sigma: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.t5.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """All present fields by name."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    def map(self, fn) -> Cond:
        """Apply fn to every present tensor."""
        return Cond(**{k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        """Move to a device; dtype applies to embeddings (masks stay bool)."""
        return Cond(
            **{
                k: v.to(device=device, dtype=None if v.dtype == torch.bool else dtype)
                for k, v in self.tensors().items()
            }
        )

    def __getitem__(self, idx) -> Cond:
        return self.map(lambda v: v[idx])

    def repeat(self, n: int) -> Cond:
        """Concatenate n copies along the batch."""
        return self.map(lambda v: torch.cat([v] * n))

    def drop(self, which: str, keep: torch.Tensor | bool) -> Cond:
        """Drop embedding `which` (see EMBEDDINGS) where keep is False: zero values, mask False."""
        if which not in EMBEDDINGS:
            raise KeyError(f"unknown embedding {which!r}; expected one of {sorted(EMBEDDINGS)}")
        keep_t = torch.as_tensor(keep, device=self.t5.device).to(torch.bool).expand(len(self))
        new = {}
        for name in EMBEDDINGS[which]:
            v = getattr(self, name)
            k = keep_t.reshape(-1, *([1] * (v.ndim - 1)))
            new[name] = (v & k) if v.dtype == torch.bool else v * k.to(v.dtype)
        return replace(self, **new)

    def present_values(self) -> Cond:
        """Every value its mask marks absent set to zero, whatever it held (inf and NaN included);
        the pooled CLIP text belongs to the CLIP text embedding, present iff any of its tokens is."""
        return replace(
            self,
            t5=self.t5.masked_fill(~self.t5_mask[..., None], 0.0),
            clip=self.clip.masked_fill(~self.clip_mask[..., None], 0.0),
            clip_pooled=self.clip_pooled.masked_fill(~self.clip_mask.any(dim=1, keepdim=True), 0.0),
            clip_image=self.clip_image.masked_fill(~self.clip_image_mask[:, None], 0.0),
        )

    def null(self) -> Cond:
        """The null condition used by guidance: every embedding dropped (SR inputs kept)."""
        out = self
        for which in EMBEDDINGS:
            out = out.drop(which, False)
        return out

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate conditions along the batch."""
        names = conds[0].tensors().keys()
        return Cond(**{k: torch.cat([c.tensors()[k] for c in conds]) for k in names})

    def validate(self, spec: CondSpec) -> None:
        """Raise a ValueError naming the field whose shape or dtype disagrees with the spec."""
        B = len(self)
        for name, shape in spec.shapes().items():
            v = getattr(self, name)
            if tuple(v.shape) != (B, *shape):
                raise ValueError(f"cond field {name!r} has shape {tuple(v.shape)}, expected {(B, *shape)}")
            is_mask = name in MASK_FIELDS
            if is_mask != (v.dtype == torch.bool):
                raise ValueError(f"cond field {name!r} has dtype {v.dtype}, expected {'bool' if is_mask else 'float'}")


def empty_cond(spec: CondSpec, batch: int, device: torch.device | str = "cpu") -> Cond:
    """A null condition of the given batch size (all embeddings absent)."""
    z = lambda *s: torch.zeros(batch, *s, device=device)
    f = lambda *s: torch.zeros(batch, *s, dtype=torch.bool, device=device)
    return Cond(
        t5=z(spec.t5_len, spec.t5_dim),
        t5_mask=f(spec.t5_len),
        clip=z(spec.clip_len, spec.clip_dim),
        clip_mask=f(spec.clip_len),
        clip_pooled=z(spec.clip_embed_dim),
        clip_image=z(spec.clip_embed_dim),
        clip_image_mask=f(),
    )


@dataclass(frozen=True)
class DropoutConfig:
    """Per-sample probabilities of dropping embeddings during training: each one independently
    (so any subset conditions at sampling time), and all of them together (the null condition that
    classifier-free guidance subtracts; independent drops alone reach it on t5 * clip_text *
    clip_image of the samples, 0.1 % at 0.1 each)."""

    t5: float = 0.1  # probability of dropping the T5 embeddings
    clip_text: float = 0.1  # probability of dropping the CLIP text tokens + pooled embedding
    clip_image: float = 0.1  # probability of dropping the CLIP image embedding
    joint: float = 0.1  # probability of dropping every embedding together (guidance's null condition)

    def __post_init__(self) -> None:
        for f in fields(self):
            p = getattr(self, f.name)
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise ValueError(f"DropoutConfig.{f.name} must be in [0, 1], got {p!r}")

    def null_rate(self) -> float:
        """The share of training samples that see the null condition."""
        return self.joint + (1 - self.joint) * self.t5 * self.clip_text * self.clip_image


def drop_embeddings(cond: Cond, p: DropoutConfig, generator: torch.Generator | None = None) -> Cond:
    """Drop each embedding of each sample independently with its probability, then every embedding
    of a sample together with probability `p.joint`."""
    gen_device = torch.device("cpu") if generator is None else generator.device
    u = torch.rand(len(EMBEDDINGS) + 1, len(cond), generator=generator, device=gen_device).to(cond.t5.device)
    keep_all = u[-1] >= p.joint
    for i, which in enumerate(EMBEDDINGS):
        cond = cond.drop(which, (u[i] >= getattr(p, which)) & keep_all)
    return cond


# --- conversion to and from stored rows (numpy), used by the embedding writer and reader ------


def cond_to_numpy(cond: Cond, dtype: str = "float16") -> dict[str, np.ndarray]:
    """Schema fields as numpy arrays; embeddings stored in `dtype` (float16 or float32)."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"embedding storage dtype must be 'float16' or 'float32', got {dtype!r}")
    out = {}
    for name in (*EMBEDDING_FIELDS, *MASK_FIELDS):
        v = getattr(cond, name).detach().cpu()
        out[name] = v.numpy() if v.dtype == torch.bool else v.float().numpy().astype(dtype)
    return out


def cond_from_numpy(arrays: dict[str, np.ndarray], spec: CondSpec) -> Cond:
    """Rebuild a float32 Cond from stored arrays; raises naming the first missing or wrong field."""
    missing = [n for n in (*EMBEDDING_FIELDS, *MASK_FIELDS) if n not in arrays]
    if missing:
        raise ValueError(f"stored conditioning lacks fields {missing}; schema version {SCHEMA_VERSION}")
    t = {}
    for name in (*EMBEDDING_FIELDS, *MASK_FIELDS):
        a = np.asarray(arrays[name])
        t[name] = torch.from_numpy(a.astype(bool) if name in MASK_FIELDS else a.astype(np.float32))
    cond = Cond(**t)
    cond.validate(spec)
    return cond
