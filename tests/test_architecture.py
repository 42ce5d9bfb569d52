"""The layering the code promises (README, "Layout"), read from the imports:
the shared training core never reaches up to the stages, the library never
reaches into configs/, no two modules import each other in a circle, and the
training package stays in files a reader takes in at once."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the research package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, 'research')):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(dirpath, f)
  return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
  """Every module `path` imports, at any depth of the file (function-level imports too)."""
  package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:  # `from pkg import mod` imports pkg.mod when that is a module
        out.add(f'{base}.{a.name}' if f'{base}.{a.name}' in known else base)
  return out


@pytest.fixture(scope='module')
def graph():
  mods = _modules()
  return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def test_training_core_does_not_import_stages(graph):
  bad = {m: sorted(i for i in imps if i.startswith('research.stages'))
         for m, imps in graph.items() if m.startswith('research.training')}
  assert not {m: v for m, v in bad.items() if v}


def test_research_does_not_import_configs(graph):
  bad = {m: sorted(i for i in imps if i == 'configs' or i.startswith('configs.')) for m, imps in graph.items()}
  assert not {m: v for m, v in bad.items() if v}


def test_stages_do_not_import_each_other(graph):
  bad = {m: sorted(i for i in imps if i.startswith('research.stages.') and i != m)
         for m, imps in graph.items() if m.startswith('research.stages.')}
  assert not {m: v for m, v in bad.items() if v}


def test_no_import_circles(graph):
  """Depth-first search for a cycle among research modules (a package's own
  __init__ is not counted as imported by its submodules)."""
  edges = {m: {i for i in imps if i in graph and i != m} for m, imps in graph.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(edges[m]):
      if state.get(n) == 'open':
        raise AssertionError('import circle: ' + ' -> '.join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 'done'

  for m in sorted(edges):
    if m not in state:
      visit(m)


def test_training_files_stay_under_300_lines():
  folder = os.path.join(ROOT, 'research', 'training')
  sizes = {f: sum(1 for _ in open(os.path.join(folder, f))) for f in os.listdir(folder) if f.endswith('.py')}
  assert max(sizes.values()) <= 300, sizes


def test_the_checker_sees_circles_and_function_level_imports(tmp_path):
  """The graph reader itself: a deferred import inside a function counts."""
  path = tmp_path / 'm.py'
  path.write_text('def f():\n  from research.stages import dpo\n  import configs.base\n')
  assert _imports(str(path), 'research.training.m', {'research.stages.dpo'}) == {'research.stages.dpo', 'configs.base'}
