"""Test setup: 8 fake CPU devices, a small offline corpus, tiny configs."""

import os

# A test marked `production_compile` runs in a child pytest with this variable set: training's settings.
PRODUCTION_COMPILE = os.environ.get('RESEARCH_TESTS_PRODUCTION_COMPILE') == '1'
# XLA:CPU's default code generator for fusions (its MLIR "fusion emitters") spends about 60 ms on
# each program however tiny, and the tests' programs are tiny and compile-bound: with the older
# emitters the in-process tests take 20-50% less time (the whole suite 18% less), with the same
# results at the tests' tolerances. Training keeps the default: on the benchmark's step, fully
# optimised, it compiles 2x faster and runs 7-10% faster.
TEST_XLA_FLAGS = '' if PRODUCTION_COMPILE else '--xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS for a process of the tests: the caller's, the tests' own and, unless
  `devices` is None (research.main then asks for the fake devices its mesh needs),
  that many CPU devices."""
  user = os.environ.get('RESEARCH_TESTS_USER_XLA_FLAGS', '')
  count = '' if devices is None else f' --xla_force_host_platform_device_count={devices}'
  return f'{user} {TEST_XLA_FLAGS}{count}'.strip()


def run_env(devices: int | None = None, **extra: str) -> dict:
  """os.environ for a run a test starts as a subprocess, with xla_flags(devices)
  (and `extra` variables set)."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(devices), **extra}


