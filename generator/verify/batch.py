"""Verifying many model types: one worker process per core, results in input order.

Each model type runs in a worker (spawned, so a model that crashes its process or leaks global
state cannot take the others with it); a worker that dies is reported as a failed check of that
type. With one job everything runs in this process.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _verify_one(model_type: str, out: str):
    from . import Check, verify_model_type

    try:
        return verify_model_type(model_type, Path(out))
    except Exception as exc:  # a descriptor that does not even load is a failed check
        return [Check("load descriptor", False, f"{type(exc).__name__}: {exc}")]


def _bar(done: int, total: int, label: str) -> str:
    width = 30
    filled = width * done // max(total, 1)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"[:120]


def verify_many(
    model_types: list[str],
    out: Path,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list]:
    """{model type: its checks} for every type, whatever happens to the others."""
    from . import Check

    jobs = min(jobs or default_jobs(), max(1, len(model_types)))
    tty = sys.stderr.isatty()
    results: dict[str, list] = {}

    def report(model_type: str, checks: list) -> None:
        results[model_type] = checks
        bad = sum(not c.ok for c in checks)
        verdict = "ok" if not bad else f"{bad} check(s) failed"
        if tty:
            sys.stderr.write(_bar(len(results), len(model_types), f"{model_type}: {verdict}"))
            sys.stderr.flush()
        elif progress is not None:
            progress(f"[{len(results)}/{len(model_types)}] {model_type}: {verdict}")

    if jobs == 1:
        for t in model_types:
            report(t, _verify_one(t, str(out)))
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_verify_one, t, str(out)): t for t in model_types}
            for future in as_completed(futures):
                t = futures[future]
                try:
                    checks = future.result()
                except Exception as exc:  # the worker died (a crash, not a failed check)
                    checks = [Check("worker", False, f"{type(exc).__name__}: {exc}")]
                report(t, checks)
    if tty:
        sys.stderr.write("\n")
    return {t: results[t] for t in model_types}
