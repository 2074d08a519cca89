"""Try inference (and optionally generation + verification) on causal-LM model types and tally
the outcomes (a planning aid).

    python scripts/sweep.py [--verify] [--jobs N] [MODEL_TYPE...]

Each type runs in a subprocess with a time limit, so one model cannot stall or crash the sweep.
Prints one line per type (ok, or the first line of the error) and a summary by failing fact.
With --verify, a type that infers is also rendered into a scratch directory and run through
`verify`; the line names the first failing check.
"""

import argparse
import collections
import concurrent.futures
import subprocess
import sys

CODE = (
    "import sys, tempfile, pathlib\n"
    "from generator.infer import infer\n"
    "from generator.errors import PuzzleGenError\n"
    "try:\n"
    "    s = infer(sys.argv[1])\n"
    "except PuzzleGenError as e:\n"
    "    print('fail', e); raise SystemExit(0)\n"
    "if sys.argv[2] != 'verify':\n"
    "    print('ok', s.layout, s.layer_stack); raise SystemExit(0)\n"
    "from generator.cli import plan\n"
    "from generator.render import write_atomic\n"
    "from generator.verify import verify_model_type\n"
    "out = pathlib.Path(tempfile.mkdtemp()) / 'gen'\n"
    "try:\n"
    "    for p, t in plan([sys.argv[1]], str(out), keep_existing=False).items():\n"
    "        write_atomic(p, t)\n"
    "    checks = verify_model_type(sys.argv[1], out)\n"
    "except PuzzleGenError as e:\n"
    "    print('fail', e); raise SystemExit(0)\n"
    "bad = [c for c in checks if not c.ok]\n"
    "print('verified', s.layout) if not bad else print('unverified', bad[0].name + ':', bad[0].detail)\n"
)


def run_one(mt: str, mode: str, timeout: float) -> str:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CODE, mt, mode],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = (proc.stdout.strip().splitlines() or [""])[-1]
        if not out:
            err = proc.stderr.strip().splitlines()
            out = "crash " + (err[-1] if err else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired:
        out = "timeout"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--verify", action="store_true", help="also generate and verify")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    if not args.model_types:
        from generator.source import known_model_types

        args.model_types = known_model_types()
    mode = "verify" if args.verify else "infer"
    tally = collections.Counter()
    n = len(args.model_types)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {mt: pool.submit(run_one, mt, mode, args.timeout) for mt in args.model_types}
        for i, mt in enumerate(args.model_types, 1):
            out = futures[mt].result()
            kind = out.split(" ", 1)[0]
            reason = out.split(":", 1)[0] if kind not in ("ok", "verified") else kind
            tally[reason[:70]] += 1
            print(f"[{i}/{n}] {mt}: {out[:260]}", flush=True)
    print("\nsummary:")
    for reason, count in tally.most_common():
        print(f"  {count:4d}  {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
