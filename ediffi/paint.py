"""Paint-with-words (training-free): bias cross-attention so chosen phrases land in painted regions.

In every cross-attention layer the logits become (Q K^T + w A) / sqrt(d), with
w = w' * log(1 + sigma) * max(Q K^T) (the largest logit magnitude, so the bias always adds) and A[i, j] = 1 where image position i lies in the mask of
the phrase that context token j belongs to (masks resized to each attention resolution). Rows
whose text embeddings are absent (guidance's unconditional half) get no bias. `PaintWithWords` is
a denoiser wrapper with the usual contract; with w' = 0 it calls the plain denoiser.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ediffi.conditioning import Cond
from ediffi.edm import Denoiser, EDMPrecond
from ediffi.ensemble import ExpertEnsemble
from ediffi.unet import AttnBlock

_WORD = re.compile(r"\S+")
_EDGE_PUNCT = ".,;:!?\"'()[]{}"


def _norm_word(w: str) -> str:
    return w.strip(_EDGE_PUNCT).lower()


def phrase_char_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of `phrase` as whole words of `prompt` (case and edge
    punctuation ignored). Raises ValueError when it does not occur."""
    words = [(m.start(), m.end(), _norm_word(m.group())) for m in _WORD.finditer(prompt)]
    target = [_norm_word(w) for w in phrase.split()]
    if not target or not all(target):
        raise ValueError(f"paint-with-words: empty phrase {phrase!r}")
    spans = []
    for i in range(len(words) - len(target) + 1):
        if [w for _, _, w in words[i : i + len(target)]] == target:
            start, end = words[i][0], words[i + len(target) - 1][1]
            # trim edge punctuation so "circle," paints the word, not the comma
            while end > start and prompt[end - 1] in _EDGE_PUNCT:
                end -= 1
            while start < end and prompt[start] in _EDGE_PUNCT:
                start += 1
            spans.append((start, end))
    if not spans:
        raise ValueError(f"paint-with-words: phrase {phrase!r} not found in prompt {prompt!r}")
    return spans


def _count_tokens(tokenizer, text: str) -> int:
    """Number of tokens `text` becomes, without special tokens (HF tokenizers or open_clip BPE)."""
    if not text:
        return 0
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "bpe"):  # open_clip SimpleTokenizer
        return len(tokenizer.encode(text))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_positions(tokenizer, prompt: str, span: tuple[int, int], offset: int, length: int) -> list[int]:
    """Sequence positions of the tokens covering prompt[span] for one tokenizer: `offset` tokens
    precede the prompt's first token (CLIP's start token), `length` is the sequence length (later
    positions were truncated away)."""
    start, end = span
    if type(tokenizer).__name__.startswith("ByT5"):  # bytes: exact offsets
        a = len(prompt[:start].encode("utf-8"))
        b = len(prompt[:end].encode("utf-8"))
    else:  # word-level BPE / sentencepiece: a prefix ending at a word boundary tokenizes alike
        a = _count_tokens(tokenizer, prompt[:start].rstrip())
        b = _count_tokens(tokenizer, prompt[:end])
    return [offset + t for t in range(a, b) if offset + t < length]


@dataclass(frozen=True)
class Layout:
    """Where each embedding's tokens sit in the network's cross-attention sequence."""

    t5_start: int  # first T5 token's position
    t5_len: int
    clip_start: int  # CLIP's start-of-text token's position
    clip_len: int
    total: int  # sequence length

    @staticmethod
    def for_spec(spec) -> Layout:
        """The U-Net's sequence: [null; T5 (t5_len); CLIP text (clip_len); CLIP image]."""
        return Layout(1, spec.t5_len, 1 + spec.t5_len, spec.clip_len, 1 + spec.t5_len + spec.clip_len + 1)


def phrase_tokens(encoder, prompt: str, phrase: str, layout: Layout | None = None) -> list[int]:
    """Context positions (T5 and CLIP text) of every token of `phrase` in `prompt`, for an
    ediffi.encoders.ConditioningEncoder. Raises when the phrase is missing or entirely truncated."""
    layout = layout or Layout.for_spec(encoder.spec)
    out: list[int] = []
    for span in phrase_char_spans(prompt, phrase):
        t5 = token_positions(encoder.t5_tokenizer, prompt, span, 0, layout.t5_len)
        clip = token_positions(encoder.clip_tokenizer, prompt, span, 1, layout.clip_len)
        out += [layout.t5_start + t for t in t5] + [layout.clip_start + t for t in clip]
    if not out:
        raise ValueError(f"paint-with-words: phrase {phrase!r} lies beyond the encoders' context (truncated)")
    return sorted(set(out))


