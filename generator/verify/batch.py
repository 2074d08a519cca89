"""Verifying many model types: worker processes (generator.parallel), results in input order.

A descriptor that does not even load, or a worker that dies, is reported as a failed check of
its type; the other types go on. With one job everything runs in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from ..parallel import run_ordered


def _verify_one(args: tuple[str, str]):
    import torch

    from . import Check, verify_model_type

    torch.set_num_threads(1)  # one process per core already
    model_type, out = args
    try:
        return verify_model_type(model_type, Path(out))
    except Exception as exc:  # a descriptor that does not even load is a failed check
        return [Check("load descriptor", False, f"{type(exc).__name__}: {exc}")]


def _bar(done: int, total: int, label: str) -> str:
    width = 30
    filled = width * done // max(total, 1)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"[:120].ljust(120)


def verify_many(
    model_types: list[str],
    out: Path,
    jobs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list]:
    """{model type: its checks} for every type, whatever happens to the others. On a terminal
    a progress bar, otherwise one line per type, on stderr."""
    from . import Check

    import transformers.modeling_utils  # noqa: F401  (imported once, before workers fork)

    tty = sys.stderr.isatty()
    results: dict[str, list] = {}

    def done(index, outcome) -> None:
        model_type = model_types[index]
        checks = outcome.value if outcome.ok else [Check("worker", False, repr(outcome.error))]
        results[model_type] = checks
        bad = sum(not c.ok for c in checks)
        verdict = "ok" if not bad else f"{bad} check(s) failed"
        if tty:
            sys.stderr.write(_bar(len(results), len(model_types), f"{model_type}: {verdict}"))
            sys.stderr.flush()
        elif progress is not None:
            progress(f"[{len(results)}/{len(model_types)}] {model_type}: {verdict}")

    run_ordered(_verify_one, [(t, str(out)) for t in model_types], jobs=jobs, on_done=done)
    if tty:
        sys.stderr.write("\n")
    return {t: results[t] for t in model_types}
