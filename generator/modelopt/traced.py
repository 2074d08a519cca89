"""FFN-intermediate and KV-heads layer descriptors, from data flow on a tiny model: forward
hooks record which ``nn.Linear`` of a subblock's core reads the core's input and which one
produces the core's output (`Flow`), and a probe build with another KV-head count tells k and v
from q."""

from __future__ import annotations

from typing import Any

from puzzletron_runtime.puzzformer.patcher import set_config_field

from ..heterogeneous import config_value
from ..spec import DescriptorSpec
from .kind_reads import kind_cores, kind_override
from .pruning_layers import FFNLayer, KVHeadsLayer


def single_core(kind, which: str) -> str | None:
    cores = kind_cores(kind, which)
    return cores[0] if len(cores) == 1 else None


class Flow:
    """Forward hooks on a core module and its nn.Linear descendants of a tiny model: which
    linears read the core's input tensor, which one produced its output tensor."""

    def __init__(self, model, core, vocab: int, scale: str | None = None):
        import torch
        from torch import nn

        self.linears = {n: m for n, m in core.named_modules() if n and isinstance(m, nn.Linear)}
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.core_in = self.core_out = None
        hooks = []

        def core_hook(_m, args, kwargs, output):
            if self.core_in is None:  # the first call: layer 0 in a model of shared cores
                self.core_in = args[0] if args else kwargs.get("hidden_states")
                self.core_out = output[0] if isinstance(output, (tuple, list)) else output

        hooks.append(core.register_forward_hook(core_hook, with_kwargs=True))
        for name, lin in self.linears.items():

            def hook(_m, args, output, name=name):
                self.inputs.setdefault(name, args[0])
                self.outputs.setdefault(name, output)
                if name == scale:
                    return output * 2

            hooks.append(lin.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(input_ids=torch.arange(8).unsqueeze(0) % vocab)
        finally:
            for h in hooks:
                h.remove()

    def readers_of_input(self) -> list[str]:
        return sorted(n for n, x in self.inputs.items() if x is self.core_in)

    def producer_of_output(self) -> list[str]:
        return sorted(n for n, y in self.outputs.items() if y is self.core_out)


def tiny_model(spec: DescriptorSpec, **extra):
    from ..probe import build_model, quiet_transformers
    from ..source import resolve
    from ..tiny import tiny_config

    source = resolve(spec.model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
    text = config.get_text_config()
    for field, value in extra.items():  # on the text config, as the override probes set them
        set_config_field(text, field, value)
    import torch

    torch.manual_seed(0)
    return build_model(source.causal_lm_cls, config, "cpu").eval(), config


def ffn_layer(spec, kind, model, text, vocab, index):
    core_attr = single_core(kind, "ffn")
    width = kind_override(kind, "ffn.intermediate_size")
    if core_attr is None or width is None:
        return None, "the FFN subblock has no single core module with a width override"
    width_field = width.config_field
    width = config_value(text, width_field)
    layer_path = f"{spec.layer_stack}.{index}"
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = Flow(model, core, vocab)
    if not flow.linears:
        return None, (
            f"{core_attr} holds no nn.Linear (Model Optimizer's mixins slice nn.Linear weights; "
            "a Conv1D stores them transposed)"
        )
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if len(producers) != 1 or not readers:
        return None, (
            f"{core_attr}: no single linear produces its output ({', '.join(producers) or 'none'})"
            " or none reads its input"
        )
    down = producers[0]
    others = sorted(set(flow.linears) - set(readers) - {down})
    if others:
        return None, f"{core_attr}: linears {others} neither read its input nor produce its output"
    lins = flow.linears
    measured = ""
    if width is None:  # the default leaves it to the modeling code: the width down reads
        width, measured = (
            lins[down].in_features,
            f" (None in the config: {down} reads {lins[down].in_features})",
        )
    bad = [n for n in readers if lins[n].out_features != width]
    if bad or lins[down].in_features != width:
        return None, (
            f"{core_attr}: the projections' widths do not all equal config.{width_field}={width} "
            f"(a fused projection, say), so rows cannot be pruned by the FFN width"
        )
    evidence = (
        f"traced forward of a tiny model: {', '.join(readers)} read {core_attr}'s input and "
        f"output config.{width_field} features{measured}; {down} produces {core_attr}'s output",
    )
    stack = spec.layer_stack
    return (
        FFNLayer(
            down_proj_name=f"{core_attr}.{down}",
            ffn_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            linear_weight_names=tuple(sorted([down, *readers])),
            evidence=evidence,
        ),
        "",
    )


def kv_layer(spec, kind, model, text, vocab, index):
    import torch

    from ..kinds import holds

    core_attr = single_core(kind, "attention")
    layer_path = f"{spec.layer_stack}.{index}"
    # the field this layer reads its KV heads from (a kind's layers may read different ones:
    # Inkling's sliding layers read swa_num_key_value_heads)
    kv_override = next(
        (
            o
            for o in kind.overrides
            if o.block_config_attr == "attention.num_key_value_heads"
            and all(holds(t, model.get_submodule(layer_path), {}) for t in o.layers)
        ),
        None,
    )
    if core_attr is None or kv_override is None:
        return None, "the attention subblock has no single core module with a KV-heads override"
    core = model.get_submodule(f"{layer_path}.{core_attr}")
    flow = Flow(model, core, vocab)
    readers, producers = flow.readers_of_input(), flow.producer_of_output()
    if not flow.linears:
        return None, (
            f"{core_attr} holds no nn.Linear (Model Optimizer's mixins slice nn.Linear weights; "
            "a Conv1D stores them transposed)"
        )
    if len(readers) != 3 or len(producers) != 1:
        return None, (
            f"{core_attr}: {len(readers)} projection(s) read its input ({', '.join(readers)}), "
            f"{len(producers)} produce(s) its output, not three separate q, k and v and one o; "
            "Model Optimizer's KV-heads mixin slices q, k, v and o as separate tensors"
        )
    o = producers[0]
    kv_field = kv_override.config_field
    heads = getattr(text, "num_attention_heads", None)
    kv = config_value(text, kv_field)
    smaller = [d for d in range(1, (heads or 0) + 1) if heads % d == 0 and d != kv]
    if not smaller:
        return None, f"cannot change config.{kv_field} to tell q from k and v"
    try:
        changed_model, _ = tiny_model(spec, **{kv_field: smaller[0]})
    except Exception as exc:
        return None, f"a tiny model with another {kv_field} does not build: {exc}"
    changed_core = changed_model.get_submodule(f"{layer_path}.{core_attr}")
    follows = [
        n
        for n in readers
        if changed_core.get_submodule(n).weight.shape != core.get_submodule(n).weight.shape
    ]
    if len(follows) != 2:
        return None, f"config.{kv_field} resizes {follows}, not exactly two of {readers}"
    (q,) = [n for n in readers if n not in follows]
    q_out = core.get_submodule(q).weight.shape[0]
    o_in = core.get_submodule(o).weight.shape[1]
    if q_out != o_in:  # Qwen3-Next: q_proj also computes the output gate
        return None, (
            f"{core_attr}.{q} outputs {q_out} values, {o} reads {o_in}: the query projection "
            "holds more than the queries (an output gate), and Model Optimizer's KV-heads mixin "
            "would slice its rows as query heads"
        )
    base = flow.inputs[o]
    linear_in_v = []
    for n in follows:
        scaled = Flow(model, core, vocab, scale=n)
        if torch.allclose(scaled.inputs[o], 2 * base, rtol=1e-4, atol=1e-6):
            linear_in_v.append(n)
    if len(linear_in_v) != 1:
        return None, f"cannot tell v from k: doubling {linear_in_v} doubles {o}'s input"
    v = linear_in_v[0]
    (k,) = [n for n in follows if n != v]
    evidence = (
        f"traced forward of a tiny model: {q}, {k}, {v} read {core_attr}'s input, {o} produces "
        f"its output; config.{kv_field} resizes {k} and {v}; doubling {v}'s output doubles "
        f"{o}'s input (attention is linear in v)",
    )
    stack = spec.layer_stack
    return (
        KVHeadsLayer(
            o_proj_name=f"{core_attr}.{o}",
            attn_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            qkvo_weight_names=(q, k, v, o),
            evidence=evidence,
        ),
        "",
    )
