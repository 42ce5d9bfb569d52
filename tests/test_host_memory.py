"""Huge pages for host memory (research/training/host_memory.py): when the entry
points turn them on, that research.main re-executes itself with them, and that
they remove the page faults of XLA:CPU's per-step scratch buffer."""

import os
import subprocess
import sys

import pytest

from research.training import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = dict(libc=('glibc', '2.36'), thp_mode='madvise', jax_on_cpu=True)


@pytest.mark.parametrize('env, facts, expected', [
    ({}, {}, host_memory.TUNABLE),
    ({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}, {}, f'glibc.malloc.tcache_count=0:{host_memory.TUNABLE}'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, {}, None),  # the user's own choice stands
    ({'RESEARCH_HUGE_PAGES': 'off'}, {}, None),
    ({}, dict(libc=('glibc', '2.31')), None),  # before the tunable existed
    ({}, dict(libc=('', '')), None),  # musl, macOS
    ({}, dict(thp_mode='never'), None),
    ({}, dict(thp_mode='always'), host_memory.TUNABLE),
    ({}, dict(jax_on_cpu=False), None),  # auto leaves accelerator hosts alone
    ({'RESEARCH_HUGE_PAGES': 'on'}, dict(jax_on_cpu=False), host_memory.TUNABLE),
])
def test_huge_pages_env_adds_the_tunable_only_where_it_applies(env, facts, expected):
  out = host_memory.huge_pages_env({'PATH': '/bin', **env}, **{**HOST, **facts})
  if expected is None:
    assert out is None
  else:
    assert out == {'PATH': '/bin', **env, 'GLIBC_TUNABLES': expected}


def test_a_bad_setting_is_refused():
  with pytest.raises(ValueError, match='RESEARCH_HUGE_PAGES'):
    host_memory.huge_pages_env({'RESEARCH_HUGE_PAGES': 'yes'}, **HOST)


def _host_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'RESEARCH_HUGE_PAGES')}
  return {**env, **extra}


needs_huge_pages = pytest.mark.skipif(host_memory.huge_pages_env(_host_env()) is None,
                                      reason='no glibc >= 2.35 with transparent huge pages on this host')

_RECORD_CONFIG = '''
import os
def get_config(arg=None):
  with open({path!r}, 'w') as f:
    f.write(f"{{os.getpid()}} {{os.environ.get('GLIBC_TUNABLES', '')}}")
  raise ValueError('recorded')
'''


@needs_huge_pages
@pytest.mark.parametrize('setting', ['auto', 'off'])
def test_main_reexecutes_itself_with_huge_pages(tmp_path, setting):
  record = tmp_path / 'record.txt'
  config = tmp_path / 'record_config.py'
  config.write_text(_RECORD_CONFIG.format(path=str(record)))
  proc = subprocess.Popen([sys.executable, '-m', 'research.main', f'--config={config}', f'--workdir={tmp_path / "w"}'],
                          cwd=ROOT, env=_host_env(RESEARCH_HUGE_PAGES=setting),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2 and 'recorded' in err, err  # the config's error, as one line
  pid, _, tunables = record.read_text().partition(' ')
  assert int(pid) == proc.pid  # the same process, re-executed
  assert (host_memory.TUNABLE in tunables.split(':')) == (setting == 'auto')


_FAULTS = '''
import resource
import jax, jax.numpy as jnp
# An elementwise chain over 64 MiB: its intermediates are scratch space that
# XLA:CPU allocates for every call, as a train step's are.
f = jax.jit(lambda x: jnp.sum(jnp.exp(jnp.sin(x) * 2.0) + jnp.cos(x) * x, axis=0))
x = jnp.ones((4096, 4096))
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
'''


@needs_huge_pages
def test_huge_pages_remove_the_page_faults_of_per_call_scratch_space():
  faults = {}
  for setting in ('off', 'on'):
    env = host_memory.huge_pages_env(_host_env(RESEARCH_HUGE_PAGES=setting)) or _host_env()
    env.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None)  # the production compile's buffers
    out = subprocess.run([sys.executable, '-c', _FAULTS], env=env, capture_output=True, text=True, check=True)
    faults[setting] = float(out.stdout.split()[-1])
  # Without huge pages each call faults its 4 KiB pages in (measured: thousands);
  # with them, 512 times fewer pages.
  assert faults['off'] > 4000, faults
  assert faults['on'] < faults['off'] / 10, faults
