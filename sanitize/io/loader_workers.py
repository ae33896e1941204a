"""DataLoader workers that never outlive the process that started them.

PyTorch's workers notice a dead parent only when they next poll for work (every 5 s,
and not while they are inside a dataset's iterator), so after a `kill -9` of the
main process they can keep decoding images for a while. `exit_with_parent(pid)`
makes a worker exit as soon as its parent dies: on Linux the kernel sends it
SIGKILL (`prctl(PR_SET_PDEATHSIG)`); elsewhere a small thread in the worker polls
the parent's pid. The kernel's signal follows the *thread* that started the worker,
so it is only asked for when `exit_with_parent()` is called on the main thread (call
it where the loader is iterated); from any other thread the worker polls instead.

Workers start from a fork server (`worker_context()`), not by forking the caller: by the
time a loader starts, the caller runs threads (torch's and faiss's OpenMP pools, DuckDB's
workers, tqdm's monitor), and a fork copies their locks in whatever state they were in,
which crashed a worker with a segmentation fault now and then. The server is a fresh
single-threaded process that has imported torch once, so each worker still starts in
milliseconds.

    DataLoader(..., multiprocessing_context=worker_context(), worker_init_fn=exit_with_parent())
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
# Imported once in the fork server, so that workers forked from it start warm.
SERVER_PRELOAD = ["torch", "numpy", "PIL.Image", "sanitize.train.batches", "sanitize.stages.embed"]


def _ask_kernel() -> bool:
    """Ask Linux to SIGKILL this process when its parent thread dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int, direct: bool) -> None:
    while (os.getppid() == parent) if direct else _alive(parent):
        time.sleep(POLL_SECONDS)
    os._exit(1)


def _init(parent: int, kernel: bool, worker_id: int = 0) -> None:
    if os.getppid() != parent and _alive(parent):
        # Started through a fork server (its child, not the caller's): watch the caller by pid.
        threading.Thread(target=_watch, args=(parent, False), daemon=True, name="exit-with-parent").start()
        return
    if not (kernel and _ask_kernel()):
        threading.Thread(target=_watch, args=(parent, True), daemon=True, name="exit-with-parent").start()
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def exit_with_parent(parent: int | None = None) -> functools.partial:
    """A picklable `worker_init_fn` for DataLoader: the worker exits when process
    `parent` (default: the caller) is gone."""
    main = threading.current_thread() is threading.main_thread()
    return functools.partial(_init, os.getpid() if parent is None else parent, main)


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method for DataLoader workers: a fork server where the platform has one
    (Linux, macOS), spawn elsewhere; either way no worker inherits the caller's threads."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(SERVER_PRELOAD)
    return context
