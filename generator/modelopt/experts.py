"""The expert-removal layer descriptor (Model Optimizer's ExpertRemovalLayerDescriptor) of a
layer kind with experts, from a probe build with more experts and a traced forward."""

from __future__ import annotations

from ..heterogeneous import config_value
from .kind_reads import kind_cores, kind_override
from .pruning_layers import ExpertsLayer
from .traced import single_core, tiny_model


def _resizes(model, more, path: str) -> bool:
    """Does module `path` of `more` hold tensors shaped otherwise than in `model`?"""
    shapes = [
        {k: tuple(v.shape) for k, v in m.get_submodule(path).state_dict().items()}
        for m in (model, more)
    ]
    return shapes[0] != shapes[1]


def experts_layer(spec, kind, model, config, index):
    """Model Optimizer's expert removal keeps some experts of a layer: it slices the router's
    rows and the experts' tensors (per expert, or along the first dimension of fused tensors).

    From a probe build with two more experts (the kind's expert-count field): the tensors of the
    MoE module whose shape changes are the router's and the experts'. Fused experts: tensors
    whose first dimension is the expert count, and only that dimension changes; per-expert: the
    tensors below the nn.ModuleList whose length is the expert count. The router is the module
    of the remaining changed tensors whose input is the MoE module's input and whose output (its
    first element, as Model Optimizer's voting hooks read it) holds one logit per expert; its
    2-D tensors are its weights, its 1-D ones its biases. Anything else that changes with the
    count (a tensor sliced along another dimension) and there is no descriptor."""
    import torch
    from torch import nn

    count = kind_override(kind, "ffn.moe.num_local_experts")
    if count is None:
        return None, "the FFN subblock has no expert-count override"
    text = config.get_text_config()
    field = count.config_field
    experts = config_value(text, field)  # dotted: a sub-config field
    stack = spec.layer_stack
    try:
        more, _ = tiny_model(spec, **{field: experts + 2})
    except Exception as exc:
        return None, f"a tiny model with another {field} does not build: {exc}"
    # the FFN core whose tensors the expert count resizes: the only core, or the one of several
    # (GraniteMoE-Hybrid's experts beside a shared MLP, each a core of the FFN subblock)
    core_attr = single_core(kind, "ffn")
    if core_attr is None:
        resized = [
            c for c in kind_cores(kind, "ffn") if _resizes(model, more, f"{stack}.{index}.{c}")
        ]
        if len(resized) != 1:
            return None, (
                f"config.{field} resizes {len(resized)} of the FFN subblock's cores "
                f"({', '.join(kind_cores(kind, 'ffn'))}), not one"
            )
        (core_attr,) = resized
    path = f"{stack}.{index}.{core_attr}"
    core = model.get_submodule(path)
    before = {k: tuple(v.shape) for k, v in core.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in more.get_submodule(path).state_dict().items()}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    lists = [
        n
        for n, m in core.named_modules()
        if n and isinstance(m, nn.ModuleList) and len(m) == experts
    ]
    if len(lists) > 1:
        return None, f"{core_attr}: several module lists of {experts} modules ({lists})"
    experts_path = lists[0] if lists else None
    below_list = {k for k in changed if experts_path and k.startswith(f"{experts_path}.")}
    owners = sorted({k.rpartition(".")[0] for k in changed if k not in below_list})
    # the router: the module among the owners of changed tensors that reads the MoE module's
    # input and outputs one logit per expert (its first output, as the voting hooks read it)
    seen: dict[str, dict] = {o: {} for o in owners}

    def hook_for(name):
        def hook(_m, args, kwargs, output):
            seen[name].setdefault("in", args[0] if args else next(iter(kwargs.values()), None))
            seen[name].setdefault("out", output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def core_hook(_m, args, kwargs, output):
        seen.setdefault("", {}).setdefault("in", args[0] if args else kwargs.get("hidden_states"))

    hooks = [core.register_forward_hook(core_hook, with_kwargs=True)]
    for o in owners:
        hooks.append(core.get_submodule(o).register_forward_hook(hook_for(o), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(8).unsqueeze(0) % text.vocab_size)
    finally:
        for h in hooks:
            h.remove()
    core_in = seen.get("", {}).get("in")

    def reads_input(x) -> bool:
        return (
            torch.is_tensor(x)
            and torch.is_tensor(core_in)
            and x.shape[-1] == core_in.shape[-1]
            and torch.equal(x.reshape(-1, x.shape[-1]), core_in.reshape(-1, core_in.shape[-1]))
        )

    routers = [
        o
        for o in owners
        if reads_input(seen[o].get("in"))
        and torch.is_tensor(seen[o].get("out"))
        and seen[o]["out"].shape[-1] == experts
    ]
    if len(routers) != 1:
        return None, (
            f"{core_attr}: {len(routers)} module(s) among those config.{field} resizes "
            f"({', '.join(owners) or 'none'}) read its input and output one logit per expert, "
            "not one router"
        )
    (router_path,) = routers

    def one_row_per_expert(k) -> bool:
        rows = before.get(k, (None,))[:1], after.get(k, (None,))[:1]
        return rows == ((experts,), (experts + 2,)) and before[k][1:] == after[k][1:]

    rest = [k for k in changed if k.rpartition(".")[0] == router_path]
    for k in rest:
        if not one_row_per_expert(k):
            return None, f"{core_attr}: {k} does not have one row per expert"
    others = [k for k in changed if k not in rest and k not in below_list]
    # a per-expert bias of the routing kept beside the router (DeepSeek-style score correction
    # on the MoE module): one value per expert, outside the module that holds the experts
    matrices = {k.rpartition(".")[0] for k in others if len(before.get(k, ())) >= 2}
    routing = [
        k
        for k in others
        if len(before.get(k, ())) == 1
        and one_row_per_expert(k)
        and k.rpartition(".")[0] not in matrices
    ]
    rest += routing
    others = [k for k in others if k not in routing]
    if experts_path:
        if others:
            return None, f"{core_attr}: {others} change with config.{field} too"
        per_expert = sorted(
            k[len(experts_path) + 3 :] for k in before if k.startswith(f"{experts_path}.0.")
        )
        one = {n: before[f"{experts_path}.0.{n}"] for n in per_expert}
        fused: list[str] = []
        shape = "per expert"
    else:
        # Model Optimizer slices the router's tensors and fused expert tensors by their first
        # dimension: a tensor with the experts along another (ERNIE-4.5's score-correction bias
        # of shape (1, experts) below the router) cannot be cut
        for k in others:
            grown = [i for i, (a, b) in enumerate(zip(before[k], after.get(k, ()))) if a != b]
            if grown and grown != [0]:
                return None, (
                    f"{core_attr}: {k} {before[k]} has the experts along dimension "
                    f"{grown[0]}, and Model Optimizer's expert removal slices the first"
                )
        holders = {k.rpartition(".")[0] for k in others}
        if len(holders) != 1:
            return None, f"{core_attr}: no single module holds the experts as fused tensors"
        (experts_path,) = holders
        fused = [k for k in before if k.rpartition(".")[0] == experts_path]
        for k in fused:
            if (
                k not in after
                or before[k][:1] != (experts,)
                or after[k]
                != (
                    experts + 2,
                    *before[k][1:],
                )
            ):
                return None, (
                    f"{core_attr}: {k} does not hold the experts along its first dimension"
                )
        per_expert, one = [], {}
        shape = "fused"
    weights = tuple(sorted(k for k in rest if len(before[k]) >= 2))
    biases = tuple(sorted(k for k in rest if len(before[k]) == 1))
    evidence = (
        f"probe: config.{field} + 2 resizes {', '.join(changed)} of {core_attr}",
        f"traced forward of a tiny model: {router_path} reads {core_attr}'s input and outputs "
        f"{experts} logits, one per expert; the experts are {shape} ({experts_path})",
    )
    return (
        ExpertsLayer(
            target_name=f"{core_attr}.{router_path}",
            moe_prefix_name=f"{stack}.{{layer_idx}}.{core_attr}",
            expert_prefix_name=f"{experts_path}.{{expert_idx}}" if shape == "per expert" else "",
            router_weights=weights,
            router_biases=biases,
            expert_weights=tuple(n for n in per_expert if len(one[n]) >= 2),
            expert_biases=tuple(n for n in per_expert if len(one[n]) == 1),
            is_fused_experts=shape == "fused",
            fused_expert_weights=tuple(fused) if shape == "fused" else (),
            evidence=evidence,
        ),
        "",
    )
