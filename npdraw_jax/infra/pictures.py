"""Image grids written as PNG files."""

import os

import numpy as np
from PIL import Image


def tile(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
  """Lays images [N, H, W, C] in [0, 1] out in rows of `columns`, uint8.

  Cells are separated by `pad` pixels of mid grey; a short last row is padded
  with grey cells.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Expected images [N, H, W, 1 or 3], got {images.shape}.')
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, np.uint8)
  pixels = np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)
  for i in range(n):
    r, q = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top : top + h, left : left + w] = pixels[i]
  return grid


def _grid_picture(images: np.ndarray, columns: int, scale: int) -> Image.Image:
  """`tile(images, columns)` as a PIL image, each pixel scale x scale."""
  grid = tile(images, columns)
  picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    picture = picture.resize(
      (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
    )
  return picture


def _make_parent(path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def save_grid(path: str, images: np.ndarray, columns: int, scale: int = 1) -> None:
  """Writes `tile(images, columns)` to path, each pixel scale x scale."""
  _make_parent(path)
  _grid_picture(images, columns, scale).save(path)


def save_animation(
  path: str,
  frames: list[np.ndarray],
  columns: int,
  scale: int = 1,
  frame_ms: int = 200,
  hold_last_ms: int = 2000,
) -> None:
  """Writes a looping GIF whose frame i is `tile(frames[i], columns)`.

  The last frame stays on screen for hold_last_ms, so the finished picture
  can be seen before the loop restarts.
  """
  if not frames:
    raise ValueError('An animation needs at least one frame.')
  pictures = [_grid_picture(frame, columns, scale) for frame in frames]
  durations = [frame_ms] * (len(pictures) - 1) + [hold_last_ms]
  _make_parent(path)
  pictures[0].save(
    path, save_all=True, append_images=pictures[1:], duration=durations, loop=0, optimize=False
  )
