"""Plain NumPy references the tests compare the JAX code against."""

import math

import numpy as np


def corners(canvas_size: int, stride: int) -> list[tuple[int, int]]:
  """Top-left corners of the grid locations in raster order."""
  side = math.ceil(canvas_size / stride)
  return [(i * stride, j * stride) for i in range(side) for j in range(side)]


def render(bank, pres, where, what, canvas_size, stride, every_box=False):
  """Canvas and location map after the last step of one sequence, by loops.

  every_box: the map holds every step's box, drawn or not (the authors' history).
  """
  p, channels = bank.shape[1], bank.shape[-1]
  canvas = np.zeros((canvas_size, canvas_size, channels))
  location_map = np.zeros((canvas_size, canvas_size, 1))
  grid = corners(canvas_size, stride)
  for t in range(len(pres)):
    r, c = grid[where[t]]
    h, w = min(p, canvas_size - r), min(p, canvas_size - c)
    if pres[t] or every_box:
      location_map[r : r + h, c : c + w] = 1.0
    if pres[t]:
      region = canvas[r : r + h, c : c + w]
      canvas[r : r + h, c : c + w] = np.maximum(region, bank[what[t], :h, :w])
  return canvas, location_map


def padded_patch(image, r, c, p):
  """The p x p patch at (r, c), zero where it overhangs the image."""
  patch = np.zeros((p, p, image.shape[-1]))
  h, w = min(p, image.shape[0] - r), min(p, image.shape[1] - c)
  patch[:h, :w] = image[r : r + h, c : c + w]
  return patch
