"""Text and image encoders producing the conditioning schema: T5 (transformers) and CLIP (open_clip).

Real encoders load from a local path or hub id (T5) and an open_clip model name with a pretrained
tag or local checkpoint file (CLIP). The "tiny" encoders are random-init, seeded, and use
tokenizers that ship inside the installed packages (ByT5's byte tokenizer, CLIP's BPE), so tests
and the demo never download anything; the same seed gives the same encoder in every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from ediffi.conditioning import Cond, CondSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"
TINY_T5_DIM = 32


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoders produce the conditioning, and how they run."""

    t5: str = TINY  # "tiny", or a local path / hub id of a T5 encoder (e.g. google/t5-v1_1-xxl)
    t5_len: int = 128  # T5 tokens kept per prompt (longer prompts are truncated and counted)
    clip: str = TINY  # "tiny" (= open_clip config "ediffi-tiny"), or an open_clip model name (e.g. "ViT-L-14")
    clip_pretrained: str | None = None  # open_clip pretrained tag or local checkpoint file
    dtype: str = "float32"  # encoder compute dtype: float32, bfloat16, float16
    seed: int = 0  # init seed of the tiny encoders (must agree between precompute and generation)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EncoderConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.t5_len <= 0:
            raise ValueError(f"EncoderConfig.t5_len must be positive, got {self.t5_len}")


@dataclass
class EncodeStats:
    """What happened to a batch of prompts during encoding."""

    prompts: int = 0
    t5_truncated: int = 0  # prompts longer than t5_len tokens
    clip_truncated: int = 0  # prompts longer than CLIP's context
    truncated_rows: list[bool] = field(default_factory=list)  # per prompt: truncated by either encoder

    def __iadd__(self, other: EncodeStats) -> EncodeStats:
        self.prompts += other.prompts
        self.t5_truncated += other.t5_truncated
        self.clip_truncated += other.clip_truncated
        self.truncated_rows += other.truncated_rows
        return self


def _tiny_t5() -> tuple[nn.Module, object]:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=TINY_T5_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    return T5EncoderModel(cfg), tok


def _real_t5(name_or_path: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = T5EncoderModel.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load T5 encoder {name_or_path!r}: {e}") from None
    return model, tok


# The tiny CLIP is an ordinary open_clip model config shipped with ediffi, so it is built and
# loaded (e.g. clip="ediffi-tiny", clip_pretrained="weights.safetensors") like any real one.
open_clip.add_model_config(Path(__file__).parent / "clip_configs")
TINY_CLIP = "ediffi-tiny"


def _clip(name: str, pretrained: str | None) -> nn.Module:
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise ValueError(f"CLIP checkpoint file {pretrained!r} not found")
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"cannot build CLIP model {name!r} (pretrained={pretrained!r}): {e}") from None


@dataclass
class Tokenizers:
    """Just the two tokenizers (cheap to load) and the sequence shapes: enough to align phrases
    to token positions (paint-with-words) without loading the encoders."""

    t5_tokenizer: object
    clip_tokenizer: object
    spec: CondSpec


def load_tokenizers(cfg: EncoderConfig, spec: CondSpec) -> Tokenizers:
    """The tokenizers of an encoder config, for the network whose conditioning shapes are `spec`."""
    if cfg.t5 == TINY:
        from transformers import ByT5Tokenizer

        t5 = ByT5Tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            t5 = AutoTokenizer.from_pretrained(cfg.t5)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the T5 tokenizer of {cfg.t5!r}: {e}") from None
    return Tokenizers(t5, open_clip.get_tokenizer(TINY_CLIP if cfg.clip == TINY else cfg.clip), spec)


def encoder_spec(cfg: EncoderConfig) -> CondSpec | None:
    """The conditioning shapes the encoders of `cfg` produce, read from their configs without
    building them (None for a CLIP model open_clip knows only by building it, e.g. hf-hub:)."""
    if cfg.t5 == TINY:
        t5_dim = TINY_T5_DIM
    else:
        from transformers import AutoConfig

        try:
            t5_dim = AutoConfig.from_pretrained(cfg.t5).d_model
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot read the config of T5 encoder {cfg.t5!r}: {e}") from None
    clip = open_clip.get_model_config(TINY_CLIP if cfg.clip == TINY else cfg.clip)
    if clip is None:
        return None
    text = clip.get("text_cfg", {})
    return CondSpec(
        t5_len=cfg.t5_len,
        t5_dim=t5_dim,
        clip_len=text.get("context_length", 77),
        clip_dim=text.get("width", 512),
        clip_embed_dim=clip["embed_dim"],
    )


