"""Which config field each block-config size overrides, proven by probe builds.

The config reads (`config.X`) in the `__init__` of every module class of a subblock name the
candidates; a tiny model built with a candidate changed must change the shapes of that subblock
only, on the layer of the kind being analysed. What the change touches says which size it is:

- attention: KV heads; for a Mamba mixer, the state size, heads, head width and groups;
- FFN with experts: the expert count is the field whose change resizes the experts by that very
  number; the tensors it touches are the expert tensors. A width that changes expert tensors is
  the expert width, one that changes only other FFN tensors of that layer the shared-expert
  width; the experts a token is routed to (no shapes) is the field that sets that count on a
  module of the subblock;
- FFN without experts: the width.

A size is proven on every tiny layer of the kind: where its field resizes only some of them, the
fields the others read it from are found by the tensors they resize
(generator/per_layer_fields.py).

An FFN width must also be built verbatim: a field the model transforms before use (rounded to a
multiple, scaled by 2/3 as in LFM2's auto-adjusted FFN) is mapped through a boolean flag that
turns the transform off, or refused with the widths seen.
"""

from __future__ import annotations

from torch import nn

from .analysis import model_structure
from .analysis.layer_flow import ATTENTION
from .heterogeneous import config_value, field_names, has_field, sub_configs
from .spec import ConfigOverride, is_identifier

# Config fields that may carry each block-config size, in order of preference; the model's own
# __init__ reads decide which one applies, and a probe build confirms it changes the right shapes.
KV_HEAD_FIELDS = (
    "num_key_value_heads",
    "num_kv_heads",
    "n_head_kv",
    "multi_query_group_num",
    "kv_n_heads",
)
FFN_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff")
EXPERT_COUNT_FIELDS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
)
EXPERT_WIDTH_FIELDS = (
    "moe_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
)
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "moe_topk", "top_k", "num_selected_experts")
# A Mamba mixer's sizes, and those of a gated delta-rule linear attention (Qwen3-Next, Qwen 3.5),
# which Model Optimizer also describes in the Mamba form: the key head width is the state size,
# the value heads and their width the heads, the key heads the groups.
MAMBA_FIELDS = {
    "attention.mamba.state_dim": (
        "ssm_state_size", "state_size", "mamba_d_state", "d_state", "linear_key_head_dim",
    ),
    "attention.mamba.num_heads": ("mamba_num_heads", "mamba_n_heads", "linear_num_value_heads"),
    "attention.mamba.head_dim": (
        "mamba_head_dim", "mamba_headdim", "mamba_d_head", "linear_value_head_dim",
    ),
    "attention.mamba.num_groups": (
        "n_groups", "mamba_n_groups", "mamba_ngroups", "linear_num_key_heads",
    ),
}  # fmt: skip
EXPERT_WIDTH, SHARED_WIDTH = (
    "ffn.moe.expert_intermediate_dim",
    "ffn.moe.shared_expert_intermediate_dim",
)


def _member_of(key: str, members) -> str:
    """The subblock member a tensor or attribute below the layer (`a.attn.Wqkv.weight`) sits
    in: the member it is under (members may be dotted: a container's children), else its
    first component."""
    for m in sorted(members, key=len, reverse=True):
        if key == m or key.startswith(m + "."):
            return m
    return key.split(".")[0]


def _subblock_classes(layer: nn.Module, members) -> list[type]:
    classes = [type(layer)]
    for name in members:
        for module in layer.get_submodule(name).modules():
            if type(module) not in classes and type(module).__module__.startswith(
                ("transformers", "transformers_modules")
            ):
                classes.append(type(module))
    return classes


def _reads(index, classes) -> dict[str, str]:
    reads: dict[str, str] = {}
    for cls in classes:
        for field, where in model_structure.config_reads(index, cls):
            reads.setdefault(field, where)
    return reads


def _through_sub_configs(reads: dict[str, str], text) -> dict[str, str]:
    """The reads as fields of the text config: a sub-config read whole (`config.attn_config`,
    then `attn_config.kv_n_heads`) reads each of its fields, and a field the text config lacks,
    read by a module built with a sub-config (`DbrxExperts(config.ffn_config)` reads
    `config.moe_num_experts`), is that sub-config's: both as dotted fields (`ffn_config.X`)."""
    out = dict(reads)
    subs = sub_configs(text)
    for field, where in reads.items():
        if field in subs:
            for name in getattr(text, field).to_dict():
                if name.isidentifier():
                    out.setdefault(f"{field}.{name}", where)
        elif not has_field(text, field) and field_names(text, field):
            del out[field]
            for name in field_names(text, field):
                out.setdefault(name, where)
    return out


