"""Prompt files for batch generation: .txt, .jsonl, .csv and .parquet, each malformed row reported
with its line number and field.

.txt: one prompt a line. .jsonl: one object a line, {"prompt": ...} plus optional id, seed,
guidance, steps, images, style (a reference image path) and masks (paint-with-words). .csv /
.parquet: a prompt column plus the same optional columns. Blank lines are ignored; everything else
that is not a valid request is a bad row: skipped and counted, or the job fails, as configured.

Numbers are checked when the file is read: finite (NaN and infinities are named), in RANGES. A
row's `id` is the user's name for it: kept in the metadata, never a path (images are named by
their content hash); an empty id is no id. Any other field is an error that suggests the nearest
known name (a typo like `guidence` must not be silently ignored); in .csv / .parquet files an
unknown column fails the whole file. Prompts and mask phrases go through `text.clean_text`, and
the rows it changed are counted; a UTF-8 byte-order mark at the start of a file is dropped.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field

from ediffi_platform.storage import StorageConfig, filesystem
from ediffi_platform.text import clean_text, has_controls, was_cleaned

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
OPTIONAL = {
    "id": str,  # the user's name for the row (a string or an integer): a metadata column, never a path
    "seed": int,
    "guidance": float,
    "steps": int,
    "images": int,
    "style": str,  # a reference image (path relative to the prompt file, absolute, or s3://)
    "masks": object,  # paint-with-words: {phrase: {"rect": [...]} | {"polygon": [...]} | image path}
    "paint_strength": float,  # paint-with-words w'
}
KNOWN = ("prompt", *OPTIONAL)
MAX_IMAGES_PER_ROW = 1024
SEED_MAX = 2**63 - MAX_IMAGES_PER_ROW  # image k of a row uses seed + k: all stay in int64 (Parquet)
RANGES = {  # per-row numbers, inclusive
    "seed": (0, SEED_MAX),
    "guidance": (0, 100),
    "steps": (1, 1000),
    "images": (1, MAX_IMAGES_PER_ROW),
    "paint_strength": (0, 100),
}


class PromptFileError(ValueError):
    """A prompt file cannot be read at all, or a row is malformed and the job is set to fail on it."""


@dataclass(frozen=True)
class Request:
    """One valid row: a prompt and its optional per-row settings."""

    line: int  # 1-based line (row) number in the file
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    images: int | None = None
    style: str | None = None
    masks: dict | None = None  # paint-with-words: phrase -> mask spec
    paint_strength: float | None = None
    id: str | None = None  # the user's id of the row (None: none, or empty)


@dataclass
class PromptStats:
    """What reading a prompt file found."""

    rows: int = 0  # non-blank rows
    valid: int = 0
    blank: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    normalized: int = 0  # valid rows whose prompt text.clean_text changed
    duplicate_ids: int = 0  # ids that more than one valid row carries


def unknown_field(name: str, what: str = "field") -> str:
    """The error for a field no request has, naming the nearest known one when there is one."""
    near = difflib.get_close_matches(name, KNOWN, n=1, cutoff=0.7)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown {what} {name!r}{hint}; known: {', '.join(KNOWN)}"


def _number(name: str, v, integer: bool, lo=None, hi=None, text: bool = True) -> int | float:
    """A finite number (an integer when asked) from JSON, Parquet or (text=True) CSV text, in [lo, hi]."""
    kind = "an integer" if integer else "a number"
    if isinstance(v, str) and text:  # CSV cells
        try:
            v = int(v.strip())
        except ValueError:
            try:
                v = float(v.strip())
            except ValueError:
                raise ValueError(f"{name} must be {kind}, got {v.strip()!r}") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{name} must be {kind}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{name} is {'NaN' if math.isnan(v) else 'infinite'} (it must be a finite number)")
    if integer and isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"{name} must be an integer, got {v!r}")
        v = int(v)
    if lo is not None and not lo <= v <= hi:  # compared before any float(): ints of any size
        got = str(v) if len(str(v)) <= 24 else f"{str(v)[:12]}... ({len(str(v))} digits)"
        raise ValueError(f"{name} must be in {lo}..{hi}, got {got}")
    return v if integer else float(v)


def _check_masks(masks: dict) -> dict:
    """Mask phrases cleaned, rect / polygon coordinates finite numbers, the shapes as `rasterize` draws them."""
    from ediffi.paint import rasterize

    out = {}
    for phrase, spec in masks.items():
        where = f"'masks' {phrase!r}"
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("rect", "polygon"):
            kind, pts = next(iter(spec.items()))
            pairs = kind == "polygon"
            if not isinstance(pts, list) or (pairs and not all(isinstance(p, list) and len(p) == 2 for p in pts)):
                raise ValueError(f"{where}: {kind} must be {'[[x, y], ...]' if pairs else '[x0, y0, x1, y1]'}")
            for i, p in enumerate(pts):
                for j, c in enumerate(p if pairs else [p]):
                    _number(f"{where}: {kind}[{i}]" + (f"[{j}]" if pairs else ""), c, False, text=False)
            try:
                rasterize(spec, 8)
            except ValueError as e:
                raise ValueError(f"{where}: {str(e).removeprefix('paint-with-words: ')}") from None
        elif not (isinstance(spec, str) and spec.strip()):
            raise ValueError(
                f'{where}: a mask is {{"rect": [x0, y0, x1, y1]}}, {{"polygon": [[x, y], ...]}} or an image path'
            )
        out[clean_text(phrase)] = spec
    if len(out) != len(masks) or "" in out:
        raise ValueError("'masks': phrases must be distinct and non-empty (after text normalisation)")
    return out


def _id(v) -> str | None:
    """The user's id as text: strings as given (minus surrounding spaces), integers in decimal."""
    if isinstance(v, float) and v.is_integer():  # an integer column with gaps, read back as floats
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(f"'id' must be a string or an integer, got {v!r}")
    v = str(v).strip()
    if has_controls(v):  # ids are looked up as written: refused rather than cleaned
        raise ValueError(f"'id' holds control, line-break or bidi-override characters: {v!r}")
    return v or None


