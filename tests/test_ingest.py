"""Decoding and filtering of image bytes, and input schema checks (no Ray needed)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ediffi_platform.ingest import ImageFilter, InputConfig, check_schema, decode_batch, decode_image, list_shards

F = ImageFilter(resolution=32, min_size=16, max_aspect=2.0)


def img_bytes(w=64, h=48, fmt="JPEG", mode="RGB", color=(200, 30, 30, 255)):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color[: len(mode)]).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decodes_resizes_and_center_crops(fmt):
    out, why = decode_image(img_bytes(fmt=fmt), F)
    assert why is None and out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[..., 0].mean()) - 200) < 6


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (96, 48), (0, 0, 255))
    img.paste((255, 0, 0), (24, 0, 72, 48))  # red middle half
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out, _ = decode_image(buf.getvalue(), F)
    assert out[..., 0].mean() > 240 and out[..., 2].mean() < 15


def test_transparent_png_is_composited_on_white():
    out, _ = decode_image(img_bytes(fmt="PNG", mode="RGBA", color=(0, 0, 0, 0)), F)
    assert out.min() == 255


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # mode I;16
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format=fmt)
    out, why = decode_image(buf.getvalue(), ImageFilter(resolution=64))
    assert why is None and out.shape == (64, 64, 3)
    expect = ramp / 257.0
    assert np.abs(out[..., 0] - expect).max() < 3 and (out[..., 0] == out[..., 2]).all()


def test_float_image_in_unit_range_is_scaled():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(buf, format="TIFF")  # mode F
    out, _ = decode_image(buf.getvalue(), F)
    assert abs(int(out.mean()) - 128) <= 1


def test_exif_orientation_is_applied_before_cropping():
    img = Image.new("RGB", (64, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 40))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out, why = decode_image(buf.getvalue(), F)
    assert why is None
    top, bottom = out[:12].astype(int), out[-12:].astype(int)  # displayed: red on top, blue below
    assert top[..., 0].mean() > 200 and top[..., 2].mean() < 60
    assert bottom[..., 2].mean() > 200 and bottom[..., 0].mean() < 60


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing_image"),
        (b"", "missing_image"),
        (b"hello, this is not an image", "decode_error"),
        (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), "decode_error"),
        (img_bytes(256, 256)[:300], "decode_error"),  # truncated JPEG
        (img_bytes(8, 8), "too_small"),
        (img_bytes(150, 50), "bad_aspect"),
    ],
)
def test_bad_images_are_dropped_with_a_reason(data, reason):
    assert decode_image(data, F) == (None, reason)


def test_decompression_bomb_protection_stays_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x48x2 > 2x the limit -> refused
    assert decode_image(img_bytes(64, 48), F) == (None, "too_large")


def _shard(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_schema_errors_name_file_and_column(tmp_path):
    good = {"key": ["a"], "jpg": pa.array([img_bytes()], pa.binary()), "caption": ["x"]}
    p = _shard(tmp_path / "ok.parquet", **good)
    assert check_schema(p, InputConfig(path=str(tmp_path))) == 1
    p = _shard(tmp_path / "renamed.parquet", key=["a"], image=good["jpg"], caption=["x"])
    with pytest.raises(ValueError, match=r"renamed\.parquet: column 'jpg' not found"):
        check_schema(p, InputConfig(path=str(tmp_path)))
    p = _shard(tmp_path / "typed.parquet", key=["a"], jpg=["not bytes"], caption=["x"])
    with pytest.raises(ValueError, match=r"typed\.parquet: column 'jpg' has type string"):
        check_schema(p, InputConfig(path=str(tmp_path)))
    p = _shard(tmp_path / "cap.parquet", key=["a"], jpg=good["jpg"], caption=[3])
    with pytest.raises(ValueError, match=r"cap\.parquet: column 'caption' has type int64"):
        check_schema(p, InputConfig(path=str(tmp_path)))
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        check_schema(str(tmp_path / "junk.parquet"), InputConfig(path=str(tmp_path)))


def test_captions_are_normalised_and_counted_before_the_empty_check():
    caps = ["\ufeffa red\x00 circle\tat\r\nleft", "赤い丸 🔴 دائرة", "\x00\u202e \u2066", None]
    table = pa.table({"key": list("abcd"), "jpg": pa.array([img_bytes()] * 4, pa.binary()), "caption": caps})
    out = decode_batch(table, InputConfig(), F, "s").to_pydict()
    assert out["caption"][:2] == ["a red circle at left", caps[1]] and out["normalized"] == [True, False, True, False]
    assert out["drop_reason"] == ["", "", "empty_caption", "empty_caption"]


def test_listing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no \.parquet shards"):
        list_shards(str(tmp_path))
    for n in ("b", "a", "_tmp"):
        _shard(tmp_path / f"{n}.parquet", key=["k"])
    assert [s.rsplit("/", 1)[-1] for s in list_shards(str(tmp_path))] == ["a.parquet", "b.parquet"]
    assert len(list_shards(str(tmp_path / "a*.parquet"))) == 1