# --- masks ----------------------------------------------------------------------------------------


def rasterize(spec, size: int) -> torch.Tensor:
    """A float {0, 1} mask [size, size] from a mask spec: {"rect": [x0, y0, x1, y1]},
    {"polygon": [[x, y], ...]} (coordinates in [0, 1] of width / height), an image file path (white
    = painted), or an array / tensor [H, W]."""
    from PIL import Image, ImageDraw

    if isinstance(spec, torch.Tensor) or hasattr(spec, "__array__"):
        m = torch.as_tensor(spec, dtype=torch.float32)
        if m.ndim != 2:
            raise ValueError(f"paint-with-words: mask arrays must be [H, W], got shape {tuple(m.shape)}")
        return (F.interpolate(m[None, None], size=(size, size), mode="area")[0, 0] > 0.5).float()
    if isinstance(spec, str):
        try:
            img = Image.open(spec).convert("L").resize((size, size), Image.BILINEAR)
        except (OSError, ValueError) as e:
            raise ValueError(f"paint-with-words: cannot read mask image {spec!r} ({e})") from None
        return (torch.from_numpy(np.asarray(img, dtype=np.float32)) > 127).float()
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("rect", "polygon"):
        raise ValueError(
            f"paint-with-words: a mask is {{'rect': [x0, y0, x1, y1]}}, {{'polygon': [[x, y], ...]}} "
            f"or an image path, got {spec!r}"
        )
    kind, pts = next(iter(spec.items()))
    try:
        pts = [float(v) for v in pts] if kind == "rect" else [(float(x), float(y)) for x, y in pts]
    except (TypeError, ValueError):
        raise ValueError(f"paint-with-words: malformed {kind} {pts!r}") from None
    if kind == "rect":
        if len(pts) != 4 or not (pts[0] < pts[2] and pts[1] < pts[3]):
            raise ValueError(f"paint-with-words: rect must be [x0, y0, x1, y1] with x0 < x1, y0 < y1, got {pts}")
        pts = [(pts[0], pts[1]), (pts[2], pts[1]), (pts[2], pts[3]), (pts[0], pts[3])]
    if len(pts) < 3 or any(not (0.0 <= c <= 1.0) for p in pts for c in p):
        raise ValueError(f"paint-with-words: {kind} needs >= 3 points inside [0, 1], got {pts}")
    hi = 4 * size  # draw at 4x and average down: area-weighted coverage
    img = Image.new("L", (hi, hi), 0)
    ImageDraw.Draw(img).polygon([(x * hi, y * hi) for x, y in pts], fill=255)
    m = torch.from_numpy(np.asarray(img, dtype=np.float32))[None, None] / 255.0
    return (F.avg_pool2d(m, 4)[0, 0] >= 0.5).float()


def token_masks(encoder, prompt: str, masks: dict, resolution: int, layout: Layout | None = None) -> torch.Tensor:
    """A [L, R, R] map: for each context position, the mask its phrase is painted with (0 elsewhere).
    `masks` maps phrase -> mask spec (see `rasterize`)."""
    layout = layout or Layout.for_spec(encoder.spec)
    out = torch.zeros(layout.total, resolution, resolution)
    if not isinstance(masks, dict):
        raise ValueError(f"paint-with-words: masks must map phrase -> mask, got {type(masks).__name__}")
    for phrase, spec in masks.items():
        m = rasterize(spec, resolution)
        for j in phrase_tokens(encoder, prompt, phrase, layout):
            out[j] = torch.maximum(out[j], m)
    return out


# --- the denoiser wrapper -----------------------------------------------------------------------


