"""A local page to draw with a finished run: step through, edit and swap drawings.

  python -m experiments.explore --workdir=DIR [--port=8000] [--host=127.0.0.1]

Open http://HOST:PORT/ in a browser. The page shows a drawing (of a test
image, a prior sample or a region swap of two test images) step by step: the
canvas after each step beside its decoded image. A step's part (from the bank,
most used first) or location (a click on the canvas) can be changed, a step
switched off or added, and the decoded images follow. The server is a small
FastAPI app over npdraw_jax.api: it keeps no state, and every request runs
functions compiled once at start-up.
"""

import base64
import io
import os

import fastapi
import numpy as np
import pydantic
import uvicorn
from absl import app, flags, logging
from fastapi import responses, staticfiles
from PIL import Image

from experiments import launch
from npdraw_jax import api
from npdraw_jax.model import editing

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'explore_static')
USAGE_IMAGES = 256  # Test images whose drawings rank the parts by use.


def png_data_url(image: np.ndarray) -> str:
  """An image [H, W, C] in [0, 1] as a PNG data URL, 8 bits per channel."""
  pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, 'PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def parts_by_use(run: api.Run) -> list[int]:
  """Part indices, the most drawn in q's drawings of the first test images first."""
  rows = np.arange(min(USAGE_IMAGES, run.num_test_images))
  drawing = run.encode(run.test_images(rows)).drawing
  uses = np.bincount(drawing.what[drawing.pres], minlength=run.num_parts)
  return np.argsort(-uses, kind='stable').tolist()


def make_app(run: api.Run):
  """The FastAPI app serving the page and its JSON requests for `run`."""

  class DrawingRequest(pydantic.BaseModel):
    pres: list[bool]
    where: list[int]
    what: list[int]

  class ImageRequest(pydantic.BaseModel):
    index: int

  class SampleRequest(pydantic.BaseModel):
    seed: int
    temperature: float = 1.0
    top_k: int | None = None

  class SwapRequest(pydantic.BaseModel):
    a: int
    b: int
    region: str

  usage_order = parts_by_use(run)
  grid = run.grid
  info = {
    'steps': run.num_steps,
    'num_parts': run.num_parts,
    'num_test_images': run.num_test_images,
    'image_size': run.model.image_size,
    'canvas_size': grid.canvas_size,
    'patch_size': grid.patch_size,
    'stride': grid.stride,
    'grid_side': grid.side,
    'regions': list(editing.NAMED_REGIONS),
    'parts': [{'index': k, 'url': png_data_url(run.parts[k])} for k in usage_order],
  }

  def view(drawing: api.Drawing, **sources: np.ndarray) -> dict:
    """The page's picture of one drawing [1, S]: its steps, and the canvas and
    decoded image after each step."""
    canvases, decoded = run.frames(drawing)
    return {
      'pres': drawing.pres[0].tolist(),
      'where': drawing.where[0].tolist(),
      'what': drawing.what[0].tolist(),
      'canvases': [png_data_url(c) for c in canvases[0]],
      'decoded': [png_data_url(d) for d in decoded[0]],
      'sources': {name: png_data_url(image) for name, image in sources.items()},
    }

  def test_image(index: int) -> np.ndarray:
    if not 0 <= index < run.num_test_images:
      raise ValueError(f'Test image {index} does not exist: choose 0 to {run.num_test_images - 1}.')
    return run.test_images([index])[0]

  app_ = fastapi.FastAPI(title='NP-DRAW explorer', docs_url=None, redoc_url=None)

  @app_.exception_handler(ValueError)
  async def bad_value(request, error: ValueError):
    return responses.JSONResponse(status_code=400, content={'detail': str(error)})

  @app_.get('/')
  def index():
    return responses.FileResponse(os.path.join(STATIC_DIR, 'index.html'))

  @app_.get('/api/info')
  def get_info():
    return info

  # Plain `def` handlers run in a thread pool; JAX's compiled calls are thread-safe.
  @app_.post('/api/test_image')
  def encode_test_image(request: ImageRequest):
    image = test_image(request.index)
    return view(run.encode(image[None]).drawing, image=image)

  @app_.post('/api/sample')
  def sample(request: SampleRequest):
    return view(run.sample(1, request.seed, request.temperature, request.top_k))

  @app_.post('/api/render')
  def render(request: DrawingRequest):
    drawing = api.Drawing(*(np.asarray([x]) for x in (request.pres, request.where, request.what)))
    return view(drawing)

  @app_.post('/api/swap')
  def swap(request: SwapRequest):
    a, b = test_image(request.a), test_image(request.b)
    return view(run.edit(a, b, request.region).drawing, a=a, b=b)

  app_.mount('/static', staticfiles.StaticFiles(directory=STATIC_DIR), name='static')
  return app_


def define_flags():
  # Defined when run as a command only: importing make_app defines no flags.
  flags.DEFINE_string('workdir', None, 'A finished run directory (stages bank to vae done).')
  flags.DEFINE_string(
    'host', '127.0.0.1', 'Address to listen on; the default is this machine only.'
  )
  flags.DEFINE_integer('port', 8000, 'Port to listen on.')
  flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  FLAGS = flags.FLAGS
  run = api.load_run(FLAGS.workdir)
  page = make_app(run)
  logging.info('Serving %s at http://%s:%d/', run.workdir, FLAGS.host, FLAGS.port)
  uvicorn.run(page, host=FLAGS.host, port=FLAGS.port, log_level='warning')


if __name__ == '__main__':
  launch.run_app(main, define_flags)
