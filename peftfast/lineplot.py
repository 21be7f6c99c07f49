"""A tiny PNG line-chart writer for the training-loss curve, using only the standard library.

``peftfast train`` writes a loss plot next to the adapter. matplotlib is not a dependency of
peftfast (it is large and pulls in a GUI/font stack a headless training box does not need), so
this module rasterises the chart itself: a bytearray pixel buffer, a built-in 5x7 bitmap font
for the labels, and a hand-written PNG encoder (zlib + CRC chunks). It is deliberately small and
only does what a loss curve needs: one series over steps ``1..N``, nice ticks, labels, a title.
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .fileio import replace_atomically

__all__ = ["write_line_png"]

_Color = Tuple[int, int, int]

_WHITE: _Color = (255, 255, 255)
_FRAME: _Color = (80, 80, 80)
_GRID: _Color = (225, 225, 225)
_TEXT: _Color = (30, 30, 30)
_LINE: _Color = (31, 119, 180)  # matplotlib's default "C0", so plots look familiar next to bench/ ones

# 5x7 glyphs: 7 rows top to bottom, each row a 5-bit int (bit 4 = leftmost pixel), written as
# 14 hex digits per glyph. Lowercase x-height is rows 2-6; g, p, q, y and ',' are stored from their
# x-height top and drawn _DESCENT rows lower, so their bowls keep full height instead of being
# squashed into 7 rows (which made "step" read as "steP").
_FONT_HEX = {
    " ": "00000000000000", ".": "00000000000c0c", "-": "0000000e000000", "+": "0004041f040400", ",": "0000000c0c0408",
    ":": "000c0c000c0c00", "_": "0000000000001f", "/": "00010204081000", "=": "00001f001f0000", "(": "02040808080402",
    ")": "08040202020408", "%": "18190204081303", "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f",
    "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e", "6": "0608101e11110e", "7": "1f010204080808",
    "8": "0e11110e11110e", "9": "0e11110f01020c", "a": "00000e010f110f", "b": "1010161911111e", "c": "00000e1010110e",
    "d": "01010d1311110f", "e": "00000e111f100e", "f": "0609081c080808", "g": "0f1111110f010e", "h": "10101619111111",
    "i": "04000c0404040e", "j": "0200060202120c", "k": "10101214181412", "l": "0c04040404040e", "m": "00001a15151111",
    "n": "00001619111111", "o": "00000e1111110e", "p":"1e1111111e1010", "q": "0f1111110f0101", "r": "00001619101010",
    "s": "00000e100e011e", "t": "08081c08080906", "u": "0000111111130d", "v": "00001111110a04", "w": "0000111115150a",
    "x": "0000110a040a11", "y": "111111110f010e", "z": "00001f0204081f", "A": "0e11111f111111", "B": "1e11111e11111e",
    "C": "0e11101010110e", "D": "1c12111111121c", "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f",
    "H": "1111111f111111", "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211", "L": "1010101010101f",
    "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e", "P": "1e11111e101010", "Q": "0e11111115120d",
    "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04",
    "W": "1111111515150a", "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
}
_FONT = {ch: tuple(int(h[i:i + 2], 16) for i in range(0, 14, 2)) for ch, h in _FONT_HEX.items()}
# Unknown characters draw as a hollow box so a missing glyph is visible rather than silently dropped.
_UNKNOWN = (0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F)
_GLYPH_W, _GLYPH_H, _GLYPH_GAP = 5, 7, 1
_DESCENT = 2
_DESCENDERS = frozenset("gpqy,")


class _Canvas:
    """An RGB pixel buffer; every draw call clips, so layout bugs cannot raise IndexError."""

    def __init__(self, width: int, height: int, background: _Color) -> None:
        self.width, self.height = width, height
        # One row of background repeated is far faster than a per-pixel fill.
        self.buf = bytearray(bytes(background) * (width * height))

    def fill_rect(self, x0: int, y0: int, x1: int, y1: int, color: _Color) -> None:
        """Fill the inclusive rectangle [x0, x1] x [y0, y1] (clipped)."""
        x0, x1 = max(x0, 0), min(x1, self.width - 1)
        y0, y1 = max(y0, 0), min(y1, self.height - 1)
        if x0 > x1 or y0 > y1:
            return
        run = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            start = (y * self.width + x0) * 3
            self.buf[start:start + len(run)] = run

    def text_width(self, text: str, scale: int = 1) -> int:
        if not text:
            return 0
        return (len(text) * (_GLYPH_W + _GLYPH_GAP) - _GLYPH_GAP) * scale

    def text(self, x: int, y: int, text: str, color: _Color, scale: int = 1) -> None:
        """Draw ``text`` with its top-left corner at (x, y)."""
        for ch in text:
            rows = _FONT.get(ch, _UNKNOWN)
            shift = _DESCENT if ch in _DESCENDERS else 0
            for r, bits in enumerate(rows, start=shift):
                if not bits:
                    continue
                for c in range(_GLYPH_W):
                    if bits & (0x10 >> c):
                        px, py = x + c * scale, y + r * scale
                        self.fill_rect(px, py, px + scale - 1, py + scale - 1, color)
            x += (_GLYPH_W + _GLYPH_GAP) * scale

    def to_png(self) -> bytes:
        return _encode_png(self.width, self.height, self.buf)


def _encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """Encode a packed 8-bit RGB buffer as a PNG (color type 2, filter 0 on every row)."""
    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[y * stride:(y + 1) * stride]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def _nice_step(span: float, integer: bool = False) -> float:
    """The 1/2/5 x 10^k step giving closest to 5 ticks over ``span`` (a step >= 1 when ``integer``)."""
    if span <= 0:
        return 1.0
    k = math.floor(math.log10(span / 5.0))
    best: Optional[Tuple[float, float]] = None
    # Scan one decade either side: the tick count for a given step is only approximately span/step.
    for exp in (k - 1, k, k + 1):
        for mant in (1, 2, 5):
            step = mant * 10.0 ** exp
            if integer and step < 1:
                continue
            score = abs(span / step - 5.0)
            if best is None or score < best[0]:
                best = (score, step)
    return best[1] if best else 1.0


def _ticks(lo: float, hi: float, step: float) -> List[float]:
    """Multiples of ``step`` in [lo, hi], computed as i * step so float error does not accumulate."""
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [i * step for i in range(first, last + 1)]


def _format_tick(value: float, step: float, biggest: float) -> str:
    """Compact tick label: '4.5', '0.02', '1000', and '1e-05' where fixed point would be long.

    ``biggest`` is the largest |tick| on the axis, so every label on one axis uses the same style.
    """
    if value == 0:
        return "0"  # also avoids '-0' from i * step with a negative zero
    step_exp = math.floor(math.log10(step) + 1e-9)
    if step >= 1e-3 and biggest < 1e6:
        return f"{value:.{max(0, -step_exp)}f}"
    # Enough mantissa digits to tell neighbouring ticks apart, then drop zeros: 1.50e-04 -> 1.5e-04.
    decimals = max(0, min(14, math.floor(math.log10(abs(value)) + 1e-9) - step_exp))
    mantissa, exp = f"{value:.{decimals}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exp}"


def _bresenham(x0: int, y0: int, x1: int, y1: int):
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def write_line_png(values: Sequence[float], path: str | os.PathLike, *, width: int = 640, height: int = 400,
                   x_label: str = "step", y_label: str = "training loss", title: Optional[str] = None) -> Path:
    """Write ``values`` (one per step, x = 1..len(values)) as a line chart PNG.

    Non-finite values (nan/inf) are skipped and break the line there. Long series are reduced to
    a min/max per pixel column, so spikes stay visible and 10k+ points render quickly.

    Args:
        values: the series to plot, e.g. per-step training losses.
        path: the PNG file to write; its directory must already exist.
        width: image width in pixels (at least 160).
        height: image height in pixels (at least 120).
        x_label: label drawn under the x axis.
        y_label: label drawn above the top-left corner of the plot.
        title: optional title drawn centred at the top.

    Returns:
        The written file's :class:`~pathlib.Path`.

    Raises:
        ValueError: ``values`` is empty or holds no finite value, or the size is too small.
        OSError: the file cannot be written (e.g. the directory does not exist).

    Example:
        >>> write_line_png([2.3, 1.9, 1.4, 1.1], "out/loss.png", title="lora r=8")  # doctest: +SKIP
        PosixPath('out/loss.png')
    """
    ys = [float(v) for v in values]
    if not ys:
        raise ValueError("write_line_png: values is empty; nothing to plot")
    finite = [v for v in ys if math.isfinite(v)]
    if not finite:
        raise ValueError(f"write_line_png: none of the {len(ys)} values is finite (all nan/inf); nothing to plot")
    if width < 160 or height < 120:
        raise ValueError(f"write_line_png: image {width}x{height} is too small (need at least 160x120)")

    # Text grows with the image so labels stay legible on big plots without crowding small ones.
    s = max(1, min(width // 640, height // 400))
    title_s = 2 * s
    line_h = _GLYPH_H * s
    text_h = (_GLYPH_H + _DESCENT) * s  # a line of text including descenders
    pad = 8 * s
    tick_len = 4 * s

    n = len(ys)
    y_lo, y_hi = min(finite), max(finite)
    if y_hi - y_lo <= 0:
        # A flat series still needs a non-empty axis; centre it.
        half = abs(y_lo) * 0.05 or 1.0
        y_lo, y_hi = y_lo - half, y_hi + half
    y_step = _nice_step(y_hi - y_lo)
    # Snap the y axis out to whole ticks so the top and bottom gridlines frame the data.
    y_lo = math.floor(y_lo / y_step + 1e-9) * y_step
    y_hi = math.ceil(y_hi / y_step - 1e-9) * y_step
    y_ticks = _ticks(y_lo, y_hi, y_step)
    y_labels = [_format_tick(t, y_step, max(abs(y_lo), abs(y_hi))) for t in y_ticks]

    # One point gets a symmetric range so its dot lands mid-plot rather than on the frame.
    x_lo, x_hi = (0.0, 2.0) if n == 1 else (1.0, float(n))
    x_step = _nice_step(x_hi - x_lo, integer=True)
    x_ticks = [t for t in _ticks(x_lo, x_hi, x_step) if 1 <= t <= n]
    x_labels = [_format_tick(t, 1.0, float(n)) for t in x_ticks]

    canvas = _Canvas(width, height, _WHITE)
    top = pad
    if title:
        top += (_GLYPH_H + _DESCENT) * title_s + pad // 2
    y_label_top = top
    if y_label:
        top += text_h + pad // 2
    left = pad + max(canvas.text_width(lbl, s) for lbl in y_labels) + tick_len + 3 * s
    right = width - 1 - pad - canvas.text_width(x_labels[-1] if x_labels else "", s) // 2
    bottom = height - 1 - pad - (text_h + pad // 2 if x_label else 0) - line_h - tick_len - 2 * s
    if right - left < 40 or bottom - top < 40:
        raise ValueError(f"write_line_png: image {width}x{height} leaves no room for the plot area")

    # Keep a few pixels between data and frame so the 2-px line never hides under the frame.
    inner = 3 * s
    px0, px1 = left + 1 + inner, right - 1 - inner
    py0, py1 = top + 1 + inner, bottom - 1 - inner
    x_scale = (px1 - px0) / (x_hi - x_lo)
    y_scale = (py1 - py0) / (y_hi - y_lo)

    def col(x: float) -> int:
        return int(round(px0 + (x - x_lo) * x_scale))

    def row(y: float) -> int:
        return int(round(py1 - (y - y_lo) * y_scale))

    for t, lbl in zip(y_ticks, y_labels):
        r = row(t)
        canvas.fill_rect(left + 1, r, right - 1, r, _GRID)
        canvas.fill_rect(left - tick_len, r, left - 1, r, _FRAME)
        canvas.text(left - tick_len - 3 * s - canvas.text_width(lbl, s), r - line_h // 2, lbl, _TEXT, s)
    for t, lbl in zip(x_ticks, x_labels):
        c = col(t)
        canvas.fill_rect(c, bottom + 1, c, bottom + tick_len, _FRAME)
        canvas.text(c - canvas.text_width(lbl, s) // 2, bottom + tick_len + 2 * s, lbl, _TEXT, s)

    _draw_series(canvas, ys, col, row, (left + 1, top + 1, right - 1, bottom - 1), s)

    # The frame goes on after the data so nothing overdraws it.
    for x0, y0, x1, y1 in ((left, top, right, top), (left, bottom, right, bottom),
                           (left, top, left, bottom), (right, top, right, bottom)):
        canvas.fill_rect(x0, y0, x1, y1, _FRAME)

    if title:
        canvas.text((width - canvas.text_width(title, title_s)) // 2, pad, title, _TEXT, title_s)
    if y_label:
        canvas.text(max(pad, left - canvas.text_width(y_labels[-1], s) // 2), y_label_top, y_label, _TEXT, s)
    if x_label:
        canvas.text((left + right - canvas.text_width(x_label, s)) // 2, height - 1 - pad - text_h + 1,
                    x_label, _TEXT, s)

    path = Path(path)
    with replace_atomically(path) as f:
        f.write(canvas.to_png())
    return path


def _draw_series(canvas: _Canvas, ys: List[float], col, row, clip: Tuple[int, int, int, int], s: int) -> None:
    """Draw ``ys`` as a thick polyline, collapsing points that share a pixel column to min/max."""
    cx0, cy0, cx1, cy1 = clip
    thick = 2 * s
    color = _LINE
    buf, w = canvas.buf, canvas.width
    pixel = bytes(color)

    def brush(x: int, y: int, size: int) -> None:
        # A size x size square per point gives the line the same width at every slope.
        for yy in range(max(y, cy0), min(y + size - 1, cy1) + 1):
            xa, xb = max(x, cx0), min(x + size - 1, cx1)
            if xa <= xb:
                start = (yy * w + xa) * 3
                buf[start:start + (xb - xa + 1) * 3] = pixel * (xb - xa + 1)

    # Each group is [column, first_row, min_row, max_row, last_row]; a run of finite points is a segment.
    segments: List[List[List[int]]] = []
    current: Optional[List[List[int]]] = None
    for i, v in enumerate(ys):
        if not math.isfinite(v):
            current = None  # break the line at nan/inf
            continue
        c, r = col(i + 1.0), row(v)
        if current is None:
            current = []
            segments.append(current)
        if current and current[-1][0] == c:
            g = current[-1]
            g[2], g[3], g[4] = min(g[2], r), max(g[3], r), r
        else:
            current.append([c, r, r, r, r])

    off = thick // 2  # centre the brush on the ideal pixel
    for seg in segments:
        if len(seg) == 1 and seg[0][2] == seg[0][3]:
            # A lone point would be a 2x2 speck; draw a visible dot instead.
            c, r = seg[0][0], seg[0][1]
            brush(c - 3 * s, r - 3 * s, 6 * s + 1)
            continue
        prev = None
        for g in seg:
            c = g[0]
            if g[2] != g[3]:
                for r in range(g[2], g[3] + 1):
                    brush(c - off, r - off, thick)
            else:
                brush(c - off, g[2] - off, thick)
            if prev is not None:
                for x, y in _bresenham(prev[0], prev[4], c, g[1]):
                    brush(x - off, y - off, thick)
            prev = g