class PaintWithWords:
    """D with cross-attention biased toward painted regions (see the module docstring).

    token_masks: [B, L, H, W] from `token_masks` (stacked per prompt), at any resolution; the batch
    may repeat the B prompts (guidance's halves). Around an ExpertEnsemble each expert is painted with
    the masks and scales of the samples routed to it, so one batch may span experts.
    strength: w'. record: if a list, each biased layer call appends the fraction of the painted
    tokens' attention that falls inside their masks (for measurements; forces the explicit path).
    """

    def __init__(
        self, denoiser: EDMPrecond | ExpertEnsemble, masks: torch.Tensor, strength: float, record: list | None = None
    ):
        if masks.ndim != 4:
            raise ValueError(f"paint-with-words: token masks must be [B, L, H, W], got {tuple(masks.shape)}")
        if strength < 0 or not math.isfinite(strength):
            raise ValueError(f"paint-with-words: strength must be >= 0, got {strength}")
        self.denoiser, self.masks, self.strength, self.record = denoiser, masks.float(), float(strength), record

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.strength == 0.0 and self.record is None:
            return self.denoiser(x, sigma, cond)
        B = x.shape[0]
        if B % self.masks.shape[0]:
            raise ValueError(f"paint-with-words: batch {B} is not a multiple of {self.masks.shape[0]} mask sets")
        # Per-sample state (A and w / max(Q K^T)), sliced with whatever sub-batch a network gets.
        masks = self.masks.to(x.device).repeat(B // self.masks.shape[0], 1, 1, 1)
        has_text = (cond.t5_mask.any(dim=1) | cond.clip_mask.any(dim=1)).to(x.device)
        w_scale = self.strength * torch.log1p(sigma.to(x.device).float()) * has_text.float()  # [B]

        def painted(net: Denoiser, idx: torch.Tensor | None) -> Denoiser:
            sub = slice(None) if idx is None else idx
            return self._painted(net, masks[sub], w_scale[sub])

        if isinstance(self.denoiser, ExpertEnsemble):  # each expert paints the samples routed to it
            return self.denoiser.route(x, sigma, cond, painted)
        return painted(self.denoiser, None)(x, sigma, cond)

    def _painted(self, net: Denoiser, masks: torch.Tensor, w_scale: torch.Tensor) -> Denoiser:
        """net with its cross-attention biased by these samples' masks [b, L, H, W] and scales [b]."""
        blocks = [m for m in net.modules() if isinstance(m, AttnBlock)]

        def run(x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
            with self._patched(blocks, masks, w_scale):
                return net(x, sigma, cond)

        return run

    @contextlib.contextmanager
    def _patched(self, blocks: list[AttnBlock], masks: torch.Tensor, w_scale: torch.Tensor):
        for block in blocks:
            block.cross_attention = self._biased(masks, w_scale)  # instance attribute shadows the method
        try:
            yield
        finally:
            for block in blocks:
                del block.cross_attention

    def _biased(self, masks: torch.Tensor, w_scale: torch.Tensor):
        record = self.record

        def attend(q, k, v, key_mask, hw):
            B, d = q.shape[0], q.shape[-1]
            A = F.interpolate(masks, size=hw, mode="area").flatten(2).transpose(1, 2)  # [B, HW, L]
            A = (A >= 0.5).to(q.dtype)[:, None]  # [B, 1, HW, L]
            qk = q @ k.transpose(-1, -2)  # [B, heads, HW, L]
            qk_max = qk.abs().masked_fill(~key_mask, 0.0).amax(dim=(-1, -2), keepdim=True)  # logit scale
            w = w_scale.to(q.dtype).view(B, 1, 1, 1) * qk_max
            logits = ((qk + w * A) / math.sqrt(d)).masked_fill(~key_mask, -math.inf)
            p = logits.softmax(dim=-1)
            if record is not None:
                painted = A.amax(dim=2, keepdim=True)  # [B, 1, 1, L]: tokens with a mask
                inside = (p * A).sum(dim=2)  # [B, heads, L]: attention each token gets inside its mask
                total = p.sum(dim=2)
                sel = painted[:, :, 0].expand_as(total) > 0
                if sel.any():
                    record.append((inside[sel].sum() / total[sel].sum()).item())
            return p @ v

        return attend


def paint_masks(encoder, prompts: Sequence[str], masks: Sequence[dict], resolution: int) -> torch.Tensor:
    """[B, L, R, R] token masks for a batch of prompts, each with its phrase -> mask dict."""
    if len(prompts) != len(masks):
        raise ValueError(f"paint-with-words: {len(prompts)} prompts but {len(masks)} mask sets")
    return torch.stack([token_masks(encoder, p, m or {}, resolution) for p, m in zip(prompts, masks, strict=True)])
