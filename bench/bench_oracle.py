"""Benchmark: the oracle's per-layer questions with forwards that stop at the layer asked about
(`generator.verify.models.run_through`) against whole forwards, in the same run.

For each model type, a fresh `Reference` of its tiny verification config answers the questions
`verify`'s identity check asks of every layer (roles, hence cores, feeding, refinement, token
mixing, zeroed outputs) and the size fields. The baseline replaces `run_through` by a whole
forward (what the oracle did before), with a fresh reference, so no answer is cached across
variants. Both variants must give the same answers; the ratio is baseline / stopped.

    python bench/bench_oracle.py [llama qwen3_next ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TYPES = ["llama", "qwen3_next", "granitemoehybrid"]


def answers(config_cls) -> tuple[float, object]:
    from generator.verify import Reference, verification_config

    ref = Reference(verification_config(config_cls))
    start = time.perf_counter()
    roles = [ref.roles(i) for i in range(ref.num_layers)]
    fields = {k: v.field for k, v in ref.size_fields.items()}
    return time.perf_counter() - start, (roles, fields)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", default=DEFAULT_TYPES)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from generator.probe import quiet_transformers
    from generator.source import resolve
    from generator.verify import models, roles

    stop = roles.run_through

    def whole(model, _layer, input_ids):
        models.logits(model, input_ids)

    print(f"{'type':<20} {'whole (s)':>10} {'stopped (s)':>12} {'ratio':>7}")
    for model_type in args.types:
        config_cls = resolve(model_type).config_cls
        with quiet_transformers():
            roles.run_through = models.run_through = whole
            try:
                base, base_answers = answers(config_cls)
            finally:
                roles.run_through = models.run_through = stop
            fast, fast_answers = answers(config_cls)
        if base_answers != fast_answers:
            print(f"{model_type}: the answers differ", file=sys.stderr)
            return 1
        print(f"{model_type:<20} {base:>10.2f} {fast:>12.2f} {base / fast:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
