"""A size that the layers of one kind read from different config fields.

Inkling's sliding-window layers and its full-attention layers are one kind (same class, same
children), but `InklingAttention.__init__` reads `swa_num_key_value_heads` in the first and
`num_key_value_heads` in the second. Found by probing, not by names: the field that sizes the
subblock resizes some layers of the kind and leaves the others; another field the subblock reads
resizes exactly the same tensors (by their names in the layer) of those others, and nothing of
the first ones. Then:

- the descriptor's override writes the block config's value to every such field: a per-layer
  override sets the fields of that one layer's config, which reads one of them, so writing all
  of them is exact for any layer of the kind (the override gets no layer index, so it could not
  choose one anyway);
- each field's override records which layers read it (`ConfigOverride.layers`: tests on the
  layer object, as a kind's selector tells kinds apart), so that a converter reading block
  configs from a config reads each layer's size from the field that layer reads.

Splitting such layers into two kinds was the alternative. It describes nothing the no-ops or
the weight groups need (the layers have the same children and the same plan), while a kind
defined by the fields it reads would make every kind depend on which sizes a block config
carries; and the override could still not tell the two kinds apart, as it sees no layer.
"""

from __future__ import annotations

import dataclasses

from .errors import InferenceError
from .heterogeneous import config_value
from .kinds import KindGroup, selectors
from .spec import is_identifier


def other_fields(run, size, field, value, diffs, new_value, listed) -> None:
    """After `field` (set to `value`, shape changes per layer `diffs`) was accepted for `size`
    on the layers it resizes, find the fields the kind's other layers read that size from
    (run: overrides._Run). Every field found is recorded as an override of `size`; where all
    layers are accounted for, each field's override says which layers read it."""
    paths = [p for p, _ in run.kind_layers]
    reading = [p for p in paths if diffs[p]]
    want = set(diffs[reading[0]])  # tensor names relative to the layer
    by_field = {field: reading}
    rest = [p for p in paths if not diffs[p]]
    tried = []
    for other in run.reads:
        if not rest:
            break
        current = config_value(run.tiny_text, other, None)
        if other == field or other in listed or not is_identifier(other):
            continue
        if not isinstance(current, int) or isinstance(current, bool):
            continue
        other_value = new_value(current, run.tiny_text)
        if other_value is None:
            continue
        moved = run.probe.shape_diffs({other: other_value}, paths)
        covers = [p for p in rest if moved[p] and set(moved[p]) == want]
        if not covers:
            continue
        if any(moved[p] for p in reading) or any(moved[p] and set(moved[p]) != want for p in rest):
            tried.append(f"{other}={other_value} also resizes other tensors or layers")
            continue
        evidence = [
            f"{run.reads[other]} reads config.{other}",
            f"probe: setting {other}={other_value} resizes {', '.join(sorted(want))} of layers "
            f"{', '.join(_index(p) for p in covers)} of this kind, the tensors {field} resizes "
            f"in layers {', '.join(_index(p) for p in reading)}, and nothing else",
        ]
        if run._accept(size, other, other_value, evidence, layer_path=covers[0]):
            by_field[other] = covers
            rest = [p for p in rest if p not in covers]
    if rest:
        run.ctx.fact(
            f"{run.kind} override ({size}) of layers {', '.join(_index(p) for p in rest)}",
            "none",
            [f"config.{field} resizes layers {', '.join(_index(p) for p in reading)} only"] + tried,
        )
        return
    _mark_layers(run, size, by_field)


def _mark_layers(run, size, by_field: dict[str, list[str]]) -> None:
    """Give each field's override the tests that tell its layers from the kind's other layers."""
    module_of = dict(run.kind_layers)
    first = next(iter(module_of.values()))
    groups = [
        KindGroup(
            type(first),
            (),
            [int(_index(p)) for p in layer_paths],
            [module_of[p] for p in layer_paths],
        )
        for layer_paths in by_field.values()
    ]
    try:
        tests = selectors(groups)
    except InferenceError as exc:
        raise InferenceError(
            f"which layers read {' or '.join(f'config.{f}' for f in by_field)}", exc.reason
        ) from None
    if any(t.value is None for ts in tests for t in ts):
        raise InferenceError(
            f"which layers read {' or '.join(f'config.{f}' for f in by_field)}",
            "no plain attribute of the layer tells them apart",
        )
    marked = dict(zip(by_field, tests))
    run.found = [
        (
            dataclasses.replace(o, layers=marked[o.config_field])
            if o.block_config_attr == size and o.config_field in marked
            else o
        )
        for o in run.found
    ]
    run.ctx.fact(
        f"{run.kind} override ({size}) per layer",
        "; ".join(
            f"config.{f}: layers {', '.join(_index(p) for p in ps)} "
            f"({' and '.join(f'{t.child} == {t.value!r}' for t in marked[f])})"
            for f, ps in by_field.items()
        ),
        ["probe: the layers of this kind read the size from different fields"],
    )


def _index(layer_path: str) -> str:
    return layer_path.rpartition(".")[2]
