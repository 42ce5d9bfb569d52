"""Transparent huge pages for host memory, so a CPU train step does not fault its
scratch space in again, 4 KiB at a time, on every call.

Why: XLA:CPU allocates each execution's temporaries as one buffer (712 MiB for
`make bench`'s step, 374 MiB for the tiny preset's) with posix_memalign from a
worker thread. glibc serves a block that large with mmap and unmaps it when the
step frees it, so every step maps fresh zeroed 4 KiB pages: about 96,000 page
faults per tiny step, 180,000 per benchmark step. With glibc's tunable
`glibc.malloc.hugetlb=1`, malloc asks the kernel for transparent huge pages
(madvise), 2 MiB each: the faults per step drop 180-fold, the tiny preset's training loop
runs 25% faster on a 2-core VM, and the resident size does not change
(experiments/benchmarks/RESULTS.md). Keeping freed memory instead (one arena, no
mmap: `mallopt`) was as fast but doubled the peak resident size by fragmenting.

glibc reads tunables once, at process start, so an entry point that finds the
tunable missing re-executes itself with it set (`reexec_with_huge_pages`: the
same interpreter, arguments and process id, one more environment variable).

RESEARCH_HUGE_PAGES=auto (default: on hosts where JAX runs on the CPU: no GPU or
TPU plugin installed, or JAX_PLATFORMS=cpu) | on | off. Nothing changes where
the C library is not glibc 2.35 or newer, where the kernel's transparent huge
pages are off (`never`), where GLIBC_TUNABLES already sets `glibc.malloc.hugetlb`,
or under a debugger or tracer (a re-executed process would leave it).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'  # e.g. 'always [madvise] never'


def _thp_mode() -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), '' if unknown."""
  try:
    with open(THP_ENABLED) as f:
      text = f.read()
  except OSError:
    return ''
  return text.split('[', 1)[1].split(']', 1)[0] if '[' in text else ''


def _jax_on_cpu(env: Mapping[str, str]) -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed."""
  if env.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def huge_pages_env(env: Mapping[str, str], libc: tuple[str, str] | None = None, thp_mode: str | None = None,
                   jax_on_cpu: bool | None = None) -> dict[str, str] | None:
  """`env` with glibc's huge-page tunable added to GLIBC_TUNABLES, or None when
  nothing should change (see the module docstring for when). The last three
  arguments default to this host's facts: (libc name, version), the kernel's
  THP mode and whether JAX runs on the CPU."""
  mode = env.get('RESEARCH_HUGE_PAGES', 'auto')
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f'RESEARCH_HUGE_PAGES={mode!r}: use auto, on or off')
  tunables = env.get('GLIBC_TUNABLES', '')
  if mode == 'off' or 'glibc.malloc.hugetlb' in tunables:
    return None
  name, version = libc or platform.libc_ver()
  try:
    too_old = tuple(int(v) for v in version.split('.')[:2]) < (2, 35)  # the tunable's first release
  except ValueError:
    too_old = True
  if name != 'glibc' or too_old:
    return None
  if (thp_mode if thp_mode is not None else _thp_mode()) not in ('always', 'madvise'):
    return None
  if mode == 'auto' and not (jax_on_cpu if jax_on_cpu is not None else _jax_on_cpu(env)):
    return None
  return dict(env, GLIBC_TUNABLES=f'{tunables}:{TUNABLE}' if tunables else TUNABLE)


def reexec_with_huge_pages() -> None:
  """Re-executes this process (same interpreter and arguments) with glibc's
  huge-page tunable set, when `huge_pages_env` asks for it; otherwise returns.
  Call it first thing in an entry point, before any output or open file. A bad
  RESEARCH_HUGE_PAGES ends the process with one line and status 2."""
  try:
    env = huge_pages_env(os.environ)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if env is None or sys.gettrace() is not None or not sys.orig_argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
