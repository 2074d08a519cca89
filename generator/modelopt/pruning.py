"""Pruning layer descriptors, inferred per layer kind from data flow on a tiny model and from
what a probe build changes, never from module names. Model Optimizer's mixins hook every module
whose name ends with the descriptor's module name and skip layers whose tensors are not there, so
in a stack of several kinds one descriptor serves the kinds that have that subblock, when they all
give the same one."""

from __future__ import annotations

import dataclasses

from ..spec import DescriptorSpec
from .experts import experts_layer
from .kind_reads import first_layer_of, kind_overrides
from .pruning_layers import Pruning
from .traced import ffn_layer, kv_layer, tiny_model


def infer_pruning(spec: DescriptorSpec) -> Pruning:
    """FFN-intermediate, KV-heads and expert-removal layer descriptors from data flow on a tiny
    model, for the layer kinds that have the subblock (each traced on its first layer).

    FFN: the core's linears are either input projections (read the core's input, output the
    FFN width) or the single output projection (its output is the core's output, its input the
    FFN width); anything else (a fused gate/up tensor twice the width, a linear in between) and
    Model Optimizer's mixin, which slices rows of inputs and columns of the output by the width,
    would cut the wrong rows: no descriptor.
    KV heads: exactly three linears read the attention's input and one produces its output; the
    two whose shapes follow the KV-head field are k and v, and v is the one whose doubled output
    doubles the output projection's input exactly (attention is linear in v, not in k). A fused
    q/k/v projection is one tensor the mixin cannot address by name: no descriptor.
    Experts: see `experts.experts_layer`.
    """
    try:
        model, config = tiny_model(spec)
    except Exception as exc:
        reason = f"the tiny model does not build: {type(exc).__name__}: {exc}"
        return Pruning(None, None, reason, reason, None, reason)
    text = config.get_text_config()
    vocab = text.vocab_size
    layers = {}
    for kind in spec.kinds:
        index = first_layer_of(spec, kind, model)
        if index is not None:
            layers[kind.label] = index
    dense = [
        k for k in spec.kinds if k.subblock("ffn") is not None and not kind_overrides(k, "ffn.moe")
    ]
    moe = [k for k in spec.kinds if kind_overrides(k, "ffn.moe")]
    kv = [
        k
        for k in spec.kinds
        if k.subblock("attention") is not None and not kind_overrides(k, "attention.mamba")
    ]
    ffn, ffn_reason = _per_kinds(
        spec, dense, layers, "no layer kind has a dense FFN subblock",
        lambda k, i: ffn_layer(spec, k, model, text, vocab, i),
    )  # fmt: skip
    kv_heads, kv_reason = _per_kinds(
        spec, kv, layers, "no layer kind has an attention subblock with keys and values",
        lambda k, i: kv_layer(spec, k, model, text, vocab, i),
    )  # fmt: skip
    experts, experts_reason = _per_kinds(
        spec, moe, layers, "no layer kind has experts",
        lambda k, i: experts_layer(spec, k, model, config, i),
    )  # fmt: skip
    return Pruning(ffn, kv_heads, ffn_reason, kv_reason, experts, experts_reason)


def _per_kinds(spec, kinds, layers, none_reason, infer_one):
    """One layer descriptor for `kinds`: each kind's own, all equal (evidence aside)."""
    if not kinds:
        return None, none_reason
    found = []
    for kind in kinds:
        if kind.label not in layers:
            continue  # a kind the tiny default config does not build: other configs' layers
        layer, reason = infer_one(kind, layers[kind.label])
        if layer is None:
            prefix = f"{kind.label}: " if len(spec.kinds) > 1 else ""
            return None, prefix + reason
        found.append(layer)
    if not found:
        return None, (
            "the layer kinds with this subblock are built only by other configs than the "
            "tiny default one (not traced)"
        )
    plain = {dataclasses.replace(f, evidence=()) for f in found}
    if len(plain) > 1:
        return None, "the layer kinds that have this subblock name its modules differently"
    return found[0], ""
