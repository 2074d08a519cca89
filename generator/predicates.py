"""Stage 5: weight-group predicates built from probed names, validated as an exact partition.

Each group is an anchored regex over state-dict names with one escaped alternative per module:
`^<prefix>(?:name1\\..+|name2\\..+)$`. A module alternative covers every tensor below it (a
`bias` that one config adds and another omits, or an old checkpoint's `rotary_emb.inv_freq`), so
the descriptor is right for every config of the model type, not only the probed one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from .errors import InferenceError
from .spec import Predicates, is_module_name

ENCODER_GROUP = "vision_encoding"  # Model Optimizer's name for a vision tower's group


def module_alternative(name: str) -> str:
    """Regex alternative for every tensor below module `name`."""
    if not is_module_name(name):
        raise InferenceError("a weight-group predicate", f"unexpected characters in {name!r}")
    return re.escape(name) + r"\..+"


def tensor_alternative(name: str) -> str:
    """Regex alternative for exactly the tensor `name`."""
    if not is_module_name(name):
        raise InferenceError("a weight-group predicate", f"unexpected characters in {name!r}")
    return re.escape(name)


def build(
    embeddings: Iterable[str],
    lm_head: Iterable[str],
    layer_stack: str,
    attention: Iterable[str],
    ffn: Iterable[str],
    tensors: Iterable[str] = (),
    followers: Iterable[str] = (),
    encoders: Iterable[str] = (),
) -> Predicates:
    """Predicates from module names: full paths for embeddings / lm_head, layer-relative for the
    subblocks. Names in `tensors` are single tensors (a parameter of a child, `mixer.A_log`),
    the rest modules; `followers` (among `attention`) join whichever subblock a layer has."""
    tensors = set(tensors)

    def alt(name: str) -> str:
        return tensor_alternative(name) if name in tensors else module_alternative(name)

    return Predicates(
        embeddings=tuple(module_alternative(n) for n in embeddings),
        lm_head=tuple(module_alternative(n) for n in lm_head),
        layer_prefix=tensor_alternative(layer_stack),
        attention=tuple(alt(n) for n in attention),
        ffn=tuple(alt(n) for n in ffn),
        followers=tuple(alt(n) for n in followers),
        encoders=tuple(module_alternative(n) for n in encoders),
    )


def compile_groups(pred: Predicates, num_layers: int) -> dict[str, re.Pattern]:
    """The same regexes the rendered descriptor compiles (verbose whitespace aside)."""

    def group(prefix: str, alternatives: tuple[str, ...]) -> re.Pattern:
        return re.compile("^" + prefix + "(?:" + "|".join(alternatives) + ")$")

    groups = {"embeddings": group("", pred.embeddings), "lm_head": group("", pred.lm_head)}
    if pred.encoders:
        groups[ENCODER_GROUP] = group("", pred.encoders)
    for i in range(num_layers):
        prefix = rf"{pred.layer_prefix_regex()}\.{i}\."
        groups[f"block_{i}_attention"] = group(prefix, pred.attention)
        groups[f"block_{i}_ffn"] = group(prefix, pred.ffn)
    return groups


def validate(pred: Predicates, keys: Iterable[str], num_layers: int, what: str) -> None:
    """Every key must land in exactly one group; otherwise name the offending keys."""
    groups = compile_groups(pred, num_layers)
    unmatched, overlapping = [], []
    for key in keys:
        hits = [g for g, p in groups.items() if p.match(key)]
        if not hits:
            unmatched.append(key)
        elif len(hits) > 1:
            overlapping.append(f"{key} in {' and '.join(hits)}")
    if unmatched or overlapping:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} in no group (first: {', '.join(unmatched[:5])})")
        if overlapping:
            problems.append(f"{len(overlapping)} in several ({'; '.join(overlapping[:3])})")
        raise InferenceError(
            "layer_name_predicates", f"the groups do not partition {what}: {'; '.join(problems)}"
        )


def with_checkpoint_names(
    pred: Predicates, disk_to_module: dict[str, str], num_layers: int
) -> tuple[Predicates, list[str]]:
    """Extend `pred` so that checkpoint names (as save_pretrained writes them) land in the group
    of the module name transformers loads them into (`embed_out.weight` -> `lm_head.weight`).

    `disk_to_module` maps each on-disk name to its module name. Returns the predicates and one
    evidence line per added alternative; raises when a renamed tensor's module is in no group.
    """
    groups = compile_groups(pred, num_layers)
    added: dict[str, list[str]] = {
        "embeddings": [],
        "lm_head": [],
        "attention": [],
        "ffn": [],
        ENCODER_GROUP: [],
    }
    evidence = []
    prefix = re.compile(rf"^{pred.layer_prefix_regex()}\.(\d+)\.(.+)$")
    indexed = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
    disk_prefixes: list[str] = list(pred.disk_layer_prefixes)
    for disk, module_name in sorted(disk_to_module.items()):
        if disk == module_name or any(p.match(disk) for p in groups.values()):
            continue
        hits = [g for g, p in groups.items() if p.match(module_name)]
        if len(hits) != 1:
            raise InferenceError(
                "the group of checkpoint tensor " + disk,
                f"it loads into {module_name}, which is in {hits or 'no group'}",
            )
        module = disk.rpartition(".")[0]
        group = hits[0]
        if group.startswith("block_"):
            match = prefix.match(module)
            on_disk, in_module = indexed.match(disk), prefix.match(module_name)
            if match is None and on_disk and in_module and on_disk[2] == in_module[1]:
                # the stack itself is named otherwise on disk (`backbone.layers`)
                alt_prefix = tensor_alternative(on_disk[1])
                if alt_prefix not in disk_prefixes:
                    disk_prefixes.append(alt_prefix)
                    evidence.append(
                        f"checkpoint name {disk} loads into {module_name}: the layer stack is "
                        f"{on_disk[1]} on disk"
                    )
                pred = dataclasses.replace(pred, disk_layer_prefixes=tuple(disk_prefixes))
                prefix = re.compile(rf"^{pred.layer_prefix_regex()}\.(\d+)\.(.+)$")
                match = prefix.match(module)
            if match is None:
                raise InferenceError(
                    "the group of checkpoint tensor " + disk,
                    f"it loads into layer tensor {module_name} but is not below the layer stack",
                )
            kind = group.rpartition("_")[2]
            # the layer's child on disk (`block_sparse_moe`), like module names are grouped by
            # the layer's children: every tensor below it, whatever the expert count; deeper
            # where that child holds tensors of both subblocks
            alt = module_alternative(
                _layer_part(match.group(2), kind, disk_to_module, groups, prefix)
            )
            groups = compile_groups(_extended(pred, added), num_layers)
            if any(p.match(disk) for p in groups.values()):
                continue  # the other name of the stack was all it needed
        else:
            kind = group
            alt = module_alternative(_whole_prefix(disk, group, disk_to_module, groups) or module)
        if alt not in added[kind]:
            added[kind].append(alt)
            evidence.append(f"checkpoint name {disk} loads into {module_name} ({kind})")
        groups = compile_groups(_extended(pred, added), num_layers)
    return _extended(pred, added), evidence


def _layer_part(rel: str, kind: str, disk_to_module: dict[str, str], groups, prefix) -> str:
    """The shortest leading part of `rel` (a module inside a layer, named as on disk) below
    which every checkpoint tensor of every layer loads into the `kind` subblock: the layer's
    child on disk, unless it holds tensors of both subblocks (HY-V4 writes `hc_pre.hc_attn_layer`
    and `hc_pre.hc_mlp_layer` for `attn_hc` and `ffn_hc`)."""
    parts = rel.split(".")
    for depth in range(1, len(parts)):
        head = ".".join(parts[:depth]) + "."
        kinds = set()
        for disk, module_name in disk_to_module.items():
            match = prefix.match(disk)
            if match is None or not match.group(2).startswith(head):
                continue
            kinds |= {g.rpartition("_")[2] for g, p in groups.items() if p.match(module_name)}
        if kinds == {kind}:
            return head[:-1]
    return rel


def _whole_prefix(disk: str, group: str, disk_to_module: dict[str, str], groups) -> str | None:
    """The shortest leading part of `disk` below which every checkpoint name loads into
    `group` (Gemma 3 writes its vision tower as `vision_tower.vision_model...`: one alternative
    for all of it rather than one per module)."""
    parts = disk.split(".")
    for depth in range(1, len(parts) - 1):
        head = ".".join(parts[:depth]) + "."
        below = [m for d, m in disk_to_module.items() if d.startswith(head)]
        if below and all([g for g, p in groups.items() if p.match(m)] == [group] for m in below):
            return head[:-1]
    return None


def _extended(pred: Predicates, added: dict[str, list[str]]) -> Predicates:
    return Predicates(
        embeddings=pred.embeddings + tuple(added["embeddings"]),
        lm_head=pred.lm_head + tuple(added["lm_head"]),
        layer_prefix=pred.layer_prefix,
        attention=pred.attention + tuple(added["attention"]),
        ffn=pred.ffn + tuple(added["ffn"]),
        followers=pred.followers,
        by_kind=pred.by_kind,
        kind_children=pred.kind_children,
        encoders=pred.encoders + tuple(added.get("vision_encoding", ())),
        disk_layer_prefixes=pred.disk_layer_prefixes,
    )
