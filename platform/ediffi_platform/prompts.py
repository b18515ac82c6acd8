"""Prompt files for batch generation: .txt, .jsonl, .csv and .parquet, each malformed row reported
with its line number.

.txt: one prompt a line. .jsonl: one object a line, {"prompt": ...} plus optional seed, guidance,
steps, images, style (a reference image path) and masks (paint-with-words). .csv / .parquet: a
prompt column plus the same optional columns. Blank lines are ignored; everything else that is
not a valid request is a bad row: skipped and counted, or the job fails, as configured.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from ediffi_platform.storage import StorageConfig, filesystem

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
OPTIONAL = {
    "seed": int,
    "guidance": float,
    "steps": int,
    "images": int,
    "style": str,  # a reference image (path relative to the prompt file, absolute, or s3://)
    "masks": object,  # paint-with-words: {phrase: {"rect": [...]} | {"polygon": [...]} | image path}
    "paint_strength": float,  # paint-with-words w'
}
MAX_IMAGES_PER_ROW = 1024


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


@dataclass
class PromptStats:
    """What reading a prompt file found."""

    rows: int = 0  # non-blank rows
    valid: int = 0
    blank: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def _request(line: int, fields: dict) -> Request:
    """Validate one row's fields; raises ValueError with the reason."""
    prompt = fields.get("prompt")
    if prompt is None and fields.get("style"):
        prompt = ""  # style-only: the reference image alone conditions the row
    if not isinstance(prompt, str) or not (prompt.strip() or fields.get("style")):
        raise ValueError("missing or empty 'prompt' (only rows with a 'style' image may leave it empty)")
    unknown = sorted(set(fields) - {"prompt", *OPTIONAL})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: prompt, {', '.join(OPTIONAL)})")
    out = {}
    for k, tp in OPTIONAL.items():
        v = fields.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
            continue
        if tp is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, str) and v.strip().lstrip("-").isdigit():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{k!r} must be an integer, got {v!r}")
        elif tp is float:
            try:
                v = float(v) if not isinstance(v, bool) else None
            except (TypeError, ValueError):
                v = None
            if v is None or not math.isfinite(v):
                raise ValueError(f"{k!r} must be a number, got {fields.get(k)!r}")
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
        if not prompt.strip():
            raise ValueError("'masks' need a prompt with the painted phrases")
    if out.get("paint_strength", 0.0) < 0:
        raise ValueError(f"'paint_strength' must be >= 0, got {out['paint_strength']}")
    if out.get("seed", 0) < 0:
        raise ValueError(f"'seed' must be >= 0, got {out['seed']}")
    if out.get("guidance", 0.0) < 0:
        raise ValueError(f"'guidance' must be >= 0, got {out['guidance']}")
    if "steps" in out and not 1 <= out["steps"] <= 1000:
        raise ValueError(f"'steps' must be in 1..1000, got {out['steps']}")
    if "images" in out and not 1 <= out["images"] <= MAX_IMAGES_PER_ROW:
        raise ValueError(f"'images' must be in 1..{MAX_IMAGES_PER_ROW}, got {out['images']}")
    return Request(line=line, prompt=prompt.strip(), **out)


def _parquet_rows(path: str, data: bytes, column: str):
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    if column not in table.column_names:
        raise PromptFileError(f"{path}: no {column!r} column (columns: {table.column_names})")
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, {("prompt" if k == column else k): v for k, v in row.items()}


def _csv_rows(path: str, data: bytes, column: str):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if column not in header:
        raise PromptFileError(f"{path}: no {column!r} column in the header (got {header})")
    names = ["prompt" if h == column else h for h in header]
    for cells in reader:
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
            out.append(_request(line, row))
            stats.valid += 1
        except ValueError as e:
            if on_bad_row == "fail":
                raise PromptFileError(f"{path}: line {line}: {e}") from None
            stats.bad.append((line, str(e)))
    return out, stats
