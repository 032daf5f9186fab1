"""experiments.explore served on a tiny run and driven by headless Chromium: a part
change and a region swap show the decoded images the API computes; bad requests
get a 4xx and the server keeps serving."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tiny_run
from absl.testing import absltest
from PIL import Image
from playwright.sync_api import sync_playwright

import npdraw_jax

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
    cls.url = f'http://127.0.0.1:{free_port()}'
    cls.log = tempfile.TemporaryFile('w+')
    cls.addClassCleanup(cls.log.close)
    command = [sys.executable, '-m', 'experiments.explore', f'--workdir={cls.workdir}']
    cls.server = subprocess.Popen(
      [*command, f'--port={cls.url.rsplit(":", 1)[1]}'],
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


if __name__ == '__main__':
  absltest.main()
