"""experiments.explore served on a tiny run and driven by headless Chromium: a part
change and a region swap show the decoded images the API computes; bad requests
get a 4xx with one line and the server keeps serving. The server reads a copy
of the run that it cannot write, and leaves it unchanged; without the run's
data a page still samples and renders."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import api_inputs_test
import numpy as np
import pytest
import tiny_run
import uvicorn
from absl.testing import absltest
from PIL import Image
from playwright.sync_api import sync_playwright

import npdraw_jax
from experiments import explore

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
CHROMIUM_INSTALL = 'apt-get update && apt-get install -y chromium'
SCREENSHOT_ENV = 'NPDRAW_EXPLORE_SCREENSHOT'  # Where to save a screenshot of the page.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def pixels_of(data_url: str) -> np.ndarray:
  """A PNG data URL's pixels as [H, W, C] in [0, 1]."""
  png = base64.b64decode(data_url.split(',', 1)[1])
  pixels = np.asarray(Image.open(io.BytesIO(png)), np.float32) / 255
  return pixels[..., None] if pixels.ndim == 2 else pixels


def get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=30) as response:
    return json.load(response)


def post(url: str, body: bytes) -> tuple[int, dict]:
  request = urllib.request.Request(url, body, {'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


class ExploreTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tiny_run.trained_run()
    # The server reads a copy it cannot write (as root: where setpriv can make it so).
    cls.served = api_inputs_test.read_only_copy(cls)
    cls.prefix = api_inputs_test.reader_prefix()
    cls.served_before = api_inputs_test.snapshot(cls.served)
    cls.url = f'http://127.0.0.1:{free_port()}'
    cls.log = tempfile.TemporaryFile('w+')
    cls.addClassCleanup(cls.log.close)
    command = [sys.executable, '-m', 'experiments.explore', f'--workdir={cls.served}']
    cls.server = subprocess.Popen(
      [*(cls.prefix or []), *command, f'--port={cls.url.rsplit(":", 1)[1]}'],
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      # A file, not a pipe: a pipe nobody reads would block the server once full.
      stderr=cls.log,
    )
    cls.addClassCleanup(cls.server.kill)
    # The server loads and compiles while this process does too.
    cls.trained = npdraw_jax.load_run(cls.workdir)
    deadline = time.time() + 120
    while True:
      try:
        with urllib.request.urlopen(cls.url + '/api/info', timeout=5):
          break
      except OSError:
        if cls.server.poll() is not None or time.time() > deadline:
          cls.log.seek(0)
          raise AssertionError(f'The server did not start: {cls.log.read()[-3000:]}') from None
        time.sleep(0.3)

  def test_part_change_and_region_swap_in_the_browser(self):
    # CI installs Chromium (.ci/run), so there its absence is a failure.
    if not os.path.exists(CHROMIUM) and os.environ.get('CI') != 'true':
      print(f'Chromium is not installed; to run this test: {CHROMIUM_INSTALL}')
      self.skipTest(f'no Chromium at {CHROMIUM} (install: {CHROMIUM_INSTALL})')
    run = self.trained
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
      page = browser.new_page(viewport={'width': 1280, 'height': 900})
      renders = 0

      def wait_for_render():
        nonlocal renders
        renders += 1
        page.wait_for_function(f'Number(document.body.dataset.renders) >= {renders}')
        self.assertEqual(page.text_content('#error'), '')

      page.goto(self.url)
      wait_for_render()  # The page opens on test image 0.
      drawing = run.encode(run.test_images([0])).drawing
      self.assertEqual(page.text_content('#summary'), f'{drawing.pres.sum()} steps drawn')

      # Step 3 (slider position 3) gets the second most used part.
      page.fill('#slider', '3')
      part = int(page.get_attribute('#parts img:nth-child(2)', 'data-part'))
      page.click('#parts img:nth-child(2)')
      wait_for_render()
      what, pres = drawing.what.copy(), drawing.pres.copy()
      what[0, 2], pres[0, 2] = part, True
      changed = npdraw_jax.Drawing(pres, drawing.where, what)
      frames = run.frames(changed)
      np.testing.assert_allclose(
        pixels_of(page.get_attribute('#decoded', 'src')), frames.decoded[0, 2], atol=0.6 / 255
      )
      np.testing.assert_allclose(
        pixels_of(page.get_attribute('#canvas', 'src')), frames.canvases[0, 2], atol=0.6 / 255
      )
      self.assertEqual(page.text_content('#step-part'), str(part))

      # A click on the canvas's bottom-right corner moves the step there.
      page.click('#canvas-box', position={'x': 250, 'y': 250})
      wait_for_render()
      self.assertEqual(page.text_content('#step-where'), str(run.grid.num_locations - 1))

      # Region swap of test images 3 and 7 in the top half; the page shows the last step.
      page.fill('#swap-a', '3')
      page.fill('#swap-b', '7')
      page.fill('#region', 'top')
      page.click('#swap')
      wait_for_render()
      images = run.test_images([3, 7])
      swap = run.edit(images[0], images[1], 'top')
      np.testing.assert_allclose(
        pixels_of(page.get_attribute('#decoded', 'src')), swap.decoded, atol=0.6 / 255
      )
      np.testing.assert_allclose(
        pixels_of(page.get_attribute('#source-b', 'src')), images[1], atol=0.6 / 255
      )
      if os.environ.get(SCREENSHOT_ENV):
        page.screenshot(path=os.environ[SCREENSHOT_ENV], full_page=True)

      # A bad region is shown, and the page keeps the last drawing.
      page.fill('#region', 'middle')
      page.click('#swap')
      renders += 1
      page.wait_for_function(f'Number(document.body.dataset.renders) >= {renders}')
      self.assertIn('A region is one of', page.text_content('#error'))
      browser.close()

  def test_bad_requests_get_4xx_and_the_server_keeps_serving(self):
    drawing = {'pres': [True, True], 'where': [0, 999], 'what': [0, 1]}
    status, answer = post(self.url + '/api/render', json.dumps(drawing).encode())
    self.assertEqual(status, 400)
    self.assertIn('where must lie in [0, 16)', answer['detail'])
    status, _ = post(self.url + '/api/render', b'{"pres": [true')
    self.assertEqual(status, 422)
    status, answer = post(self.url + '/api/test_image', b'{"index": 100000}')
    self.assertEqual(status, 400)
    self.assertIn('does not exist', answer['detail'])
    status, answer = post(self.url + '/api/sample', b'{"seed": 3, "temperature": 0.5}')
    self.assertEqual(status, 200)
    expected = self.trained.sample(1, seed=3, temperature=0.5)
    np.testing.assert_array_equal(answer['what'], expected.what[0])
    self.assertIsNone(self.server.poll())

  def assert_one_line_4xx(self, path: str, body, status: int, detail: str) -> dict:
    """Posts body (JSON text, or an object to encode) and checks the answer's
    status and one-line detail."""
    text = body if isinstance(body, str) else json.dumps(body)
    answer_status, answer = post(self.url + path, text.encode())
    self.assertEqual((answer_status, path), (status, path), answer)
    self.assertIsInstance(answer['detail'], str)
    self.assertNotIn('\n', answer['detail'])
    self.assertIn(detail, answer['detail'])
    return answer

  def test_numbers_are_checked_as_integers_in_range_with_one_line_4xx(self):
    drawing = {'pres': [True], 'where': [0], 'what': [1]}
    # 2**32 + 3 was location 3 once cast to int32.
    self.assert_one_line_4xx(
      '/api/render', {**drawing, 'where': [2**32 + 3]}, 400, 'where must lie in'
    )
    self.assert_one_line_4xx('/api/render', {**drawing, 'what': [-(2**32)]}, 400, 'what must')
    for bad in ('{"pres": [true], "where": [1e20], "what": [1]}', {**drawing, 'where': [3.0]}):
      self.assert_one_line_4xx('/api/render', bad, 422, 'where.0: Input should be a valid integer')
    self.assert_one_line_4xx('/api/render', {**drawing, 'pres': [1]}, 422, 'pres.0:')
    self.assert_one_line_4xx(
      '/api/sample', {'seed': 2**64}, 400, 'seed must lie in [0, 4294967296)'
    )
    self.assert_one_line_4xx('/api/sample', {'seed': 1.5}, 422, 'seed: Input should be')
    self.assert_one_line_4xx('/api/sample', {'seed': 0, 'top_k': 2.5}, 422, 'top_k')
    self.assert_one_line_4xx(
      '/api/sample', '{"seed": 0, "temperature": NaN}', 400, 'temperature must be positive'
    )
    self.assert_one_line_4xx('/api/test_image', {'index': True}, 422, 'index: Input should be')
    self.assert_one_line_4xx('/api/swap', {'a': 2**64, 'b': 0, 'region': 'top'}, 400, 'not exist')
    floats = {'pres': [True] * 100, 'where': [0.5] * 100, 'what': [0] * 100}
    self.assert_one_line_4xx(
      '/api/render', floats, 422, 'where.2: Input should be a valid integer (and 97 more)'
    )
    many = {'pres': [True] * 40_000, 'where': [0] * 40_000, 'what': [0] * 40_000}
    self.assert_one_line_4xx('/api/render', many, 400, 'not 40000')
    # A top_k of K or more keeps all: the sample of top_k None.
    status, answer = post(self.url + '/api/sample', b'{"seed": 5, "top_k": 1000000}')
    self.assertEqual(status, 200)
    np.testing.assert_array_equal(answer['what'], self.trained.sample(1, seed=5).what[0])
    self.assertIsNone(self.server.poll())

  def test_drawings_are_capped_at_four_times_t_steps(self):
    cap = 4 * self.trained.num_steps
    steps = {'pres': [True] * cap, 'where': [1] * cap, 'what': [2] * cap}
    status, answer = post(self.url + '/api/render', json.dumps(steps).encode())
    self.assertEqual(status, 200)
    self.assertLen(answer['decoded'], cap)
    longer = {name: values + values[:1] for name, values in steps.items()}
    self.assert_one_line_4xx(
      '/api/render', longer, 400, f'at most {cap} steps (4 T), not {cap + 1}'
    )
    self.assertIsNone(self.server.poll())

  def test_the_read_only_run_is_served_and_left_unchanged(self):
    if self.prefix is None or not api_inputs_test.cannot_write(self.served, self.prefix):
      self.skipTest('Cannot make a directory unwritable here (root without setpriv).')
    requests = [
      ('/api/test_image', {'index': 2}),
      ('/api/sample', {'seed': 1}),
      ('/api/swap', {'a': 0, 'b': 1, 'region': 'left'}),
      ('/api/render', {'pres': [True], 'where': [3], 'what': [4]}),
    ]
    for path, body in requests:
      status, _ = post(self.url + path, json.dumps(body).encode())
      self.assertEqual((status, path), (200, path))
    self.assertEqual(api_inputs_test.snapshot(self.served), self.served_before)

  def test_port_out_of_range_is_one_line(self):
    command = [sys.executable, '-m', 'experiments.explore', f'--workdir={self.workdir}']
    for port in (70000, 0):
      result = subprocess.run(
        [*command, f'--port={port}'], cwd=REPO, capture_output=True, text=True, timeout=120
      )
      self.assertEqual(result.returncode, 2, result.stderr[-3000:])
      self.assertNotIn('Traceback', result.stderr)
      self.assertEqual(
        result.stderr.strip().splitlines()[-1],
        f'Error: flag --port={port}: {port} is not an integer in the range [1, 65535]',
      )

  def test_without_its_data_the_page_samples_and_renders(self):
    run = self.trained
    alone = tiny_run.without_data(run)
    moved = alone.config.data.source.removeprefix('folder:')
    port = free_port()
    server = uvicorn.Server(
      uvicorn.Config(explore.make_app(alone), host='127.0.0.1', port=port, log_level='warning')
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    self.addCleanup(thread.join, 30)
    self.addCleanup(setattr, server, 'should_exit', True)
    deadline = time.time() + 30
    while not server.started:
      self.assertLess(time.time(), deadline, 'The in-process server did not start.')
      time.sleep(0.05)
    url = f'http://127.0.0.1:{port}'

    info = get(url + '/api/info')
    self.assertIsNone(info['num_test_images'])
    self.assertIn(f"folder '{moved}' does not exist", info['data_error'])
    # The bank's order, most used first when it was built.
    self.assertEqual([p['index'] for p in info['parts']], list(range(run.num_parts)))
    status, answer = post(url + '/api/sample', b'{"seed": 3}')
    self.assertEqual(status, 200)
    np.testing.assert_array_equal(answer['what'], run.sample(1, seed=3).what[0])
    drawing = {'pres': [True, True], 'where': [0, 5], 'what': [2, 3]}
    status, answer = post(url + '/api/render', json.dumps(drawing).encode())
    self.assertEqual(status, 200)
    expected = run.decode(npdraw_jax.Drawing(*([v] for v in drawing.values())))
    np.testing.assert_allclose(pixels_of(answer['decoded'][-1]), expected[0], atol=0.6 / 255)
    for path, body in (
      ('/api/test_image', b'{"index": 0}'),
      ('/api/swap', b'{"a": 0, "b": 1, "region": "top"}'),
    ):
      status, answer = post(url + path, body)
      self.assertEqual((status, path), (404, path))
      self.assertIn(f"test images cannot be read: data.source folder '{moved}'", answer['detail'])

    if not os.path.exists(CHROMIUM):
      return  # The browser test above says how to install it.
    with sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
      page = browser.new_page()
      page.goto(url)
      page.wait_for_function('Number(document.body.dataset.renders) >= 1')
      self.assertIn(moved, page.text_content('#error'))  # It opens on a prior sample.
      self.assertTrue(page.is_disabled('#encode') and page.is_disabled('#swap'))
      self.assertEqual(page.text_content('#step-label'), f'{run.num_steps} of {run.num_steps}')
      browser.close()


if __name__ == '__main__':
  absltest.main()
