"""Benchmark: ModelDescriptor.get_weight_groups against two baselines, in the same run.

- per-name reference: the predicates rebuilt for every tensor name (Model Optimizer's way);
- first-match loop: predicates built once, every name tried against the groups in turn
  (this project's previous implementation: cost grows with names x layers).

Two name lists, grouped with the generated llama descriptor (predicates of the generated
shape: one anchored, escaped regex per group, per layer):
- dense: a 128-layer Llama (9 tensors per layer);
- moe: DeepSeek-V3-sized names, 61 layers x 256 routed experts x 3 projections plus the
  attention (MLA), norms, router and shared experts: about 48k names.

"cold" is a call that builds the prefix index (every cache emptied first: best of --repeat);
"warm" is the best of --repeat later calls, which find the index cached per predicate set. Results are checked equal to the
first-match loop before anything is timed. Ratios matter; machines are noisy.

    python bench/bench_weight_groups.py [--repeat 7] [--skip-reference] [--cpu]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK = time.perf_counter  # --cpu: time.process_time


def reference_get_weight_groups(descriptor, names, num_layers):
    """The per-name reference: predicates rebuilt for each tensor name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        for group, pattern in descriptor.layer_name_predicates(num_layers).items():
            if pattern.match(name):
                groups.setdefault(group, []).append(name)
                break
        else:
            raise ValueError(name)
    return groups


def first_match_loop(descriptor, names, num_layers):
    """The previous implementation: predicates once, names tried against groups in turn."""
    predicates = list(descriptor.layer_name_predicates(num_layers).items())
    groups: dict[str, list[str]] = {}
    for name in names:
        for group, pattern in predicates:
            if pattern.match(name):
                groups.setdefault(group, []).append(name)
                break
        else:
            raise ValueError(name)
    order = {group: i for i, (group, _) in enumerate(predicates)}
    return dict(sorted(groups.items(), key=lambda item: order[item[0]]))


def llama_names(num_layers: int) -> list[str]:
    per_layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(num_layers) for n in per_layer]
    return names + ["model.norm.weight", "lm_head.weight"]


def deepseek_v3_names(num_layers: int = 61, experts: int = 256) -> list[str]:
    """Tensor names the way a DeepSeek-V3-sized checkpoint has them (every layer with routed
    experts, as in the issue's count: 61 x 256 x 3)."""
    attention = [
        "q_a_proj.weight",
        "q_a_layernorm.weight",
        "q_b_proj.weight",
        "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight",
        "kv_b_proj.weight",
        "o_proj.weight",
    ]
    projections = ("gate_proj", "up_proj", "down_proj")
    names = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names.append(p + "input_layernorm.weight")
        names += [p + "self_attn." + a for a in attention]
        names.append(p + "post_attention_layernorm.weight")
        names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
        names += [p + f"mlp.experts.{e}.{x}.weight" for e in range(experts) for x in projections]
        names += [p + f"mlp.shared_experts.{x}.weight" for x in projections]
    return names + ["model.norm.weight", "lm_head.weight"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def cold_call(descriptor, names, num_layers):
    """One call with every cache of the fast path emptied (re's own cache too, then the
    descriptor's patterns compiled again, as any first call finds them)."""
    from puzzletron_runtime.model_descriptor import weight_groups

    weight_groups._index.cache_clear()
    weight_groups._literal_prefixes.cache_clear()
    weight_groups._template_prefixes.cache_clear()
    re.purge()
    descriptor.layer_name_predicates(num_layers)
    start = CLOCK()
    result = descriptor.get_weight_groups(names, num_layers)
    return CLOCK() - start, result


def bench(label, descriptor, names, num_layers, repeat, skip_reference):
    colds = [cold_call(descriptor, names, num_layers) for _ in range(repeat)]
    t_cold = min(t for t, _ in colds)
    ours = colds[0][1]
    assert ours == first_match_loop(descriptor, names, num_layers)
    t_warm = best_of(lambda: descriptor.get_weight_groups(names, num_layers), repeat)
    t_loop = best_of(lambda: first_match_loop(descriptor, names, num_layers), max(1, repeat // 3))
    print(f"{label}: {num_layers} layers, {len(names)} tensors")
    if not skip_reference:
        t_ref = best_of(lambda: reference_get_weight_groups(descriptor, names, num_layers), 1)
        print(f"  per-name reference (predicates per name): {t_ref * 1e3:10.1f} ms")
    print(f"  first-match loop (previous):              {t_loop * 1e3:10.1f} ms")
    print(f"  one pass, cold (builds the prefix index): {t_cold * 1e3:10.1f} ms")
    print(f"  one pass, warm (best of {repeat}):             {t_warm * 1e3:10.1f} ms")
    if not skip_reference:
        print(
            f"  speed-up vs per-name reference: {t_ref / t_warm:7.0f}x warm, "
            f"{t_ref / t_cold:5.0f}x cold"
        )
    print(
        f"  speed-up vs first-match loop:   {t_loop / t_warm:7.1f}x warm, {t_loop / t_cold:5.1f}x cold"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slowest baseline")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time this process's CPU time instead of wall time (steadier on a busy machine)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu else time.perf_counter
    print(f"clock: {'CPU time of this process' if args.cpu else 'wall time'}")

    sys.path.insert(0, str(REPO))
    import generated

    descriptor = generated.get_descriptor("llama")
    bench("dense", descriptor, llama_names(128), 128, args.repeat, args.skip_reference)
    moe = deepseek_v3_names()
    bench("moe", descriptor, moe, 61, args.repeat, args.skip_reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
