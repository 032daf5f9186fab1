"""The library's imports run one way: parsed from the source, checked for cycles
and for imports that reach up a layer.

Layers, bottom to top (README, "Layout"), one per package: errors.py, which
everyone may use; model/, the mathematics and networks; infra/, what runs them
(data, run directory, checkpoints, sharding, the train loop, pictures);
stages/, the pipeline; api.py, a finished run as Python objects; the commands
(baseline_vae, convert_authors, convert_inception). A module may import its own
layer and the layers below. A command line's own block
(`if __name__ == '__main__':`) may import the launcher in experiments/.
"""

import ast
import pathlib

from absl.testing import absltest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'npdraw_jax'
LAYERS = (
  ('leaves', {'errors'}),
  ('model', {'model'}),
  ('infrastructure', {'infra'}),
  ('stages', {'stages'}),
  ('api', {'api'}),
  ('commands', {'baseline_vae', 'convert_authors', 'convert_inception'}),
)
LAYER_OF = {group: rank for rank, (_, groups) in enumerate(LAYERS) for group in groups}


def module_name(path: pathlib.Path) -> str:
  """npdraw_jax/model/nets/prior.py -> 'model.nets.prior'; npdraw_jax/api.py -> 'api'."""
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def group_of(module: str) -> str:
  """The layer group of a module: its package ('model.nets.prior' -> 'model')."""
  return module.split('.')[0]


def _is_main_block(node: ast.AST) -> bool:
  test = getattr(node, 'test', None)
  return (
    isinstance(node, ast.If)
    and isinstance(test, ast.Compare)
    and isinstance(test.left, ast.Name)
    and test.left.id == '__name__'
  )


def imports_of(path: pathlib.Path) -> set[str]:
  """Top-level module names of npdraw_jax, experiments and configs that `path`
  imports anywhere (functions included), except in its `__main__` block."""
  tree = ast.parse(path.read_text())
  main_blocks = [node for node in tree.body if _is_main_block(node)]
  skipped = {id(n) for block in main_blocks for n in ast.walk(block)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.ImportFrom) and node.module:
      names = [f'{node.module}.{alias.name}' for alias in node.names]
    elif isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    else:
      continue
    for name in names:
      top, _, rest = name.partition('.')
      if top in ('experiments', 'configs'):
        found.add(top)
      elif top == 'npdraw_jax' and rest:
        found.add(rest)
  return found


def import_graph() -> dict[str, set[str]]:
  """module -> the library modules it imports (names as module_name gives them)."""
  modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for module, path in modules.items():
    targets = set()
    for name in imports_of(path):
      # `from npdraw_jax.model.nets import prior` names model.nets.prior; `from
      # npdraw_jax.model.trained import Drawing` names model.trained.Drawing:
      # keep the longest prefix that is a module.
      while name not in modules and '.' in name:
        name = name.rsplit('.', 1)[0]
      targets.add(name)
    graph[module] = targets - {module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 'open':
        return stack[stack.index(target) :] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


class ImportsTest(absltest.TestCase):
  def test_every_module_has_a_layer(self):
    unplaced = sorted(m for m in import_graph() if m and group_of(m) not in LAYER_OF)
    self.assertEqual(unplaced, [], 'Place new modules in a layer of LAYERS (and the README).')

  def test_no_import_cycle(self):
    self.assertIsNone(find_cycle(import_graph()))

  def test_no_import_reaches_up_a_layer(self):
    upward = []
    for module, targets in import_graph().items():
      if not module:
        continue  # npdraw_jax/__init__.py: the public names, from any layer.
      for target in targets:
        if target in ('experiments', 'configs'):
          upward.append(f'{module} -> {target}')
        elif LAYER_OF.get(group_of(target), -1) > LAYER_OF[group_of(module)]:
          upward.append(f'{module} -> {target}')
    self.assertEqual(sorted(upward), [])

  def test_the_checks_can_fail(self):
    # A hand-made graph with a cycle and an upward edge.
    graph = {'model.canvas': {'model.npdraw'}, 'model.npdraw': {'model.canvas'}}
    self.assertEqual(find_cycle(graph), ['model.canvas', 'model.npdraw', 'model.canvas'])
    self.assertGreater(LAYER_OF[group_of('stages.train_vae')], LAYER_OF[group_of('model.npdraw')])
    self.assertIn('model.trained', imports_of(PACKAGE / 'stages' / 'evaluate.py'))
    self.assertNotIn('experiments', imports_of(PACKAGE / 'convert_authors.py'))


if __name__ == '__main__':
  absltest.main()
