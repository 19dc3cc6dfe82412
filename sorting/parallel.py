"""Where the batch verbs' parallel work runs: local processes (joblib) or a Dask cluster.

The batch verbs (``train``, ``predict``, ``evaluate``, ``select``, ``adapt``, ``compare``) cut
their work into independent tasks (chunks of rocks for the features, folds for the
cross-validation) and hand them to :func:`imap`, which yields the results in task order.

- Locally (the default) the tasks run in joblib's process pool (loky), ``jobs`` processes
  (``-1``: every core the process may use); ``jobs=1`` runs them in this process.
- With ``scheduler="tcp://HOST:PORT"`` they run on that Dask cluster through joblib's Dask
  backend (``dask.distributed``, the optional extra ``sorting[cluster]``). The workers must
  see the dataset at the same path (a shared file system) and run the same ``sorting``.

Results are the same whichever runs them: every task is a pure function of its inputs.
At most ``2 x workers`` tasks are in flight, so memory stays bounded however many tasks there
are.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sorting.errors import InputError

#: how long to wait for a Dask scheduler before giving up (exit 2)
CONNECT_TIMEOUT_S = 10.0


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


@dataclass(frozen=True)
class Workers:
    """How to run parallel work: ``jobs`` local processes (``-1`` = every core, ``1`` = in
    this process) or, when ``scheduler`` is set, the Dask cluster at that address."""

    jobs: int = -1
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.jobs == 0 or self.jobs < -1:
            raise ValueError(f"jobs must be >= 1 or -1 (every core), got {self.jobs}")
        if self.scheduler is not None and not self.scheduler.startswith(("tcp://", "tls://", "inproc://")):
            raise ValueError(f"scheduler {self.scheduler!r} is not an address like tcp://HOST:PORT")

    @property
    def local_jobs(self) -> int:
        return cpu_count() if self.jobs == -1 else self.jobs

    def describe(self) -> str:
        if self.scheduler:
            return f"dask cluster {self.scheduler}"
        n = self.local_jobs
        return f"{n} local process{'es' if n > 1 else ''}" if n > 1 else "1 process"


@contextlib.contextmanager
def opencv_threads(n: int) -> Iterator[None]:
    """OpenCV's own thread pool (not a BLAS one: threadpoolctl does not see it) at ``n``, and
    back to what it was afterwards. Process-wide: for single-threaded callers."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def workers_from_args(args: Any) -> Workers:
    """The ``--jobs`` / ``--scheduler`` options of a verb (InputError naming the option)."""
    jobs = getattr(args, "jobs", -1)
    scheduler = getattr(args, "scheduler", None)
    if jobs == 0 or jobs < -1:
        raise InputError("--jobs", f"must be >= 1, or -1 for every core; got {jobs}")
    if scheduler is not None and not scheduler.startswith(("tcp://", "tls://")):
        raise InputError("--scheduler", f"{scheduler!r} is not a Dask scheduler address like tcp://HOST:PORT")
    return Workers(jobs, scheduler)


@contextlib.contextmanager
def _dask_backend(address: str) -> Iterator[int]:
    try:
        import joblib
        from distributed import Client
    except ImportError:
        raise InputError("--scheduler", "needs dask.distributed: pip install 'sorting[cluster]'") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise InputError("--scheduler", f"cannot reach the Dask scheduler at {address} within "
                                        f"{CONNECT_TIMEOUT_S:g} s ({str(exc).splitlines()[0][:120]})") from None
    try:
        threads = sum(client.nthreads().values()) or 1
        with joblib.parallel_config(backend="dask"):
            yield threads
    finally:
        client.close()


def imap(fn: Callable[..., Any], tasks: Iterable[tuple], workers: Workers = Workers(1)) -> Iterator[Any]:
    """``fn(*task)`` for every task, yielded in task order.

    ``fn`` must be a module-level function (it is pickled to the workers) and its tasks
    independent. With one local job everything runs here, without a pool.
    """
    if workers.scheduler is None and workers.local_jobs == 1:
        for t in tasks:
            yield fn(*t)
        return
    from joblib import Parallel, delayed

    if workers.scheduler is not None:
        with _dask_backend(workers.scheduler) as n:
            yield from Parallel(n_jobs=n, return_as="generator", pre_dispatch="2*n_jobs")(
                delayed(fn)(*t) for t in tasks)
        return
    yield from Parallel(n_jobs=workers.local_jobs, backend="loky", return_as="generator",
                        pre_dispatch="2*n_jobs")(delayed(fn)(*t) for t in tasks)