def _number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def infer_overrides(
    ctx, kind, sb, layer, layer_path, tiny_kind=None, stack_path=None
) -> tuple[ConfigOverride, ...]:
    """The block-config sizes of subblock `kind` of the layer kind at `layer_path` (a layer of
    the tiny model) mapped onto the config fields its modules read, each proven by a probe build
    (none found is a fact too, with the fields tried as evidence). `tiny_kind`: every layer of
    that kind in the tiny model (a size may be read from one field by some of them and from
    another by the others: generator/per_layer_fields.py)."""
    reads = _reads(ctx.index, _subblock_classes(layer, sb.members))
    run = _Run(ctx, kind, sb, reads, layer_path, tiny_kind, stack_path)
    if kind == ATTENTION:
        run.plain("attention.num_key_value_heads", KV_HEAD_FIELDS, _fewer_heads)
        for size, fields in MAMBA_FIELDS.items():
            run.plain(size, fields, _other_size, quiet=True)
    else:
        experts = run.experts()
        if experts:
            run.top_k()
        run.widths(experts)
    return tuple(run.found)


class _Run:
    def __init__(self, ctx, kind, sb, reads, layer_path, tiny_kind=None, stack_path=None):
        self.ctx, self.kind, self.sb, self.reads = ctx, kind, sb, reads
        self.layer_path = layer_path
        # the tiny layers of this kind, the analysed one first (a static build's probe measures
        # one layer at a time: there, the analysed layer alone)
        self.kind_layers = [(layer_path, None)]
        if tiny_kind is not None and stack_path and hasattr(ctx.probe, "shape_diffs"):
            self.kind_layers = [
                (f"{stack_path}.{i}", m) for i, m in zip(tiny_kind.layers, tiny_kind.modules)
            ]
        self.probe = ctx.probe
        self.tiny_text = self.probe.tiny_config().get_text_config()
        self.reads = _through_sub_configs(reads, self.tiny_text)
        self.members = set(sb.members)
        self.found: list[ConfigOverride] = []
        self.refused: list[str] = []  # fields whose per-layer change does not build

    def _named(self, fields) -> list[str]:
        """The fields read among `fields`: each by its name, or as a sub-config's field
        (`attn_config.kv_n_heads` for `kv_n_heads`)."""
        out = [r for f in fields for r in self.reads if r == f or r.endswith("." + f)]
        return list(dict.fromkeys(out))

    def _diff(self, changes):
        diff = self.probe.shape_diff(changes, self.layer_path)
        return diff, {_member_of(k, self.members) for k in diff}

    def _inside(self, changed) -> bool:
        # a core, or the core a refining core refines (Inkling's attention before its
        # convolution): the size is the subblock's either way
        cores = set(self.sb.cores) | set(self.sb.judges)
        return bool(changed) and changed <= self.members and bool(changed & cores)

    def _accept(self, size, field, value, evidence, flag=None, layer_path=None) -> bool:
        """Record the override, unless a model with this layer alone changed does not build."""
        layer_path = layer_path or self.layer_path
        changes = {field: value, **({flag[0]: flag[1]} if flag else {})}
        failure = self.probe.layer_change_fails(changes, layer_path)
        if failure is not None:
            self.refused.append(
                f"config.{field} changes only {self.kind} shapes, but a model whose layer "
                f"{layer_path.rpartition('.')[2]} alone has {field}={value} does not build "
                f"({failure[:160]}): transformers reads the whole model's value"
            )
            return False
        self.ctx.fact(
            f"{self.kind} override",
            f"config.{field} <- block_config.{size}"
            + (f"; config.{flag[0]} <- {flag[1]!r}" if flag else ""),
            evidence,
        )
        self.found.append(
            ConfigOverride(
                field,
                size,
                self.reads[field],
                tuple(evidence),
                flag[0] if flag else None,
                flag[1] if flag else None,
            )
        )
        return True

    def _none(self, size, tried) -> None:
        self.ctx.fact(f"{self.kind} override ({size})", "none", tried + self.refused)

    # -- one field, confirmed by the shapes it changes ---------------------------------------
    def plain(self, size, fields, new_value, quiet=False) -> None:
        """The first of `fields` whose change resizes this subblock (and nothing else) on some
        layers of the kind; where other layers of the kind keep their shapes, the fields they
        read the size from instead (per_layer_fields.other_fields)."""
        from .per_layer_fields import other_fields

        tried = []
        paths = [p for p, _ in self.kind_layers]
        for field in self._named(fields):
            value = new_value(config_value(self.tiny_text, field, None), self.tiny_text)
            if value is None:
                continue
            diffs = (
                self.probe.shape_diffs({field: value}, paths)
                if len(paths) > 1
                else {paths[0]: self.probe.shape_diff({field: value}, paths[0])}
            )
            changed_at = {p: {_member_of(k, self.members) for k in d} for p, d in diffs.items()}
            changed = changed_at[self.layer_path]
            tried.append(f"{field}={value} changes {sorted(changed) or 'nothing'}")
            reading = [p for p in paths if changed_at[p]]
            if not reading or not all(self._inside(changed_at[p]) for p in reading):
                continue
            first = reading[0]
            if first != self.layer_path:
                tried[-1] += f" on layer {_index(self.layer_path)}"
            if self._accept(
                size,
                field,
                value,
                [
                    f"{self.reads[field]} reads config.{field}",
                    f"probe: setting {field}={value} changes the shapes of "
                    f"{', '.join(sorted(changed_at[first]))} only"
                    + (f" (layer {_index(first)})" if first != self.layer_path else ""),
                ],
                layer_path=first,
            ):
                if len(reading) < len(paths):
                    other_fields(self, size, field, value, diffs, new_value, fields)
                return
        if tried or not quiet:
            self._none(size, tried or [f"the {self.kind} modules read none of {', '.join(fields)}"])

    # -- experts ------------------------------------------------------------------------------
    def experts(self) -> set[str]:
        """Map the expert count; returns the expert tensors (those the count resizes)."""
        tried = []
        for field in self._named(EXPERT_COUNT_FIELDS):
            current = config_value(self.tiny_text, field, None)
            if not _number(current) or current < 1:
                continue
            value = current + 2
            diff, changed = self._diff({field: value})
            tried.append(f"{field}={value} changes {sorted(changed) or 'nothing'}")
            resized = any(value in shape for shape in diff.values()) or any(
                shape == () for shape in diff.values()
            )
            if (
                changed
                and changed <= self.members
                and resized
                and self._accept(
                    "ffn.moe.num_local_experts",
                    field,
                    value,
                    [
                        f"{self.reads[field]} reads config.{field}",
                        f"probe: setting {field}={value} resizes "
                        f"{', '.join(sorted(diff))} to {value} experts",
                    ],
                )
            ):
                return set(diff)
        if tried:
            self._none("ffn.moe.num_local_experts", tried)
        return set()

    def top_k(self) -> None:
        """The experts a token is routed to change no shape: the field counts when a module of
        the subblock keeps the changed value (a router's `top_k`)."""
        for field in self._named(TOP_K_FIELDS):
            current = config_value(self.tiny_text, field, None)
            if not _number(current):
                continue
            value = current - 1 if current > 1 else current + 1
            moved = self.probe.attribute_diff({field: value}, self.layer_path)
            held = sorted(
                k
                for k, (old, new) in moved.items()
                if (old, new) == (current, value) and _member_of(k, self.members) in self.members
            )
            if held and self._accept(
                "ffn.moe.num_experts_per_tok",
                field,
                value,
                [
                    f"{self.reads[field]} reads config.{field}",
                    f"probe: with {field}={value}, {', '.join(held)} holds {value}",
                ],
            ):
                return
        self._none(
            "ffn.moe.num_experts_per_tok", [f"no module keeps any of {', '.join(TOP_K_FIELDS)}"]
        )

    def widths(self, experts: set[str]) -> None:
        """FFN widths: dense, or (with experts) the routed experts' and the shared expert's."""
        sizes = (EXPERT_WIDTH, SHARED_WIDTH) if experts else ("ffn.intermediate_size",)
        named = tuple(
            self._named(EXPERT_WIDTH_FIELDS + FFN_WIDTH_FIELDS if experts else FFN_WIDTH_FIELDS)
        )
        # after the usual names, any other number the FFN modules read (a width under another
        # name, or a ratio the model multiplies: then refused below, with the reason)
        others = tuple(
            f
            for f in self.reads
            if f not in named
            and isinstance(config_value(self.tiny_text, f, None), (int, float))
            and not isinstance(config_value(self.tiny_text, f, None), bool)
            and is_identifier(f)
        )
        tried: list[str] = []
        for field in named + others:
            if all(s in {o.block_config_attr for o in self.found} for s in sizes):
                break
            if field not in self.reads:
                continue
            current = config_value(self.tiny_text, field, None)
            # a width left None (GPT-2's n_inner: 4 x hidden) can still be set
            value = _other_size(current, self.tiny_text) if current is not None else 104
            if value is None:
                continue
            diff, changed = self._diff({field: value})
            if (changed and changed <= self.members) or field in named:
                tried.append(f"{field}={value} changes {sorted(changed) or 'nothing'}")
            if changed and not changed <= self.members:
                continue
            if not changed and field not in named:
                continue
            flag = None
            if not self._builds(diff, value, experts):
                # the model transforms the field before use (rounds it, scales it): find a flag
                # read beside it that makes the model use it verbatim, else refuse
                hidden = config_value(self.tiny_text, "hidden_size", None)
                widths = sorted({d for shape in diff.values() for d in shape} - {hidden})
                flag = self._verbatim_flag(field, value)
                if flag is None:
                    if changed:
                        tried.append(
                            f"config.{field} is transformed before use: {field}={value} does "
                            f"not build that width (widths seen: {widths or 'unchanged'}), so a "
                            "block config's width cannot be written to it"
                        )
                    continue
                diff, changed = self._diff({field: value, flag[0]: flag[1]})
            if not self._inside(changed):
                continue
            if field not in named and not self._verbatim_when_small(field, flag):
                # a number that only looks like the width in a tiny model (a rounding multiple
                # larger than the tiny width builds exactly its own value)
                tried.append(f"config.{field} does not set the width when it is small")
                continue
            size = (
                (EXPERT_WIDTH if set(diff) & experts else SHARED_WIDTH)
                if experts
                else "ffn.intermediate_size"
            )
            if size in {o.block_config_attr for o in self.found}:
                continue
            evidence = [
                f"{self.reads[field]} reads config.{field}",
                f"probe: setting {field}={value} changes the shapes of "
                f"{', '.join(sorted(changed))} only"
                + (
                    f" ({'the experts' if size == EXPERT_WIDTH else 'not the experts'})"
                    if experts
                    else ""
                ),
            ]
            if flag is not None:
                evidence.append(
                    f"probe: {field}={value} alone does not build width {value}; with "
                    f"{flag[0]}={flag[1]!r} (read at {self.reads[flag[0]]}) it does"
                )
            self._accept(size, field, value, evidence, flag)
        for size in sizes:
            if size not in {o.block_config_attr for o in self.found}:
                self._none(
                    size, tried or [f"the {self.kind} modules read none of {', '.join(named)}"]
                )

    def _builds(self, diff, value, experts: set[str]) -> bool:
        """Whether the changed shapes hold width `value`: as a dimension, or, in an expert
        tensor that stacks every expert's rows in one dimension (DBRX's `w1`: experts x width
        rows), as that many widths."""
        if any(value in shape for shape in diff.values()):
            return True
        count = next(
            (o for o in self.found if o.block_config_attr == "ffn.moe.num_local_experts"), None
        )
        n = config_value(self.tiny_text, count.config_field, None) if count else None
        return _number(n) and any(value * n in diff[k] for k in set(diff) & experts)

    def _verbatim_when_small(self, field, flag) -> bool:
        changes = {field: 6, **({flag[0]: flag[1]} if flag else {})}
        diff, _ = self._diff(changes)
        return any(6 in shape for shape in diff.values())

    def _verbatim_flag(self, field, value):
        """(flag, value) of a boolean config field read by the subblock whose flip makes `field`
        the real width, or None."""
        for flag in self.reads:
            current = config_value(self.tiny_text, flag, None)
            if not isinstance(current, bool) or flag == field or not is_identifier(flag):
                continue
            diff, changed = self._diff({field: value, flag: not current})
            if (
                changed
                and changed <= self.members
                and any(value in shape for shape in diff.values())
            ):
                return flag, not current
        return None


def _index(layer_path: str) -> str:
    return layer_path.rpartition(".")[2]


def _fewer_heads(current, config):
    heads = config_value(config, "num_attention_heads")
    if not _number(current) or not _number(heads):
        return None
    options = [d for d in range(1, heads + 1) if heads % d == 0 and d != current]
    return options[0] if options else None


def _other_size(current, config):
    # not a round multiple, so that a model rounding the width (to a multiple of 64, 256...)
    # does not happen to build exactly this width
    if isinstance(current, float):
        return current * 2 + 0.75
    return current * 2 + 24 if _number(current) else None