def _request(line: int, fields: dict) -> Request:
    """Validate one row's fields; raises ValueError with the reason."""
    unknown = sorted(set(fields) - set(KNOWN))
    if unknown:
        raise ValueError(unknown_field(unknown[0]))
    raw = fields.get("prompt")
    if raw is None and fields.get("style"):
        raw = ""  # style-only: the reference image alone conditions the row
    if not isinstance(raw, str):
        raise ValueError("missing 'prompt' (only rows with a 'style' image may leave it out)")
    prompt = clean_text(raw)
    if not (prompt or fields.get("style")):
        what = "empty after removing control characters" if raw.strip() else "empty"
        raise ValueError(f"'prompt' is {what} (only rows with a 'style' image may leave it empty)")
    out = {}
    for k, tp in OPTIONAL.items():
        v = fields.get(k)
        if v is None or v == "":
            continue
        if k in RANGES:
            v = _number(repr(k), v, tp is int, *RANGES[k])
        elif k == "id":
            v = _id(v)
        elif tp is str and not isinstance(v, str):
            raise ValueError(f"{k!r} must be a string, got {v!r}")
        out[k] = v
    if "masks" in out:
        if isinstance(out["masks"], str):  # CSV / Parquet cells hold JSON text
            try:
                out["masks"] = json.loads(out["masks"])
            except json.JSONDecodeError as e:
                raise ValueError(f"'masks' is not valid JSON ({e.msg})") from None
        if not isinstance(out["masks"], dict) or not out["masks"]:
            raise ValueError('\'masks\' must map phrases to masks, e.g. {"red circle": {"rect": [0, 0, 0.5, 0.5]}}')
        if not prompt:
            raise ValueError("'masks' need a prompt with the painted phrases")
        out["masks"] = _check_masks(out["masks"])
    return Request(line=line, prompt=prompt, **out)


