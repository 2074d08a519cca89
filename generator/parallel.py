"""An ordered process-pool map: `run_ordered(fn, items, jobs, on_done)`.

    outcomes = run_ordered(infer_one, model_types, jobs=2,
                           on_done=lambda i, o: print(model_types[i], o.ok))
    specs = [o.get() for o in outcomes]          # get() re-raises an item's exception

- Outcomes come back in input order, one per item, whatever order the workers finish in;
  `on_done(index, outcome)` runs in this process, also in input order, as soon as an item and
  every item before it are done (so progress printed from it reads the same as a serial run).
- An item's exception is captured in its outcome instead of failing the pool; exceptions
  whose classes take other constructor arguments than their message (most of ours) are
  rebuilt in this process with their type, arguments and attributes. An exception raised by
  `on_done` stops the map: pending items are cancelled and the exception propagates.
- `jobs=None` uses every core this process may run on (`os.sched_getaffinity`). With
  `jobs=1`, or a single item, items run here one after another, no processes started, and
  their output goes straight through. Otherwise `fn` (a module-level function), the items
  and the values must pickle; workers are forked where the platform allows (they start with
  every module this process imported, so import the heavy ones first) and spawned elsewhere.
  What a worker writes to its stdout and stderr while it runs an item (Python-level or
  straight to file descriptors 1 and 2) is captured into that item's outcome
  (`outcome.stdout`, `outcome.stderr`, `outcome.replay()`) rather than interleaved.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = ["Outcome", "default_jobs", "run_ordered"]


@dataclass(frozen=True)
class Outcome:
    """What one item gave: its value, or the exception it raised; and, when it ran in a worker
    process, the bytes it wrote to stdout and stderr."""

    value: Any = None
    error: BaseException | None = None
    stdout: bytes = b""
    stderr: bytes = b""

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self) -> Any:
        """The value, or raise the item's exception."""
        if self.error is not None:
            raise self.error
        return self.value

    def replay(self) -> None:
        """Write the captured output to this process's stdout and stderr."""
        for stream, data in ((sys.stdout, self.stdout), (sys.stderr, self.stderr)):
            if data:
                stream.flush()
                if hasattr(stream, "buffer"):
                    stream.buffer.write(data)
                else:  # a text-only stream (e.g. a test's capture)
                    stream.write(data.decode("utf-8", "replace"))
                stream.flush()


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def run_ordered(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    jobs: int | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """`fn(item)` for every item, in worker processes; one Outcome per item, in input order."""
    items = list(items)
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(items) <= 1:
        return _run_here(fn, items, on_done)
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=_context()) as pool:
        futures = [pool.submit(_run_captured, fn, item) for item in items]
        try:
            for index, future in enumerate(futures):
                try:
                    outcome = _restore(future.result())
                except Exception as exc:  # the pool itself failed (a worker died)
                    outcome = Outcome(error=exc)
                outcomes.append(outcome)
                if on_done is not None:
                    on_done(index, outcome)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return outcomes


def _run_here(fn, items: Sequence[Any], on_done) -> list[Outcome]:
    outcomes = []
    for index, item in enumerate(items):
        try:
            outcome = Outcome(value=fn(item))
        except Exception as exc:
            outcome = Outcome(error=exc)
        outcomes.append(outcome)
        if on_done is not None:
            on_done(index, outcome)
    return outcomes


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


# -- in the worker ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shipped:
    """An exception in a form that always pickles: rebuilt by `_restore` in the parent."""

    cls: type | None
    name: str
    args: tuple
    state: dict
    message: str
    trace: str


def _run_captured(fn, item) -> Outcome:
    """Run one item with fds 1 and 2 (and sys.stdout / sys.stderr) sent to temporary files;
    never raises (but for KeyboardInterrupt / SystemExit)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        streams = sys.stdout, sys.stderr
        for stream in streams:
            stream.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (
            open(
                fd,
                "w",
                buffering=1,
                encoding=getattr(stream, "encoding", None) or "utf-8",
                errors=getattr(stream, "errors", None) or "strict",
                closefd=False,
            )
            for fd, stream in zip((1, 2), streams)
        )
        try:
            value, error = fn(item), None
        except Exception as exc:
            value, error = None, _ship(exc)
        finally:
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return Outcome(value=value, error=error, stdout=out.read(), stderr=err.read())


def _ship(exc: Exception) -> _Shipped:
    state = dict(getattr(exc, "__dict__", {}))
    shipped = _Shipped(
        type(exc),
        type(exc).__name__,
        exc.args,
        state,
        str(exc),
        "".join(traceback.format_exception(exc)),
    )
    try:
        pickle.loads(pickle.dumps(shipped))
    except Exception:  # a local class or unpicklable attributes: keep the text only
        shipped = _Shipped(None, shipped.name, (), {}, shipped.message, shipped.trace)
    return shipped


def _restore(outcome: Outcome) -> Outcome:
    shipped = outcome.error
    if not isinstance(shipped, _Shipped):
        return outcome
    if shipped.cls is not None:
        error = shipped.cls.__new__(shipped.cls)
        error.args = shipped.args
        error.__dict__.update(shipped.state)
    else:
        error = RuntimeError(f"{shipped.name}: {shipped.message}")
    error.add_note(f"raised in a worker process:\n{shipped.trace}".rstrip())
    return Outcome(outcome.value, error, outcome.stdout, outcome.stderr)
