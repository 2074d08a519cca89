"""Which subblock's weight group each child of a decoder layer joins, over every layer kind.

Most children are in one subblock in every kind. Three rules cover the others:
- a child that is attention in some kinds and FFN in others and holds different modules in each
  (Nemotron-H's `mixer`) is grouped by what is below it;
- one whose tensors are named alike in every role, in layers that each have one subblock
  (Nemotron-H's `norm`), follows the subblock its layer has;
- one whose tensors are named alike, in layers with both subblocks (OLMo-hybrid's
  `post_attention_layernorm`: the attention output's norm in its full-attention layers, the FFN
  input's in its linear-attention ones), is grouped by its layer's kind. The descriptor's
  get_weight_groups gets names and a layer count, no config, so it tells the kind of a layer
  from the children its tensors are under, by a table of each kind's children per subblock
  (puzzletron_runtime.model_descriptor.kind_groups); the table is checked here to tell every
  kind apart, whole and with either subblock removed by a no-op.
"""

from __future__ import annotations

import re

from torch import nn

from puzzletron_runtime.model_descriptor.kind_groups import split_roles

from .analysis.layer_flow import ATTENTION, FFN
from .descriptor_view import layer_ranges
from .errors import InferenceError
from .spec import KindChildren, LayerKind


def layer_unit(layer: nn.Module, name: str) -> nn.Module | None:
    """The layer's unit `name`: a child, or a container's child (`norm_attn_norm.attn`)."""
    module = layer
    for part in name.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def weight_modules(layer_kinds: list[LayerKind], modules: list[nn.Module]):
    """What the attention and the FFN predicates list, over every kind: layer children, or,
    for a child that is attention in some kinds and FFN in others (Nemotron-H's `mixer`), the
    modules and tensors below it, which differ between its roles. A child whose tensors do not
    differ (Nemotron-H's `norm`) and that sits in layers with one subblock follows that
    subblock; one in layers with both is decided by the layer's kind.

    Returns (attention, ffn, tensors, followers, by_kind, kind_children): names relative to a
    layer, the ones in `tensors` single tensors, `followers` and `by_kind` among `attention`;
    `kind_children` the table that tells the kinds apart when `by_kind` is not empty."""
    roles: dict[str, dict[str, list[LayerKind]]] = {}
    layer_of = {id(k): m for k, m in zip(layer_kinds, modules)}
    for k in layer_kinds:
        layer = layer_of[id(k)]
        for sb in (k.attention, k.ffn):
            for name in sb.weight_modules if sb is not None else ():
                roles.setdefault(name, {}).setdefault(sb.kind, []).append(k)
        for name in k.shared_modules:
            if has_params(layer_unit(layer, name)):
                roles.setdefault(name, {}).setdefault(ATTENTION, []).append(k)
        for name in k.own_tensors:
            roles.setdefault(name, {}).setdefault(ATTENTION, []).append(k)
    attention: list[str] = []
    ffn: list[str] = []
    tensors: list[str] = []
    followers: list[str] = []
    by_kind: list[str] = []
    for name, by_role in roles.items():
        if len(by_role) == 1:
            if ATTENTION in by_role:
                attention.append(name)
            else:
                ffn.append(name)
            if any(name in k.own_tensors for ks in by_role.values() for k in ks):
                tensors.append(name)
            continue
        below = {role: _below(name, kinds_, layer_of) for role, kinds_ in by_role.items()}
        if not below[ATTENTION] & below[FFN]:
            for role, entries in below.items():
                for entry, is_tensor in sorted(entries):
                    (attention if role == ATTENTION else ffn).append(entry)
                    if is_tensor:
                        tensors.append(entry)
            continue
        kinds_ = [k for ks in by_role.values() for k in ks]
        if all((k.attention is None) != (k.ffn is None) for k in kinds_):
            attention.append(name)
            followers.append(name)
            continue
        attention.append(name)
        by_kind.append(name)
    table: tuple[KindChildren, ...] = ()
    if by_kind:
        if followers:
            raise InferenceError(
                f"the weight group of {', '.join(by_kind)}",
                "its subblock depends on the layer kind, and the layers of other kinds hold "
                f"one subblock each, whose {', '.join(followers)} follow it: no one rule decides",
            )
        table = kind_table(layer_kinds, roles)
        _check_told_apart(by_kind, table, layer_kinds, roles)
    return _unique(attention), _unique(ffn), _unique(tensors), followers, by_kind, table


