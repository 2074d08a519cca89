"""Benchmark: `puzzle-gen check` and `generate` with --jobs 1 against --jobs 2, in the same run.

- check: every committed descriptor (what CI runs), in this repository;
- generate: the committed model types plus more that generate, into a temporary directory
  (more model types: the share of the per-type work grows against the one-time import);
- import: one process importing what every run needs before its first model type
  (transformers' modeling stack, the generator, black): the floor of any run, serial or not.

Runs alternate between job counts; the best of --repeat is reported, with the ratio.

    python bench/bench_jobs.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MORE_TYPES = [
    "cohere",
    "glm",
    "gpt_neox",
    "granite",
    "helium",
    "mixtral",
    "olmo",
    "olmo2",
    "phi",
    "phi3",
    "qwen2_moe",
    "stablelm",
    "starcoder2",
]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return elapsed


def best(make_args, jobs_list, repeat):
    times = {jobs: [] for jobs in jobs_list}
    for _ in range(repeat):
        for jobs in jobs_list:
            times[jobs].append(timed(make_args(jobs)))
    return {jobs: min(t) for jobs, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import generated

    py = sys.executable
    committed = generated.available()
    imports = "import transformers.modeling_utils, generator.infer, generator.render"
    t_import = min(timed([py, "-c", imports]) for _ in range(args.repeat))

    check = best(
        lambda j: [py, "-m", "generator.cli", "check", "--jobs", str(j)], (1, 2), args.repeat
    )
    types = committed + MORE_TYPES
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "generated")
        gen = best(
            lambda j: [
                py,
                "-m",
                "generator.cli",
                "generate",
                *types,
                "--out",
                out,
                "--jobs",
                str(j),
            ],
            (1, 2),
            max(1, args.repeat - 1),
        )
    print(f"one-time import (one process):        {t_import:6.2f} s")
    print(f"check, {len(committed)} committed descriptors:")
    print(
        f"  --jobs 1: {check[1]:6.2f} s   --jobs 2: {check[2]:6.2f} s   ratio {check[2] / check[1]:.2f}"
    )
    print(f"generate, {len(types)} model types:")
    print(f"  --jobs 1: {gen[1]:6.2f} s   --jobs 2: {gen[2]:6.2f} s   ratio {gen[2] / gen[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
