"""Tests for peftfast.lineplot: the dependency-free loss-curve PNG writer.

The PNGs are decoded by a small reader below (chunk CRCs, inflate, filter 0) so the checks do not
depend on Pillow; a separate test cross-checks with Pillow when it is installed.
"""
from __future__ import annotations

import math
import os
import struct
import zlib

import pytest

from peftfast.lineplot import write_line_png


def read_png(path):
    """Decode an 8-bit RGB, non-interlaced, filter-0 PNG into (width, height, rows of (r, g, b))."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r} chunk"
        chunks.append((tag, body))
        pos += 12 + length
    assert pos == len(data), "trailing bytes after the last chunk"
    tags = [t for t, _ in chunks]
    assert tags[0] == b"IHDR" and tags[-1] == b"IEND" and b"IDAT" in tags
    width, height, depth, color_type, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, comp, filt, interlace) == (8, 2, 0, 0, 0), "expected 8-bit RGB, no interlace"
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    rows = []
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        assert line[0] == 0, f"row {y} uses filter {line[0]}, expected 0"
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(width)])
    return width, height, rows


def is_blue(p):
    r, g, b = p
    return b >= 150 and r <= 90 and b - g >= 40


def is_dark(p):
    return max(p) < 110


def blue_pixels(rows):
    return [(x, y) for y, row in enumerate(rows) for x, p in enumerate(row) if is_blue(p)]


def frame_box(rows):
    """(left, top, right, bottom) of the plot frame: the rows/columns that are mostly dark pixels."""
    height, width = len(rows), len(rows[0])
    frame_rows = [y for y in range(height) if sum(is_dark(p) for p in rows[y]) > width // 2]
    frame_cols = [x for x in range(width) if sum(is_dark(rows[y][x]) for y in range(height)) > height // 2]
    assert frame_rows and frame_cols, "no plot frame found"
    return min(frame_cols), min(frame_rows), max(frame_cols), max(frame_rows)


def mean_row(pixels, x_from, x_to):
    ys = [y for x, y in pixels if x_from <= x < x_to]
    assert ys, f"no line pixels in columns {x_from}..{x_to}"
    return sum(ys) / len(ys)


def quarters(rows):
    left, _, right, _ = frame_box(rows)
    q = (right - left) // 4
    return (left, left + q), (right - q, right)


def test_png_structure_and_size(tmp_path):
    out = write_line_png([3.0, 2.0, 1.5, 1.2], tmp_path / "loss.png", width=500, height=300)
    assert out == tmp_path / "loss.png"
    width, height, rows = read_png(out)
    assert (width, height) == (500, 300)
    assert len(rows) == 300 and all(len(r) == 500 for r in rows)
    assert rows[0][0] == (255, 255, 255), "background should be white"


def test_returns_path_for_str_argument(tmp_path):
    out = write_line_png([1.0, 2.0], str(tmp_path / "a.png"))
    assert out.exists() and out.name == "a.png"


def test_falling_series_slopes_down(tmp_path):
    values = [4.0 * math.exp(-i / 40) + 0.5 for i in range(200)]
    _, _, rows = read_png(write_line_png(values, tmp_path / "f.png"))
    pix = blue_pixels(rows)
    assert len(pix) > 200, "line not drawn"
    (l0, l1), (r0, r1) = quarters(rows)
    # image rows grow downwards: a falling loss starts high (small y) and ends low (large y)
    assert mean_row(pix, l0, l1) < mean_row(pix, r0, r1) - 50


def test_rising_series_slopes_up(tmp_path):
    values = [0.1 * i for i in range(50)]
    _, _, rows = read_png(write_line_png(values, tmp_path / "r.png"))
    pix = blue_pixels(rows)
    (l0, l1), (r0, r1) = quarters(rows)
    assert mean_row(pix, l0, l1) > mean_row(pix, r0, r1) + 50


def test_line_stays_inside_frame(tmp_path):
    _, _, rows = read_png(write_line_png([5.0, -3.0, 8.0, 0.0, 2.5], tmp_path / "z.png"))
    left, top, right, bottom = frame_box(rows)
    pix = blue_pixels(rows)
    assert pix
    assert all(left < x < right and top < y < bottom for x, y in pix)


def test_nan_and_inf_are_skipped(tmp_path):
    values = [3.0 - 0.02 * i for i in range(100)]
    values[10] = float("nan")
    values[50:60] = [float("nan")] * 10
    values[80] = float("inf")
    _, _, rows = read_png(write_line_png(values, tmp_path / "n.png"))
    pix = blue_pixels(rows)
    (l0, l1), (r0, r1) = quarters(rows)
    assert mean_row(pix, l0, l1) < mean_row(pix, r0, r1)
    # the 10-step NaN run leaves a gap of columns with no line at all around x = 55
    left, _, right, _ = frame_box(rows)
    cols = {x for x, _ in pix}
    mid = left + (right - left) * 55 // 100
    assert mid not in cols
    assert mid - 40 in cols and mid + 40 in cols


@pytest.mark.parametrize("values", [[], [float("nan")] * 3, [float("inf"), float("-inf"), float("nan")]])
def test_nothing_to_plot_raises(tmp_path, values):
    with pytest.raises(ValueError, match="empty|finite"):
        write_line_png(values, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == [], "a failed call must not leave files behind"


def test_single_value_draws_a_dot(tmp_path):
    _, _, rows = read_png(write_line_png([1.7], tmp_path / "one.png"))
    pix = blue_pixels(rows)
    assert len(pix) >= 9
    xs, ys = [x for x, _ in pix], [y for _, y in pix]
    assert max(xs) - min(xs) < 15 and max(ys) - min(ys) < 15, "a single value should be a dot, not a line"
    left, top, right, bottom = frame_box(rows)
    assert abs((min(xs) + max(xs)) / 2 - (left + right) / 2) < 5


def test_constant_series(tmp_path):
    _, _, rows = read_png(write_line_png([2.0] * 30, tmp_path / "c.png"))
    ys = {y for _, y in blue_pixels(rows)}
    assert 1 <= len(ys) <= 3, "a flat series is a horizontal line"


def test_ten_thousand_points_keep_their_spikes(tmp_path):
    values = [2.0 + 0.01 * math.sin(i / 10) for i in range(10_000)]
    # single-step spikes must survive downsampling to ~600 columns wherever they fall in a column
    spikes = (2_503, 5_007, 7_011, 8_514)
    for i in spikes:
        values[i] = 9.0
    out = write_line_png(values, tmp_path / "big.png")
    _, _, rows = read_png(out)
    pix = blue_pixels(rows)
    left, top, right, bottom = frame_box(rows)
    # 9.0 is the maximum, so each tip sits within the top tick interval; the rest hugs 2.0
    high = top + (bottom - top) * 0.35
    for i in spikes:
        col = left + (right - left) * i // 10_000
        ys = {y for x, y in pix if abs(x - col) <= 3}
        assert min(ys) < high, f"spike at step {i + 1} lost"
        # drawn as one stroke from the baseline up to the tip, not a detached dot
        assert set(range(min(ys), max(ys) + 1)) <= ys, f"spike at step {i + 1} is not connected"
    near_spike = lambda x: any(abs(x - (left + (right - left) * i // 10_000)) <= 5 for i in spikes)
    assert min(y for x, y in pix if not near_spike(x)) > top + (bottom - top) * 0.5


def test_text_is_drawn_outside_plot_area(tmp_path):
    _, height, rows = read_png(write_line_png([3.0, 2.0, 1.0], tmp_path / "t.png"))
    left, top, right, bottom = frame_box(rows)
    # below the frame: x tick labels and the x label (skip the tick marks right under the frame)
    below = sum(is_dark(p) for y in range(bottom + 6, height) for p in rows[y])
    # left of the frame: y tick labels (skip the tick marks right beside it)
    beside = sum(is_dark(p) for y in range(top, bottom) for p in rows[y][:left - 5])
    # above the frame: the y label
    above = sum(is_dark(p) for y in range(top) for p in rows[y])
    assert below > 30 and beside > 30 and above > 20


def test_labels_and_title_change_pixels(tmp_path):
    _, _, plain = read_png(write_line_png([3.0, 2.0], tmp_path / "a.png", title=None))
    _, _, titled = read_png(write_line_png([3.0, 2.0], tmp_path / "b.png", title="Loss"))
    _, _, relabelled = read_png(write_line_png([3.0, 2.0], tmp_path / "c.png", x_label="eval step"))
    _, top_plain, _, _ = frame_box(plain)
    _, top_titled, _, _ = frame_box(titled)
    assert top_titled > top_plain, "the title should push the plot down"
    assert sum(is_dark(p) for y in range(top_titled - 20) for p in titled[y]) > 40
    assert relabelled != plain


def test_unknown_characters_do_not_fail(tmp_path):
    _, _, rows = read_png(write_line_png([1.0, 0.5], tmp_path / "u.png", title="λ ~ 0.5 #1"))
    assert blue_pixels(rows)


def test_too_small_image_raises(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        write_line_png([1.0, 2.0], tmp_path / "s.png", width=50, height=40)


def test_overwrite_and_no_temp_files_left(tmp_path):
    target = tmp_path / "loss.png"
    target.write_bytes(b"not a png")
    write_line_png([1.0, 2.0, 3.0], target)
    assert read_png(target)[0] == 640
    write_line_png([3.0, 2.0], target, width=320, height=200)
    assert read_png(target)[:2] == (320, 200)
    assert sorted(os.listdir(tmp_path)) == ["loss.png"]


def test_missing_directory_raises_and_creates_nothing(tmp_path):
    with pytest.raises(OSError):
        write_line_png([1.0, 2.0], tmp_path / "nope" / "loss.png")
    assert not (tmp_path / "nope").exists()


def test_temp_file_removed_when_replace_fails(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("simulated failure")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_line_png([1.0, 2.0], tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def test_accepts_float_convertible_scalars(tmp_path):
    # e.g. a list of numpy/torch scalars from the trainer: anything float() accepts
    class Scalar:
        def __init__(self, v):
            self.v = v

        def __float__(self):
            return self.v

    _, _, rows = read_png(write_line_png([Scalar(2.0), Scalar(1.0)], tmp_path / "g.png"))
    assert blue_pixels(rows)


def test_pillow_reads_it(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    out = write_line_png([3.0, 2.0, 1.0], tmp_path / "pil.png", width=321, height=207)
    with Image.open(out) as im:
        assert im.size == (321, 207)
        assert im.mode == "RGB"
        im.load()
