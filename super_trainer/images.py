"""Small image helpers for the loggers: arrange a batch in a grid, convert to uint8 HWC, write a PNG.

No imaging library is needed: the PNG writer is zlib + struct (8-bit grey, RGB or RGBA, no interlace).
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .files import atomic_write

__all__ = ["make_grid", "to_hwc_uint8", "write_png", "read_png"]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    return torch.as_tensor(np.asarray(value))


def make_grid(images: Any, nrow: int = 0, padding: int = 2, normalize: bool = True) -> torch.Tensor:
    """A ``(C, H', W')`` grid of an ``(N, C, H, W)`` batch (C in 1, 3, 4), ``nrow`` images per row
    (default: ceil(sqrt(N))). With ``normalize`` each image is scaled to [0, 1] by its own min and max,
    so normalized network inputs display well; padding is 0 (black)."""
    batch = _as_tensor(images).float()
    if batch.dim() == 3:  # (N, H, W): grey
        batch = batch.unsqueeze(1)
    if batch.dim() != 4 or batch.shape[1] not in (1, 3, 4) or batch.shape[0] == 0:
        raise ValueError(f"make_grid needs images shaped (N, C, H, W) with C in 1, 3, 4; got {tuple(batch.shape)}")
    if normalize:
        flat = batch.reshape(batch.shape[0], -1)
        low = flat.min(dim=1).values.view(-1, 1, 1, 1)
        high = flat.max(dim=1).values.view(-1, 1, 1, 1)
        batch = (batch - low) / (high - low).clamp_min(1e-12)
    n, c, h, w = batch.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = batch[i]
    return grid


def to_hwc_uint8(image: Any) -> np.ndarray:
    """An ``(H, W, C)`` uint8 array from an image shaped ``(C, H, W)`` (C in 1, 3, 4) or ``(H, W)``.
    Float images are taken as [0, 1] (clipped); integer images as 0–255."""
    tensor = _as_tensor(image)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"an image must be shaped (C, H, W) with C in 1, 3, 4, or (H, W); got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point:
        tensor = (tensor.float().clamp(0.0, 1.0) * 255.0).round()
    return tensor.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Union[str, Path], image: np.ndarray) -> None:
    """Write an ``(H, W, C)`` uint8 array (C in 1, 3, 4) as a PNG file."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"write_png needs an (H, W, C) uint8 array with C in 1, 3, 4; got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * channels)], axis=1)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) \
        + _chunk(b"IEND", b"")
    atomic_write(path, lambda file: file.write(png))


def read_png(path: Union[str, Path]) -> np.ndarray:
    """Read back a PNG written by :func:`write_png` (filter type 0 only) as an ``(H, W, C)`` uint8 array."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, _, color_type = header[:4]
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    if rows[:, 0].any():
        raise ValueError(f"{path} uses PNG row filters; read_png reads only unfiltered files")
    return rows[:, 1:].reshape(height, width, channels).copy()
