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
from npdraw_jax.infra import input_pipeline

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
    traces = self.count_traces()
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

  def count_traces(self) -> list[str]:
    """The JAX traces from now until the test ends, as they happen."""
    traces = []

    def count(event, duration, **kwargs):
      del duration, kwargs
      if event == '/jax/core/compile/jaxpr_trace_duration':
        traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    self.addCleanup(jax.monitoring.unregister_event_duration_listener, count)
    return traces

  def test_drawings_take_integers_in_range_before_any_cast(self):
    pres, where, what = [[True, True]], [[1, 2]], [[0, 3]]
    # Each would have been wrapped, truncated or converted by a cast to int32 or bool.
    for name, values in (('where', [[2**32 + 3, 1]]), ('what', [[-(2**32), 0]])):
      for given in (values, np.asarray(values, np.int64)):
        steps = {'where': where, 'what': what, name: given}
        with self.assertRaisesRegex(ValueError, rf'{name} must lie in \[-2147483648, '):
          npdraw_jax.Drawing(pres, steps['where'], steps['what'])
    for odd in ([[3.0, 1]], np.asarray([[3.0, 1]]), [[True, 1]], [[10**20 * 1.0, 1]], [['3', 1]]):
      with self.assertRaisesRegex(ValueError, 'where must hold integers'):
        npdraw_jax.Drawing(pres, odd, what)
    with self.assertRaisesRegex(ValueError, 'pres must hold bools'):
      npdraw_jax.Drawing([[0.5, 1.0]], where, what)
    with self.assertRaisesRegex(ValueError, 'pres must hold bools'):
      npdraw_jax.Drawing([[2, 1]], where, what)
    # Integers of any width, bools as 0 and 1, arrays from JAX: the same drawing.
    same = npdraw_jax.Drawing(
      np.asarray([[1, 1]], np.uint8), np.asarray(where, np.int64), jax.numpy.asarray(what)
    )
    for name, expected in (('pres', pres), ('where', where), ('what', what)):
      np.testing.assert_array_equal(getattr(same, name), expected)
    self.assertEqual(same.where.dtype, np.int32)
    self.assertEqual(same.pres.dtype, bool)

  def test_sample_checks_its_arguments_before_any_cast(self):
    run = self.trained
    bad = [
      ({'n': 2.5}, 'n must be an integer'),
      ({'n': True}, 'n must be an integer'),
      ({'n': 0}, r'n must lie in \[1, '),
      ({'seed': 1.5}, 'seed must be an integer'),
      ({'seed': True}, 'seed must be an integer'),
      ({'seed': 2**64}, r'seed must lie in \[0, 4294967296\)'),
      ({'seed': 2**32}, r'seed must lie in \[0, 4294967296\)'),  # Would wrap to seed 0.
      ({'seed': -1}, r'seed must lie in \[0, 4294967296\)'),  # Would wrap to 2**32 - 1.
      ({'temperature': float('nan')}, 'temperature must be positive and finite'),
      ({'temperature': 10**400}, 'temperature must be positive and finite'),
      ({'temperature': '1'}, 'temperature must be a number'),
      ({'top_k': 2.5}, 'top_k must be an integer'),
      ({'top_k': True}, 'top_k must be an integer'),
      ({'top_k': 0}, r'top_k must lie in \[1, '),
      ({'top_k': 2**64}, r'top_k must lie in \[1, '),
    ]
    for change, message in bad:
      arguments = {'n': 1, 'seed': 0, **change}
      with self.subTest(**{k: repr(v)[:20] for k, v in change.items()}):
        with self.assertRaisesRegex(ValueError, message):
          run.sample(arguments.pop('n'), **arguments)
    # The ends of the seeds' range: 2**32 distinct keys.
    last, first = run.sample(2, seed=2**32 - 1), run.sample(2, seed=np.uint32(0))
    self.assertFalse(
      np.array_equal(last.what, first.what) and np.array_equal(last.pres, first.pres)
    )

  def test_top_k_of_max_k_l_or_more_keeps_all_and_shares_its_sampler(self):
    run = self.trained
    keep_all = max(run.num_parts, run.grid.num_locations)
    expected = run.sample(2, seed=4)
    traces = self.count_traces()
    for top_k in (keep_all, 10**6, 2**31 - 1):
      drawing = run.sample(2, seed=4, top_k=top_k)
      for name in ('pres', 'where', 'what'):
        np.testing.assert_array_equal(getattr(drawing, name), getattr(expected, name))
    self.assertEqual(traces, [])  # None's sampler, not one sampler per k.
    run.sample(2, seed=4, top_k=keep_all - 1)  # A k that keeps less is another sampler.
    self.assertNotEmpty(traces)

  def test_samplers_kept_are_bounded_the_least_recently_used_dropped(self):
    run = self.trained
    self.addCleanup(setattr, run, 'max_samplers', run.max_samplers)
    run.max_samplers = 2
    for top_k in (2, 3, 2):  # 2 is now the most recently used.
      run.sample(1, seed=0, top_k=top_k)
    traces = self.count_traces()
    run.sample(1, seed=0, top_k=4)  # Compiled anew; drops 3's sampler.
    self.assertNotEmpty(traces)
    traces.clear()
    run.sample(1, seed=0, top_k=2)
    self.assertEqual(traces, [])  # Kept.
    run.sample(1, seed=0, top_k=3)
    self.assertNotEmpty(traces)  # Dropped, compiled again.

  def test_test_image_rows_are_integers_of_the_split(self):
    run = self.trained
    np.testing.assert_array_equal(run.test_images(np.int64(17)), self.images[1:2])
    for rows in ([True], [1.0], [2**64], [-1], [run.num_test_images], 3.0):
      with self.assertRaisesRegex(ValueError, 'rows must'):
        run.test_images(rows)

  def test_a_run_without_its_data_samples_and_decodes_and_names_the_data(self):
    run = self.trained
    alone = tiny_run.without_data(run)
    moved = alone.config.data.source.removeprefix('folder:')
    drawing = alone.sample(1, seed=3)
    np.testing.assert_array_equal(drawing.what, run.sample(1, seed=3).what)
    np.testing.assert_allclose(alone.decode(drawing), run.decode(drawing), atol=1e-6)
    for use in (lambda: alone.num_test_images, lambda: alone.test_images([0])):
      with self.assertRaisesRegex(input_pipeline.DataError, f'test images cannot be read.*{moved}'):
        use()

  def test_missing_stages_are_named(self):
    empty = tempfile.mkdtemp()
    with self.assertRaisesRegex(errors.MissingArtifactError, 'run the vae stage'):
      npdraw_jax.load_run(empty)
    self.assertEqual(os.listdir(empty), [])
    with self.assertRaisesRegex(errors.MissingArtifactError, 'no such directory'):
      npdraw_jax.load_run(os.path.join(empty, 'absent'))


if __name__ == '__main__':
  absltest.main()
