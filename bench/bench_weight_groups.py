"""Benchmark: ModelDescriptor.get_weight_groups against the reference approach.

The reference implementation rebuilds the predicates for every tensor name, which is quadratic
in the layer count; ours builds them once per call. Both run here on the same names, and the
result is reported as a ratio (machines are noisy; absolute times are not the point).

    python bench/bench_weight_groups.py [--layers 80] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time


def reference_get_weight_groups(descriptor, names, num_layers):
    """The reference approach: predicates rebuilt for each tensor name."""
    groups: dict[str, list[str]] = {}
    for name in names:
        for group, pattern in descriptor.layer_name_predicates(num_layers).items():
            if pattern.match(name):
                groups.setdefault(group, []).append(name)
                break
        else:
            raise ValueError(name)
    return groups


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


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import generated

    descriptor = generated.get_descriptor("llama")
    names = llama_names(args.layers)
    ours = descriptor.get_weight_groups(names, args.layers)
    assert ours == reference_get_weight_groups(descriptor, names, args.layers)

    t_ours = best_of(lambda: descriptor.get_weight_groups(names, args.layers), args.repeat)
    t_ref = best_of(
        lambda: reference_get_weight_groups(descriptor, names, args.layers),
        max(1, args.repeat // 2),
    )
    print(f"get_weight_groups, {args.layers} layers, {len(names)} tensors (best of {args.repeat})")
    print(f"  reference (predicates per name): {t_ref * 1e3:9.1f} ms")
    print(f"  ours (predicates once per call): {t_ours * 1e3:9.1f} ms")
    print(f"  speed-up: {t_ref / t_ours:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
