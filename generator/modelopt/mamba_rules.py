"""Mamba sizes Model Optimizer's MambaConfig requires (state_dim, num_heads, head_dim,
num_groups) where no per-layer override of the kind sets them, each read from a config field
confirmed on tiny and default-size builds of the type (a `SizeProbe`).

Three rules, tried in order:

1. a field of the override inference's candidates (overrides.MAMBA_FIELDS) that the config holds
   as a number and whose whole-model change resizes that layer's mixer and nothing outside the
   mixers (transformers reads the whole model's value: Nemotron-H's mamba_num_heads);
2. a plain-named field (`num_heads`, `head_dim`: Mamba2Config's) whose change resizes only the
   tensors the kind's Mamba state size resizes, layer by layer. Attention layers read the same
   names, so the field counts as the state-space mixer's only where its change stays inside the
   modules the state size resizes;
3. the head width where no field changes a shape (Mamba-2's inner width is `expand` x hidden,
   its heads view it as heads x head width): the candidate field whose value times the kind's
   heads equals the width the mixer's output projection reads, on tiny and default-size models,
   and whose change changes what a tiny model computes.
"""

from __future__ import annotations

from ..errors import PuzzleGenError
from .kind_reads import kind_override, kind_weight_modules

# Plain-named Mamba sizes (tried after overrides.MAMBA_FIELDS, confined to the state-space mixer)
PLAIN_MAMBA_FIELDS = {
    "attention.mamba.num_heads": ("num_heads",),
    "attention.mamba.head_dim": ("head_dim",),
}
STATE_DIM = "attention.mamba.state_dim"
NUM_HEADS = "attention.mamba.num_heads"
HEAD_DIM = "attention.mamba.head_dim"


def mamba_rule(probe, kind, size: str) -> tuple[str, str]:
    """(expression, note) of Mamba size `size` of `kind`; PuzzleGenError when no rule holds."""
    from ..overrides import MAMBA_FIELDS

    found = resizing_field(probe, kind, MAMBA_FIELDS[size])
    if found is not None:
        return f"text_config.{found}", (
            f"config.{found}: it resizes every mixer's tensors; not per layer "
            "(transformers reads the whole model's value)"
        )
    plain = PLAIN_MAMBA_FIELDS.get(size, ())
    state = state_field(probe, kind)
    if plain and state is not None:
        found = resizing_field(probe, kind, plain, within=resized_modules(probe, state))
        if found is not None:
            return f"text_config.{found}", (
                f"config.{found}: it resizes only the layer modules config.{state} (the state size) "
                "resizes: the state-space mixer's"
            )
    if size == HEAD_DIM:
        return head_width_rule(probe, kind, (*MAMBA_FIELDS[size], *plain))
    raise PuzzleGenError(f"no config field holds {size}")


def _number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _diff(probe, name: str) -> set[str] | None:
    """The tensors whose shape changes when the whole model's `name` takes another value (None:
    the field is no number, or the changed config does not build)."""
    from ..overrides import _other_size

    text = probe.tiny.get_text_config()
    value = getattr(text, name, None)
    if not _number(value):
        return None
    base = probe.shapes(probe.tiny)
    try:
        changed = probe.shapes(probe.config(**{name: _other_size(value, text)}))
    except Exception:
        return None
    return {k for k in set(base) | set(changed) if base.get(k) != changed.get(k)}


def _module(probe, key: str) -> tuple[str, str] | None:
    """(layer index, layer child) of a tensor name inside the layer stack, else None."""
    if not key.startswith(f"{probe.stack}."):
        return None
    index, _, rest = key[len(probe.stack) + 1 :].partition(".")
    return index, rest.split(".")[0]


def resized_modules(probe, name: str) -> set[tuple[str, str]]:
    """The (layer index, layer child) pairs whose tensors a whole-model change of `name`
    resizes (empty: none, or something outside the stack)."""
    diff = _diff(probe, name) or set()
    modules = {_module(probe, k) for k in diff}
    return set() if None in modules else modules


def resizing_field(probe, kind, names, within=None) -> str | None:
    """The first of `names` whose whole-model change resizes the tensors of the first layer of
    `kind`, and only tensors of the kind's mixers (`within` None) or of the (layer index, layer
    child) pairs `within`."""
    index = str(probe.layer_of(kind, probe.tiny))
    mixers = kind_weight_modules(kind, "attention")
    for name in names:
        diff = _diff(probe, name)
        if not diff:
            continue
        modules = {_module(probe, k) for k in diff}
        if None in modules:
            continue
        inside = modules <= within if within is not None else all(c in mixers for _, c in modules)
        if inside and any(i == index for i, _ in modules):
            return name
    return None


def state_field(probe, kind) -> str | None:
    """The config field of the kind's Mamba state size: its override's, or rule 1's."""
    from ..overrides import MAMBA_FIELDS

    o = kind_override(kind, STATE_DIM)
    if o is not None:
        return o.config_field
    return resizing_field(probe, kind, MAMBA_FIELDS[STATE_DIM])


def head_width_rule(probe, kind, names) -> tuple[str, str]:
    """Rule 3: the head width of a mixer whose head width resizes nothing."""
    import torch

    from .traced import Flow, single_core, tiny_model

    o = kind_override(kind, NUM_HEADS)
    heads = (
        f"text_config.{o.config_field}" if o is not None else mamba_rule(probe, kind, NUM_HEADS)[0]
    )
    core = single_core(kind, "attention")
    if core is None:
        raise PuzzleGenError(f"no single mixer module to measure {HEAD_DIM} on")
    model, config = tiny_model(probe.spec)
    index = probe.layer_of(kind, config)
    flow = Flow(
        model,
        model.get_submodule(f"{probe.stack}.{index}.{core}"),
        config.get_text_config().vocab_size,
    )
    producers = flow.producer_of_output()
    if len(producers) != 1:
        raise PuzzleGenError(f"no single output projection of {core} to measure {HEAD_DIM} on")
    out = f"{core}.{producers[0]}"
    widths = []
    for c in (probe.tiny, probe.default):
        layer = probe.model(c).get_submodule(probe.stack)[probe.layer_of(kind, c)]
        widths.append((c.get_text_config(), layer.get_submodule(out).in_features))
    ids = torch.arange(8).unsqueeze(0) % config.get_text_config().vocab_size
    with torch.no_grad():
        base = model(input_ids=ids).logits
    for name in names:
        if not all(
            _number(getattr(t, name, None)) and getattr(t, name) * probe.evaluate(heads, t) == w
            for t, w in widths
        ):
            continue
        # the same weights (no shape changes), another head width: what it computes changes
        try:
            other, _ = tiny_model(probe.spec, **{name: getattr(config.get_text_config(), name) * 2})
        except Exception:  # a config or model that refuses the value: nothing measured
            continue
        try:
            with torch.no_grad():
                read = not torch.equal(other(input_ids=ids).logits, base)
        except Exception:
            read = True  # the forward cannot view the inner width with that head width
        if read:
            return f"text_config.{name}", (
                f"config.{name}: times the heads ({heads.removeprefix('text_config.')}) it is the "
                f"width {out} reads (tiny and default-size models); no tensor has its size"
            )
    raise PuzzleGenError(f"no config field holds {HEAD_DIM}")
