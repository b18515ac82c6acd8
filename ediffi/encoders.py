"""Text and image encoders producing the conditioning schema: T5 (transformers) and CLIP (open_clip).

Real encoders load from a local path or hub id (T5) and an open_clip model name with a pretrained
tag or local checkpoint file (CLIP). The "tiny" encoders are random-init, seeded, and use
tokenizers that ship inside the installed packages (ByT5's byte tokenizer, CLIP's BPE), so tests
and the demo never download anything; the same seed gives the same encoder in every process.
"""

from __future__ import annotations

import functools
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
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


def write_t5_v11(
    folder, texts: list[str], d_model: int = 64, layers: int = 2, heads: int = 4, d_kv: int = 16, seed: int = 0
) -> Path:
    """A T5 v1.1-style encoder (gated-GELU feed-forward, random init) of width `d_model` (v1.1-small:
    d_model 512, layers 8, heads 6, d_kv 64), with a
    Unigram tokenizer (T5's own kind, a sentencepiece Unigram) trained on `texts`, saved to `folder`
    as `save_pretrained` writes them: the layout of a downloaded google/t5-v1_1-* or Flan-T5 folder,
    for trying the real-encoder path (`encoders.t5=FOLDER`) with no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=256, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    cfg = T5Config(
        vocab_size=fast.vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",  # v1.1 / Flan; the original T5 is "relu"
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(cfg).save_pretrained(folder)
    return Path(folder)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection; False in offline mode."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub(load, name_or_path: str, what: str, **kw):
    """`load(name_or_path)` (a transformers `from_pretrained`) of a local folder or a hub id. A hub
    id is read from the local cache when the hub cannot be reached, so a machine without network
    fails at once, with what to do, instead of after the hub client's retries."""
    local = Path(name_or_path).expanduser().is_dir()
    if not local and (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1):
        raise ValueError(f"cannot load {what} {name_or_path!r}: no such folder (a hub id is ORG/NAME)")
    offline = not local and not hub_reachable()
    try:
        return load(name_or_path, local_files_only=offline, **kw)
    except (OSError, ValueError) as e:
        if offline:
            raise ValueError(
                f"cannot load {what} {name_or_path!r}: it is not a local folder, the Hugging Face hub cannot be "
                f"reached from here and it is not in the local cache; download it where the hub is reachable "
                f"(e.g. `hf download {name_or_path} --local-dir DIR`) and pass the folder's path"
            ) from None
        raise ValueError(f"cannot load {what} {name_or_path!r}: {e}") from None


def _real_t5(name_or_path: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
    from transformers import AutoTokenizer, T5EncoderModel

    tok = from_hub(AutoTokenizer.from_pretrained, name_or_path, "the T5 tokenizer of")
    model = from_hub(T5EncoderModel.from_pretrained, name_or_path, "T5 encoder", dtype=dtype)
    return model, tok


@functools.cache
def _open_clip():
    """open_clip, imported on first use (seconds of imports a training worker never needs). The tiny
    CLIP is an ordinary open_clip model config shipped with ediffi, registered here, so it is built
    and loaded (e.g. clip="ediffi-tiny", clip_pretrained="weights.safetensors") like any real one."""
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "clip_configs")
    return open_clip


TINY_CLIP = "ediffi-tiny"


def _clip(name: str, pretrained: str | None) -> nn.Module:
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise ValueError(f"CLIP checkpoint file {pretrained!r} not found")
    try:
        return _open_clip().create_model(name, pretrained=pretrained)
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

        t5 = from_hub(AutoTokenizer.from_pretrained, cfg.t5, "the T5 tokenizer of")
    return Tokenizers(t5, _open_clip().get_tokenizer(TINY_CLIP if cfg.clip == TINY else cfg.clip), spec)


def clip_image_size(cfg: EncoderConfig) -> int:
    """The side of the CLIP model's input images, from its open_clip config without building it
    (224, open_clip's default, for a model it knows only by building it)."""
    clip = _open_clip().get_model_config(TINY_CLIP if cfg.clip == TINY else cfg.clip)
    size = (clip or {}).get("vision_cfg", {}).get("image_size", 224)
    return size if isinstance(size, int) else size[0]


def encoder_spec(cfg: EncoderConfig) -> CondSpec | None:
    """The conditioning shapes the encoders of `cfg` produce, read from their configs without
    building them (None for a CLIP model open_clip knows only by building it, e.g. hf-hub:)."""
    if cfg.t5 == TINY:
        t5_dim = TINY_T5_DIM
    else:
        from transformers import AutoConfig

        t5_dim = getattr(from_hub(AutoConfig.from_pretrained, cfg.t5, "the config of T5 encoder"), "d_model", None)
        if t5_dim is None:
            raise ValueError(f"T5 encoder {cfg.t5!r}: its config has no d_model (not a T5 model?)")
    clip = _open_clip().get_model_config(TINY_CLIP if cfg.clip == TINY else cfg.clip)
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
        self.clip_tokenizer = _open_clip().get_tokenizer(clip_name)
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
        mean = torch.tensor(_open_clip().OPENAI_DATASET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(_open_clip().OPENAI_DATASET_STD, device=x.device).reshape(1, 3, 1, 1)
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