def _below(name: str, layer_kinds, layer_of) -> set[tuple[str, bool]]:
    """(name, is_tensor) of the children with weights and the own parameters of child `name`
    in layers of `layer_kinds`."""
    out = set()
    for k in layer_kinds:
        child = layer_unit(layer_of[id(k)], name)
        out |= {(f"{name}.{n}", False) for n, c in child.named_children() if has_params(c)}
        out |= {(f"{name}.{n}", True) for n, _ in child.named_parameters(recurse=False)}
    return out


def kind_table(layer_kinds: list[LayerKind], roles) -> tuple[KindChildren, ...]:
    """Each kind's children with weights (and tensors of the layer itself), per subblock."""
    table = []
    for k in layer_kinds:
        of_kind = {
            role: tuple(sorted(n for n, by_role in roles.items() if k in by_role.get(role, ())))
            for role in (ATTENTION, FFN)
        }
        table.append(KindChildren(k.label, of_kind[ATTENTION], of_kind[FFN]))
    return tuple(table)


def _role_of(name: str, kind: LayerKind, roles) -> str:
    return ATTENTION if kind in roles[name].get(ATTENTION, ()) else FFN


def _check_told_apart(by_kind, table, layer_kinds, roles) -> None:
    """Every kind's layer, whole and with either subblock removed (a no-op), must get its own
    subblock for each kind-decided child from the table alone."""
    rows = [(k.attention, k.ffn) for k in table]
    for k, row in zip(layer_kinds, table):
        for kept in ((*row.attention, *row.ffn), row.attention, row.ffn):
            want = {n: _role_of(n, k, roles) for n in by_kind if n in kept}
            try:
                got = split_roles(kept, by_kind, rows)
            except ValueError as e:
                got = str(e)
            if got != want:
                raise InferenceError(
                    f"the weight group of {', '.join(by_kind)}",
                    "it is in the attention subblock in some layer kinds and in the FFN in "
                    "others, in layers with both subblocks, its tensors are named alike in "
                    f"both, and the children of a layer do not tell its kind ({k.label} with "
                    f"{', '.join(kept)}: {got})",
                    [f"{x.label}: layers {layer_ranges(x.layers)}" for x in layer_kinds],
                )


def with_disk_children(
    by_kind: tuple[str, ...],
    table: tuple[KindChildren, ...],
    disk_to_module: dict[str, str],
    layer_prefix: str,
) -> tuple[tuple[str, ...], tuple[KindChildren, ...]]:
    """The table and the kind-decided children with the names checkpoints give layer children
    (OLMo-hybrid writes `feedforward_layer_norm` for `post_attention_layernorm`): a child on
    disk joins every kind, and the subblock, that its module child is in."""
    child = re.compile(rf"^{layer_prefix}\.\d+\.([^.]+)")
    alias: dict[str, set[str]] = {}
    for disk, module_name in disk_to_module.items():
        on_disk, in_module = child.match(disk), child.match(module_name)
        if on_disk and in_module and on_disk[1] != in_module[1]:
            alias.setdefault(in_module[1], set()).add(on_disk[1])

    def spelled(names) -> tuple[str, ...]:
        return tuple(_unique([*names, *sorted(a for n in names for a in alias.get(n, ()))]))

    rows = tuple(KindChildren(k.label, spelled(k.attention), spelled(k.ffn)) for k in table)
    return spelled(by_kind), rows