class ConditioningEncoder(nn.Module):
    """Prompts (and optional images) -> Cond, following the schema; models loaded once."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.t5, self.t5_tokenizer = _tiny_t5() if cfg.t5 == TINY else _real_t5(cfg.t5, dtype)
            clip_name = TINY_CLIP if cfg.clip == TINY else cfg.clip
            self.clip = _clip(clip_name, cfg.clip_pretrained)
        self.clip_tokenizer = open_clip.get_tokenizer(clip_name)
        if not hasattr(self.clip_tokenizer, "encode"):
            raise ValueError(f"CLIP model {cfg.clip!r}: only BPE-tokenized CLIP models are supported")
        self.t5.to(dtype).eval().requires_grad_(False)
        self.clip.to(dtype).eval().requires_grad_(False)
        size = getattr(self.clip.visual, "image_size", 224)  # an int (ResNet towers) or a pair (ViTs)
        self.image_size = size if isinstance(size, int) else size[0]
        self.spec = CondSpec(
            t5_len=cfg.t5_len,
            t5_dim=self.t5.config.d_model,
            clip_len=self.clip.context_length,
            clip_dim=self.clip.token_embedding.embedding_dim,
            clip_embed_dim=self.clip.text_projection.shape[-1]
            if isinstance(self.clip.text_projection, torch.Tensor)
            else self.clip.text_projection.out_features,
        )

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    @torch.no_grad()
    def encode_t5(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """T5 token embeddings [B, t5_len, d], mask [B, t5_len], and which prompts were truncated."""
        L = self.cfg.t5_len
        full = self.t5_tokenizer(prompts, add_special_tokens=True)["input_ids"]
        truncated = [len(ids) > L for ids in full]
        enc = self.t5_tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()
        h = self.t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return h.float() * mask[..., None], mask, truncated

    @torch.no_grad()
    def encode_clip_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """CLIP text tokens [B, 77, w], their mask, the pooled text embedding, and which were truncated."""
        L = self.clip.context_length
        truncated = [len(self.clip_tokenizer.encode(p)) + 2 > L for p in prompts]
        ids = self.clip_tokenizer(prompts).to(self.device)
        m = self.clip
        dtype = m.token_embedding.weight.dtype
        x = m.token_embedding(ids).to(dtype) + m.positional_embedding.to(dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        eot = ids.argmax(dim=-1)  # the end-of-text token has the largest id
        pooled = x[torch.arange(len(ids), device=ids.device), eot]
        pooled = m.text_projection(pooled) if isinstance(m.text_projection, nn.Linear) else pooled @ m.text_projection
        mask = torch.arange(L, device=ids.device)[None] <= eot[:, None]
        return x.float() * mask[..., None], mask, pooled.float(), truncated

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [B, e] of images [B, 3, H, W] (uint8, or float in [0, 1])."""
        return self.clip.encode_image(self.clip_pixels(images)).float()

    @torch.no_grad()
    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's input for images [B, 3, H, W] (uint8, or float in [0, 1]): resized, normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(
            x,
            size=(self.image_size, self.image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0, 1)
        mean = torch.tensor(OPENAI_DATASET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, device=x.device).reshape(1, 3, 1, 1)
        return ((x - mean) / std).to(self.clip.token_embedding.weight.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: torch.Tensor | None = None) -> tuple[Cond, EncodeStats]:
        """The full conditioning for prompts; without images the image embedding is absent."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        t5, t5_mask, n_t5 = self.encode_t5(list(prompts))
        clip, clip_mask, pooled, n_clip = self.encode_clip_text(list(prompts))
        B = len(prompts)
        if images is None:
            clip_image = torch.zeros(B, self.spec.clip_embed_dim, device=self.device)
            image_mask = torch.zeros(B, dtype=torch.bool, device=self.device)
        else:
            if len(images) != B:
                raise ValueError(f"got {len(images)} images for {B} prompts")
            clip_image = self.encode_images(images)
            image_mask = torch.ones(B, dtype=torch.bool, device=self.device)
        cond = Cond(
            t5=t5,
            t5_mask=t5_mask,
            clip=clip,
            clip_mask=clip_mask,
            clip_pooled=pooled,
            clip_image=clip_image,
            clip_image_mask=image_mask,
        )
        rows = [a or b for a, b in zip(n_t5, n_clip, strict=True)]
        return cond, EncodeStats(B, sum(n_t5), sum(n_clip), rows)
