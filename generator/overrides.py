"""Which config field a block config's size overrides, proven by probe builds.

The subblock's own `__init__` reads (`config.X`) name the candidates; a tiny model built with a
candidate changed must change the shapes of that subblock only. An FFN width must also be built
verbatim: a field the model transforms before use (rounded to a multiple, scaled by 2/3 as in
LFM2's auto-adjusted FFN) is mapped through a boolean flag that turns the transform off, or
refused with the widths seen.
"""

from __future__ import annotations

from .analysis import model_structure
from .analysis.layer_flow import ATTENTION, FFN
from .spec import ConfigOverride, is_identifier

# Config fields a block config can override, in order of preference; the model's own
# __init__ reads decide which one applies, and a probe build confirms it changes the right shapes.
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
FFN_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff")
OVERRIDES = {
    ATTENTION: ("attention.num_key_value_heads", KV_HEAD_FIELDS),
    FFN: ("ffn.intermediate_size", FFN_WIDTH_FIELDS),
}


def infer_overrides(ctx, kind, sb, layer, stack_path) -> tuple[ConfigOverride, ...]:
    """The block-config size of `kind` mapped onto the config field the subblock's modules
    read, proven by a probe build (or none, with the fields tried as evidence)."""
    block_attr, candidates = OVERRIDES[kind]
    classes = [type(layer)] + [type(getattr(layer, n)) for n in sb.members]
    reads: dict[str, str] = {}
    for cls in classes:
        for field, where in model_structure.config_reads(ctx.index, cls):
            reads.setdefault(field, where)
    probe = ctx.probe
    tiny_text = probe.tiny_config().get_text_config()
    tried = []
    if kind == FFN:
        # after the usual names, any other number the FFN modules read (a width under another
        # name, or a ratio the model multiplies: then refused below, with the reason)
        others = [
            f
            for f in reads
            if f not in candidates
            and isinstance(getattr(tiny_text, f, None), (int, float))
            and not isinstance(getattr(tiny_text, f, None), bool)
            and is_identifier(f)
        ]
        candidates = tuple(candidates) + tuple(others)
    for field in candidates:
        if field not in reads:
            continue
        current = getattr(tiny_text, field, None)
        value = _changed_value(kind, current, tiny_text)
        if value is None:
            continue
        diff = probe.shape_diff({field: value}, f"{stack_path}.0")
        changed = {k.split(".")[0] for k in diff}
        if (changed and changed <= set(sb.members)) or field in OVERRIDES[kind][1]:
            tried.append(f"{field}={value} changes {sorted(changed) or 'nothing'}")
        flag = None
        if kind == FFN and changed and not _has_dim(diff, value):
            # the model transforms the field before use (rounds it, scales it): find a flag
            # read beside it that makes the model use it verbatim, else refuse
            hidden = getattr(tiny_text, "hidden_size", None)
            widths = sorted({d for shape in diff.values() for d in shape} - {hidden})
            flag = _verbatim_flag(probe, reads, tiny_text, field, value, sb, stack_path)
            if flag is None:
                tried.append(
                    f"config.{field} is transformed before use: {field}={value} does not build "
                    f"that width (widths seen: {widths or 'unchanged'}), so a block config's "
                    "width cannot be written to it"
                )
                continue
            diff = probe.shape_diff({field: value, flag[0]: flag[1]}, f"{stack_path}.0")
            changed = {k.split(".")[0] for k in diff}
        if not (changed and changed <= set(sb.members) and changed & set(sb.cores)):
            continue
        evidence = [
            f"{reads[field]} reads config.{field}",
            f"probe: setting {field}={value} changes the shapes of {', '.join(sorted(changed))} only",
        ]
        if flag is not None:
            evidence.append(
                f"probe: {field}={value} alone does not build width {value}; with "
                f"{flag[0]}={flag[1]!r} (read at {reads[flag[0]]}) it does"
            )
        ctx.fact(
            f"{kind} override",
            f"config.{field} <- block_config.{block_attr}"
            + (f"; config.{flag[0]} <- {flag[1]!r}" if flag else ""),
            evidence,
        )
        return (
            ConfigOverride(
                field,
                block_attr,
                reads[field],
                tuple(evidence),
                flag[0] if flag else None,
                flag[1] if flag else None,
            ),
        )
    ctx.fact(
        f"{kind} override",
        "none",
        tried or [f"the {kind} modules read none of {', '.join(candidates)}"],
    )
    return ()


def _has_dim(diff: dict[str, tuple], value: int) -> bool:
    return any(value in shape for shape in diff.values())


def _verbatim_flag(probe, reads, tiny_text, field, value, sb, stack_path):
    """(flag, value) of a boolean config field read by the subblock whose flip makes `field`
    the real width, or None."""
    for flag in reads:
        current = getattr(tiny_text, flag, None)
        if not isinstance(current, bool) or flag == field or not is_identifier(flag):
            continue
        diff = probe.shape_diff({field: value, flag: not current}, f"{stack_path}.0")
        changed = {k.split(".")[0] for k in diff}
        if changed and changed <= set(sb.members) and _has_dim(diff, value):
            return flag, not current
    return None


def _changed_value(kind: str, current, config):
    if kind == ATTENTION:
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(current, int) or not isinstance(heads, int):
            return None
        options = [d for d in range(1, heads + 1) if heads % d == 0 and d != current]
        return options[0] if options else None
    # not a round multiple, so that a model rounding the width (to a multiple of 64, 256...)
    # does not happen to build exactly this width
    if isinstance(current, float):
        return current * 2 + 0.75
    return current * 2 + 24 if isinstance(current, int) else 104