# Must be set before jax is imported anywhere.
os.environ.setdefault('RESEARCH_TESTS_USER_XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))
os.environ['XLA_FLAGS'] = xla_flags(8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One XLA compilation cache for the whole session: both xdist workers and every run the tests start
# as a subprocess (kill and resume, sweeps, two-process runs) inherit these variables. The same tiny
# programs are otherwise compiled again in many tests and after every restart, which is most of the
# suite's time on 2 cores. A cache key covers the program, the devices, the compile options and
# XLA_FLAGS, so a hit loads what a fresh compile would build.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # noqa: E402
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='research-tests-xla-cache-')
  os.environ['RESEARCH_TESTS_XLA_CACHE_OWNER'] = str(os.getpid())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The tests' programs are tiny: XLA spends longer optimising them than running them, so tests (and
# the runs they start) compile with jax's public switch for that. It changes float32 rounding, not
# results; a test whose tolerance sits at the rounding of the production compile is marked
# `production_compile` and runs with it (see pytest_pyfunc_call below).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import functools  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402

import pytest  # noqa: E402

# A few stdlib modules: a corpus small enough to build and tokenize in a second.
_CORPUS_MODULES = ('textwrap.py', 'string.py', 'bisect.py', 'heapq.py', 'colorsys.py', 'shlex.py',
                   'fnmatch.py', 'glob.py', 'keyword.py', 'queue.py', 'sched.py', 'this.py')


def pytest_configure(config):
  """Registers the `production_compile` marker."""
  config.addinivalue_line('markers', 'production_compile: compile as training does, in a child pytest '
                          '(the tolerance is at the rounding of that compile)')


@pytest.fixture(autouse=True)
def _xdist_groups_hold(request):
  """Fails a test whose `xdist_group` mark does not group it: each xdist worker
  would then rebuild the module fixtures the marks keep on one worker (trained runs)."""
  if (getattr(request.config.option, 'loadgroup', False) and request.node.get_closest_marker('xdist_group')
      and '@' not in request.node.nodeid):
    pytest.fail('--dist loadgroup does not group this test with these pytest and pytest-xdist versions '
                '(pytest-dev/pytest-xdist#1386); install the versions `make install` pins.', pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """Runs a test marked `production_compile` in a child pytest that compiles as
  training does (XLA's optimisations and default emitters): XLA_FLAGS is read once
  per process, so this process cannot switch back to them."""
  if PRODUCTION_COMPILE or pyfuncitem.get_closest_marker('production_compile') is None:
    return None
  env = {**os.environ, 'RESEARCH_TESTS_PRODUCTION_COMPILE': '1', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '0'}
  env.pop('XLA_FLAGS')  # the child's conftest sets them from RESEARCH_TESTS_USER_XLA_FLAGS
  nodeid = pyfuncitem.nodeid.split('@')[0]  # without xdist's group suffix
  r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', nodeid],
                     cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True)
  if r.returncode:
    pytest.fail(f'{nodeid} with training\'s compile (a child pytest):\n{r.stdout[-4000:]}{r.stderr[-2000:]}',
                pytrace=False)
  return True


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
  """Directory of .txt documents copied from the standard library."""
  d = tmp_path_factory.mktemp('corpus')
  stdlib = sysconfig.get_paths()['stdlib']
  for name in _CORPUS_MODULES:
    shutil.copy(os.path.join(stdlib, name), d / (name[:-3] + '.txt'))
  return str(d)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir private to this test session."""
  return str(tmp_path_factory.mktemp('tfds'))


def make_test_config(corpus_dir, data_dir, **overrides):
  """The 'test' preset on the small corpus, with samples off; `a__b=v` sets a.b."""
  from configs import pretrain
  c = pretrain.get_config('size=test')
  c.data.name = 'files'
  c.data.files = os.path.join(corpus_dir, '*.txt')
  c.data.data_dir = data_dir
  c.sample.prompts = ()
  c.eval_batches = 2
  return set_fields(c, overrides)


def set_fields(c, overrides):
  """`c` with every `a__b=v` of overrides set as c.a.b = v."""
  for key, value in overrides.items():
    node = c
    parts = key.split('__')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


@pytest.fixture
def test_config(corpus_dir, data_dir):
  """Factory: test_config(steps=5, mesh__data=8, ...)."""
  return lambda **kw: make_test_config(corpus_dir, data_dir, **kw)


@pytest.fixture(scope='session')
def tok(corpus_dir):
  """A 512-piece tokenizer trained on the small corpus (chat markers reserved)."""
  from research.data.tokenizer import train_tokenizer
  texts = [open(os.path.join(corpus_dir, f)).read() for f in sorted(os.listdir(corpus_dir))]
  return train_tokenizer(texts, 512)


def train(config, workdir, devices=None):
  """Runs config's stage in workdir, as research.main does; returns the last metrics."""
  from research import stages
  from research.training import init, loop
  config = init.resolve_config(config)
  return loop.train(config, str(workdir), stages.get(config.stage)(config), devices=devices)


def make_trainer(config, devices=None):
  """The Trainer of config's stage."""
  from research import stages
  from research.training.trainer import Trainer
  return Trainer(config, stages.get(config.stage)(config), devices=devices)


def init_params(model, seed=0, length=4):
  """Unboxed random parameters of `model`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, length), jnp.int32))['params'])
  return nn.meta.unbox(init(jax.random.PRNGKey(seed)))


def make_grpo_config(test_config, **overrides):
  """The 'test' model on the embedded tasks' prompts, GRPO with the length reward;
  `a__b=v` sets a.b after the grpo section exists."""
  from configs import grpo
  c = test_config()
  g = grpo.get_config('size=test')
  with c.unlocked():
    c.stage, c.grpo, c.task_eval = 'grpo', g.grpo, g.task_eval
    c.data.name, c.data.text_key, c.data.files = 'sft_tasks', '', ''
  c.grpo.update(rewards=('rl_rewards:even_tokens',), reward_weights=(1.0,), max_new_tokens=8,
                num_generations=4, eval_samples=0)
  c.task_eval.exact_match = False
  c.update(seq_len=40, batch_size=16, steps=3, log_every=1, eval_every=100, checkpoint_every=100)
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 1
  return set_fields(c, overrides)


def make_ppo_config(test_config, **overrides):
  """The 'test' model with a value head on the embedded tasks' prompts, PPO with
  the even-token reward; `a__b=v` sets a.b after the ppo section exists."""
  from configs import ppo
  c = test_config()
  p = ppo.get_config('size=test')
  with c.unlocked():
    c.stage, c.ppo, c.task_eval = 'ppo', p.ppo, p.task_eval
    c.data.name, c.data.text_key, c.data.files = 'sft_tasks', '', ''
  c.model.value_head = 'shared'
  c.ppo.update(rewards=('rl_rewards:even_tokens',), reward_weights=(1.0,), max_new_tokens=8, num_generations=2)
  c.task_eval.exact_match = False
  c.update(seq_len=40, batch_size=16, steps=3, log_every=1, eval_every=100, checkpoint_every=100)
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 1
  return set_fields(c, overrides)


def step_with_accumulation(make_config, batch_fn, accums=(1, 4)):
  """One train step on the same batch per grad_accum_steps in `accums` (one
  device); batch_fn(policy) makes the batch from the first trainer's initial
  policy. Returns [(state, metrics), ...]."""
  import jax
  from research import sampling
  from research.training import init
  trainers = [make_trainer(make_config(optimizer__grad_accum_steps=a), jax.devices()[:1]) for a in accums]
  state, frozen, _ = init.setup_state(trainers[0], None)
  batch = batch_fn(sampling.Policy(trainers[0].model, state.params, lambda: frozen))
  outs = []
  for t in trainers:
    s, f, _ = init.setup_state(t, None)
    with t.mesh_context():
      outs.append(t.train_step(s, t.to_global(batch), f))
  return outs


@functools.cache
def _jitted_forward(model):
  """model.apply's logits, jitted; a flax module hashes by its fields, so equal models share one."""
  import jax
  return jax.jit(lambda params, ids: model.apply({'params': params}, ids)[0])


def full_forward(model, params, ids_BT, bucket=32):
  """model.apply's first output for unpadded ids [B, T]: the tests' reference
  forward. Jitted once per model and length: op by op, each of a few hundred
  primitives would compile again for every new length. The ids are right-padded
  to a multiple of `bucket` and the output cut back to T positions, so that a
  token-by-token reference compiles a few lengths, not one per token: in a
  causal model no position reads a later one (no test model drops tokens by
  expert capacity, the one way a later token could change an earlier one)."""
  import jax.numpy as jnp
  import numpy as np
  ids_BT = np.asarray(ids_BT, np.int32)
  T = ids_BT.shape[1]
  padded_BT = np.pad(ids_BT, ((0, 0), (0, -T % bucket)))
  return _jitted_forward(model)(params, jnp.asarray(padded_BT))[:, :T]


def reference_reward(model, params, tok, messages):
  """A score model's reward independent of the pipeline's padding, packing and
  score index: render, drop the closing <|end|>, forward the unpadded sequence,
  read the last position."""
  from research.data import chat
  ids, _ = chat.render(messages, tok, mask='completion')
  assert ids[-1] == tok.special_id('<|end|>')
  return float(full_forward(model, params, [ids[:-1]])[0, -1, 0])


def assert_same_update(a, b, rtol=1e-6):
  """Two (state, metrics) results hold the same loss and parameters (float32 rounding)."""
  import jax
  import numpy as np
  (s1, m1), (s2, m2) = a, b
  np.testing.assert_allclose(float(m1['train/loss']), float(m2['train/loss']), rtol=rtol, atol=1e-8)
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-7)


def pytest_unconfigure(config):
  """The process that made the session's compilation cache removes it."""
  del config
  if os.environ.get('RESEARCH_TESTS_XLA_CACHE_OWNER') == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
