"""Weight groups of a layer child whose subblock depends on the layer's kind.

OLMo-hybrid's `post_attention_layernorm` normalises the attention output in its full-attention
layers and the FFN input in its linear-attention layers. `layer_name_predicates(num_layers)`
and `get_weight_groups(layer_names, num_hidden_layers)` are given no config and no layer, so
the kind of layer i is told here from the names themselves: from the children of the layer its
tensors are under, against a table of each kind's children per subblock (rendered into the
descriptor from the spec, checkpoint spellings included).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["group_by_layer_kind", "split_roles"]

# one layer kind: (children grouped with the attention, children grouped with the FFN)
KindChildren = tuple[Sequence[str], Sequence[str]]


def split_roles(
    children: Iterable[str], split: Sequence[str], kinds: Sequence[KindChildren]
) -> dict[str, str]:
    """The subblock ("attention" or "ffn") of each `split` child among a layer's `children`.

    A kind fits the layer when it has every child the layer has, and, for each split child
    present, the subblock that holds it in that kind has one of its other children present (a
    no-op removes a subblock whole, so a split child never outlives the rest of its subblock).
    Every fitting kind must agree; raises ValueError when none fits or they disagree.
    """
    children = set(children)
    present = [c for c in split if c in children]
    if not present:
        return {}
    answers = []
    for attention, ffn in kinds:
        if not children <= set(attention) | set(ffn):
            continue
        roles = {}
        for child in present:
            role, subblock = ("attention", attention) if child in attention else ("ffn", ffn)
            others = set(subblock) - set(split)
            if others and not others & children:
                break
            roles[child] = role
        else:
            answers.append(roles)
    if not answers or any(a != answers[0] for a in answers):
        raise ValueError(
            f"no single layer kind fits a layer with {sorted(children)}: "
            + ("none fits" if not answers else f"they group {present} differently")
        )
    return answers[0]


def group_by_layer_kind(
    groups: dict[str, list[str]],
    num_hidden_layers: int,
    layer_prefix: str,
    split: Sequence[str],
    kinds: Sequence[KindChildren],
) -> dict[str, list[str]]:
    """Regroup the `split` children layer by layer. The predicates list them with the
    attention; in a layer whose kind (`split_roles`) groups them with the FFN, their tensors
    move to the front of its FFN group. `layer_prefix` is the regex of the layer stack's path.
    Groups left empty are dropped; the order of groups and of the other names is kept."""
    child = re.compile(rf"^{layer_prefix}\.\d+\.([^.]+)")
    out = {k: list(v) for k, v in groups.items()}
    for i in range(num_hidden_layers):
        attention, ffn = f"block_{i}_attention", f"block_{i}_ffn"
        names = out.get(attention, []) + out.get(ffn, [])
        of = {n: child.match(n)[1] for n in names if child.match(n)}
        roles = split_roles(of.values(), split, kinds)
        moving = [n for n in out.get(attention, []) if roles.get(of.get(n)) == "ffn"]
        if not moving:
            continue
        out[ffn] = moving + out.get(ffn, [])
        out[attention] = [n for n in out[attention] if n not in moving]
        if not out[attention]:
            del out[attention]
    return out
