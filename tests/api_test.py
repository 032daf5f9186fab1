"""npdraw_jax.api on a quickly trained tiny run: the README's example, rendering
against NumPy, the drawing process, encodings, edits, checks and compile reuse."""

import hashlib
import os
import re
import tempfile

import jax
import numpy as np
import pytest
import tiny_run
from absl.testing import absltest

import npdraw_jax
from npdraw_jax import errors

pytestmark = pytest.mark.slow  # Tens of seconds: not in the quick loop (-m "not slow").


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_and_contents(directory):
  """{relative path: sha256 of the contents (None for a directory)} under directory."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return found


def numpy_render(parts, grid, pres, where, what):
  """Reference renderer: the max over drawn steps of each part pasted at its
  location's corner, clipped at the border, one drawing [S] at a time."""
  side, p = grid.canvas_size, grid.patch_size
  canvas = np.zeros((side, side, parts.shape[-1]), np.float32)
  for drawn, location, part in zip(pres, where, what, strict=True):
    if drawn:
      row, col = divmod(int(location), grid.side)
      top, left = row * grid.stride, col * grid.stride
      h, w = min(p, side - top), min(p, side - left)
      patch = canvas[top : top + h, left : left + w]
      np.maximum(patch, parts[part][:h, :w], out=patch)
  return canvas


class ApiTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tiny_run.trained_run()
    before = files_and_contents(cls.workdir)
    cls.trained = npdraw_jax.load_run(cls.workdir)
    cls.files_changed = before != files_and_contents(cls.workdir)
    cls.images = cls.trained.test_images([3, 17, 5])

  def test_loading_only_reads_the_run(self):
    self.assertFalse(self.files_changed)

  def test_readme_example_runs_as_written(self):
    with open(os.path.join(REPO, 'README.md')) as f:
      readme = f.read()
    section = readme[readme.index('## Python API and the interactive page') :]
    (code,) = re.findall(r'```python\n(.*?)```', section.split('\n## ')[0], re.DOTALL)
    self.assertIn("load_run('runs/mnist')", code)
    namespace = {}
    exec(compile(code.replace('runs/mnist', self.workdir), 'README.md', 'exec'), namespace)
    self.assertEqual(namespace['changed'].shape, (2, 16, 16, 1))
    self.assertEqual(namespace['samples'].pres.shape, (8, 16))

  def test_render_matches_numpy_and_frames_build_up_to_it(self):
    run, rng = self.trained, np.random.default_rng(0)
    # Five steps: not a multiple of T, so the padding of steps is exercised.
    shape = (3, 5)
    drawing = npdraw_jax.Drawing(
      rng.random(shape) < 0.7,
      rng.integers(0, run.grid.num_locations, shape),
      rng.integers(0, run.num_parts, shape),
    )
    canvases = run.render(drawing)
    for n in range(3):
      expected = numpy_render(
        run.parts, run.grid, drawing.pres[n], drawing.where[n], drawing.what[n]
      )
      np.testing.assert_allclose(canvases[n], expected, atol=1e-6)
    frames = run.frames(drawing)
    self.assertEqual(frames.canvases.shape, (3, 5, 16, 16, 1))
    self.assertEqual(frames.decoded.shape, (3, 5, 16, 16, 1))
    np.testing.assert_allclose(frames.canvases[:, -1], canvases, atol=1e-6)
    two_steps = (x[0, :2] for x in (drawing.pres, drawing.where, drawing.what))
    np.testing.assert_allclose(
      frames.canvases[0, 1], numpy_render(run.parts, run.grid, *two_steps), atol=1e-6
    )
    np.testing.assert_allclose(frames.decoded[:, -1], run.decode(drawing), atol=1e-5)

  def test_encoding_is_the_mode_of_its_probabilities(self):
    encoding = self.trained.encode(self.images)
    drawing, (n, t) = encoding.drawing, encoding.pres_prob.shape
    self.assertEqual((n, t), (3, self.trained.num_steps))
    np.testing.assert_allclose(encoding.where_prob.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(encoding.what_prob.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(drawing.pres, encoding.pres_prob > 0.5)
    np.testing.assert_array_equal(drawing.where, encoding.where_prob.argmax(-1))
    np.testing.assert_array_equal(drawing.what, encoding.what_prob.argmax(-1))
    # One image alone gives the same drawing as in a batch (padding is inert).
    alone = self.trained.encode(self.images[1:2]).drawing
    np.testing.assert_array_equal(alone.what, drawing.what[1:2])
    np.testing.assert_allclose(
      self.trained.reconstruct(self.images), self.trained.decode(drawing), atol=1e-6
    )

  def test_whole_and_empty_regions_give_b_and_a(self):
    run = self.trained
    a, b = run.encode(self.images[:2]).drawing[0], run.encode(self.images[:2]).drawing[1]
    whole = run.edit(self.images[0], self.images[1], (0, 0, 16, 16))
    np.testing.assert_allclose(whole.canvas, run.render(b)[0], atol=1e-6)
    np.testing.assert_allclose(whole.decoded, run.decode(b)[0], atol=1e-5)
    self.assertEqual((whole.parts_from_a, whole.parts_from_b), (0, int(b.pres.sum())))
    empty = run.edit(self.images[0], self.images[1], '0,0,0,0')
    np.testing.assert_allclose(empty.decoded, run.decode(a)[0], atol=1e-5)
    self.assertEqual(empty.drawing.pres.shape, (1, 2 * run.num_steps))

  def test_samples_are_repeatable_and_within_range(self):
    run = self.trained
    first, again = run.sample(3, seed=1), run.sample(3, seed=1)
    for name in ('pres', 'where', 'what'):
      np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    other = run.sample(3, seed=2, temperature=2.0, top_k=3)
    self.assertEqual(other.what.shape, (3, run.num_steps))
    self.assertTrue(np.any(first.what != other.what) or np.any(first.pres != other.pres))
    self.assertTrue(0 <= other.where.min() and other.where.max() < run.grid.num_locations)

  def test_calls_of_similar_sizes_reuse_the_compiled_functions(self):
    run = self.trained
    traces = []

    def count_traces(event, duration, **kwargs):
      del duration, kwargs
      if event == '/jax/core/compile/jaxpr_trace_duration':
        traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(count_traces)
    self.addCleanup(jax.monitoring.unregister_event_duration_listener, count_traces)
    images = np.concatenate([self.images] * 3)  # 9 test images.
    run.decode(run.encode(images[:5]).drawing)  # Compiled for a batch of 8 (no other test's).
    self.assertNotEmpty(traces)  # The listener hears the traces of a first call.
    traces.clear()
    run.decode(run.encode(images[:7]).drawing)  # Padded to the same batch of 8.
    self.assertEqual(traces, [])
    run.decode(run.encode(images).drawing)  # 9 rows: a batch of 16, traced anew.
    self.assertNotEmpty(traces)

  def test_bad_inputs_are_clear_errors(self):
    run, drawing = self.trained, self.trained.encode(self.images[:1]).drawing
    with self.assertRaisesRegex(ValueError, r'Expected images \[N, 16, 16, 1\]'):
      run.encode(self.images[0])
    with self.assertRaisesRegex(ValueError, r'\[0, 1\]'):
      run.encode(self.images * 2)
    with self.assertRaisesRegex(ValueError, r'what must lie in \[0, 16\)'):
      run.decode(npdraw_jax.Drawing(drawing.pres, drawing.where, drawing.what + 16))
    with self.assertRaisesRegex(ValueError, r'where must lie in \[0, 16\)'):
      run.render(npdraw_jax.Drawing(drawing.pres, drawing.where - 20, drawing.what))
    with self.assertRaisesRegex(ValueError, 'one shape'):
      npdraw_jax.Drawing(drawing.pres, drawing.where[:, :3], drawing.what)
    with self.assertRaisesRegex(ValueError, 'A region is one of'):
      run.edit(self.images[0], self.images[1], 'middle')
    with self.assertRaisesRegex(ValueError, 'temperature must be positive'):
      run.sample(1, seed=0, temperature=0)

  def test_missing_stages_are_named(self):
    empty = tempfile.mkdtemp()
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the vae stage'):
      npdraw_jax.load_run(empty)
    self.assertEqual(os.listdir(empty), [])
    with self.assertRaisesRegex(errors.MissingArtifactError, 'no such directory'):
      npdraw_jax.load_run(os.path.join(empty, 'absent'))


if __name__ == '__main__':
  absltest.main()