def _columns(path: str, names: list[str], column: str) -> list[str]:
    """A .csv / .parquet header as request fields: the prompt column found, no unknown or repeated name."""
    if column not in names:
        raise PromptFileError(f"{path}: no {column!r} column (columns: {names})")
    fields = ["prompt" if n == column else n for n in names]
    for n in fields:
        if n not in KNOWN:
            raise PromptFileError(f"{path}: {unknown_field(n, 'column')} (keep other data apart, joined on 'id')")
        if fields.count(n) > 1:
            raise PromptFileError(f"{path}: column {n!r} appears {fields.count(n)} times")
    return fields


def _parquet_rows(path: str, data: bytes, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowException) as e:
        raise PromptFileError(f"{path}: not a readable Parquet file ({e})") from None
    names = _columns(path, table.column_names, column)
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, dict(zip(names, row.values(), strict=True))


def _csv_rows(path: str, data: bytes, column: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text))
    names = _columns(path, [h.strip() for h in next(reader, [])], column)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a cell over csv.field_size_limit(): this row only
            yield reader.line_num, ValueError(f"unreadable CSV ({e})")
            continue
        line = reader.line_num
        if not any(c.strip() for c in cells):
            yield line, None
        elif len(cells) != len(names):
            yield line, ValueError(f"{len(cells)} cells, the header has {len(names)}")
        else:
            yield line, dict(zip(names, cells, strict=True))


def _line_rows(data: bytes, jsonl: bool):
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            yield i, ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not text:
            yield i, None
        elif not jsonl:
            yield i, {"prompt": text}
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield i, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            yield i, obj if isinstance(obj, dict) else ValueError(f"expected a JSON object, got {type(obj).__name__}")


def _rows(path: str, ext: str, data: bytes, column: str):
    """(line, fields, or the exception saying why the row is bad) for every row; blank rows give None."""
    if ext == ".parquet":
        return _parquet_rows(path, data, column)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise PromptFileError(f"{path}: UTF-16 text (its byte-order mark says so); save it as UTF-8")
    data = data.removeprefix(codecs.BOM_UTF8)  # an editor's mark, not part of the first row
    if ext == ".csv":
        return _csv_rows(path, data, column)
    return _line_rows(data, jsonl=ext == ".jsonl")


def read_prompts(
    path: str,
    storage: StorageConfig = StorageConfig(),
    column: str = "prompt",
    on_bad_row: str = "skip",
) -> tuple[list[Request], PromptStats]:
    """Every valid request in a prompt file (local or s3://) and what was found; with on_bad_row=
    'fail' the first bad row raises PromptFileError naming file and line."""
    ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    if ext not in FORMATS:
        raise PromptFileError(f"{path}: prompt files must end in one of {', '.join(FORMATS)}")
    fs, p = filesystem(path, storage)
    if not fs.exists(p):
        raise FileNotFoundError(f"{path}: prompt file not found")
    with fs.open(p, "rb") as f:
        data = f.read()
    stats, out = PromptStats(), []
    for line, row in _rows(path, ext, data, column):
        if row is None:
            stats.blank += 1
            continue
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            r = _request(line, row)
        except ValueError as e:
            if on_bad_row == "fail":
                raise PromptFileError(f"{path}: line {line}: {e}") from None
            stats.bad.append((line, str(e)))
            continue
        out.append(r)
        stats.valid += 1
        stats.normalized += isinstance(row.get("prompt"), str) and was_cleaned(row["prompt"], r.prompt)
    stats.duplicate_ids = sum(n > 1 for n in Counter(r.id for r in out if r.id).values())
    return out, stats


def require_prompts(path: str, requests: list[Request], stats: PromptStats) -> None:
    """Raise PromptFileError when nothing is left to generate, with what was wrong (the first reasons)."""
    if requests:
        return
    if not stats.rows:
        raise PromptFileError(f"{path}: no prompts (the file is empty or blank)")
    first = "; ".join(f"line {n}: {reason}" for n, reason in stats.bad[:3])
    more = f"; and {len(stats.bad) - 3} more" if len(stats.bad) > 3 else ""
    raise PromptFileError(f"{path}: no valid prompts: all {stats.rows} rows are bad ({first}{more})")
