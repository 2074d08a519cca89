"""Try inference on every causal-LM model type and tally the outcomes (a planning aid).

    python scripts/sweep.py [MODEL_TYPE...]

Each type runs in a subprocess with a time limit, so one model cannot stall or crash the sweep.
Prints one line per type (ok, or the first line of the error) and a summary by failing fact.
"""

import argparse
import collections
import subprocess
import sys

CODE = (
    "import sys\n"
    "from generator.infer import infer\n"
    "from generator.errors import PuzzleGenError\n"
    "try:\n"
    "    s = infer(sys.argv[1])\n"
    "    print('ok', s.layout, s.layer_stack)\n"
    "except PuzzleGenError as e:\n"
    "    print('fail', e)\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    if not args.model_types:
        from generator.source import known_model_types

        args.model_types = known_model_types()
    tally = collections.Counter()
    for i, mt in enumerate(args.model_types, 1):
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CODE, mt],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            out = (proc.stdout.strip().splitlines() or [""])[-1]
            if not out:
                err = proc.stderr.strip().splitlines()
                out = "crash " + (err[-1] if err else f"exit {proc.returncode}")
        except subprocess.TimeoutExpired:
            out = "timeout"
        kind = out.split(" ", 1)[0]
        reason = out.split(":", 1)[0] if kind != "ok" else "ok"
        tally[reason[:70]] += 1
        print(f"[{i}/{len(args.model_types)}] {mt}: {out[:220]}", flush=True)
    print("\nsummary:")
    for reason, n in tally.most_common():
        print(f"  {n:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
