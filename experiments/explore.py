"""A local page to draw with a finished run: step through, edit and swap drawings.

  python -m experiments.explore --workdir=DIR [--port=8000] [--host=127.0.0.1]

Open http://HOST:PORT/ in a browser. The page shows a drawing (of a test
image, a prior sample or a region swap of two test images) step by step: the
canvas after each step beside its decoded image. A step's part (from the bank,
most used first) or location (a click on the canvas) can be changed, a step
switched off or added, and the decoded images follow. The server is a small
FastAPI app over npdraw_jax.api: it keeps no state, and every request runs
functions compiled once at start-up.

A bad request (a float or bool where an integer is wanted, an integer out of
range, a drawing of more than MAX_STEPS_PER_T * T steps, a malformed body) is
an HTTP 4xx whose JSON `detail` is one line. The page only reads the run
directory; without the run's data (a moved data folder) it still starts, to
sample, edit and render, and only its test-image requests answer 404.
"""

import base64
import io
import os

import fastapi
import numpy as np
import pydantic
import uvicorn
from absl import app, flags, logging
from fastapi import exceptions, responses, staticfiles
from PIL import Image

from experiments import launch
from npdraw_jax import api
from npdraw_jax.infra import input_pipeline
from npdraw_jax.model import editing

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'explore_static')
USAGE_IMAGES = 256  # Test images whose drawings rank the parts by use.
# A drawing's steps are capped at this many times T: a render's time and answer
# grow with the steps (40,000 steps: 13 s and 38 MB).
MAX_STEPS_PER_T = 4
MAX_LISTED_ERRORS = 3  # Validation errors named in a 422's one line.


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


def validation_message(error: exceptions.RequestValidationError) -> str:
  """Pydantic's errors of a request as one line: 'where.0: Input should be ...'."""
  problems = [f'{".".join(map(str, e["loc"][1:])) or "body"}: {e["msg"]}' for e in error.errors()]
  more = len(problems) - MAX_LISTED_ERRORS
  return '; '.join(problems[:MAX_LISTED_ERRORS]) + (f' (and {more} more)' if more > 0 else '')


def make_app(run: api.Run):
  """The FastAPI app serving the page and its JSON requests for `run`."""

  # Strict types: JSON's 3.0, true or "3" is no integer here (pydantic would convert them);
  # the API checks the ranges.
  class DrawingRequest(pydantic.BaseModel):
    pres: list[pydantic.StrictBool]
    where: list[pydantic.StrictInt]
    what: list[pydantic.StrictInt]

  class ImageRequest(pydantic.BaseModel):
    index: pydantic.StrictInt

  class SampleRequest(pydantic.BaseModel):
    seed: pydantic.StrictInt
    temperature: pydantic.StrictFloat = 1.0
    top_k: pydantic.StrictInt | None = None

  class SwapRequest(pydantic.BaseModel):
    a: pydantic.StrictInt
    b: pydantic.StrictInt
    region: pydantic.StrictStr

  max_steps = MAX_STEPS_PER_T * run.num_steps
  try:
    usage_order, num_test_images, data_error = parts_by_use(run), run.num_test_images, None
  except input_pipeline.DataError as e:
    # The bank lists its parts most used first already; test images stay unavailable.
    usage_order, num_test_images, data_error = list(range(run.num_parts)), None, str(e)
    logging.warning('%s Serving samples and edits only.', e)
  grid = run.grid
  info = {
    'steps': run.num_steps,
    'max_steps': max_steps,
    'num_parts': run.num_parts,
    'num_test_images': num_test_images,
    'data_error': data_error,
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

  def one_line(status: int, message: str) -> responses.JSONResponse:
    return responses.JSONResponse(status_code=status, content={'detail': ' '.join(message.split())})

  app_ = fastapi.FastAPI(title='NP-DRAW explorer', docs_url=None, redoc_url=None)

  @app_.exception_handler(ValueError)
  async def bad_value(request, error: ValueError):
    return one_line(400, str(error))

  # Chosen over ValueError's handler (a DataError is one): the data is missing, not the request.
  @app_.exception_handler(input_pipeline.DataError)
  async def no_data(request, error: input_pipeline.DataError):
    return one_line(404, str(error))

  @app_.exception_handler(exceptions.RequestValidationError)
  async def malformed(request, error: exceptions.RequestValidationError):
    return one_line(422, validation_message(error))

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
    if len(request.pres) > max_steps:
      raise ValueError(
        f'A drawing here has at most {max_steps} steps ({MAX_STEPS_PER_T} T), '
        f'not {len(request.pres)}.'
      )
    drawing = api.Drawing(*([x] for x in (request.pres, request.where, request.what)))
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
  flags.DEFINE_integer('port', 8000, 'Port to listen on.', lower_bound=1, upper_bound=65535)
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
