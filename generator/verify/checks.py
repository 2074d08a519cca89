"""The checks of `puzzle-gen verify`, each against the reference model, never the descriptor.

Every check is one function `check_x(subject) -> detail`; it raises VerificationError naming the
layer and the module when the descriptor is wrong. `CHECKS` lists them in the order they run,
with what each compares against. `puzzle-gen verify` and tests/test_generated_descriptors.py run
exactly these functions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from .models import (
    VerificationError,
    build,
    expect,
    layer_io,
    logits,
    reference_model,
    replace_layer_input,
    save_sharded,
    shapes,
    under,
)
from ..heterogeneous import config_value
from ..kinds import settable
from ..tiny import default_config
from .oracle import KINDS, Reference, set_size

_PREFIX = {"attention": "attn", "ffn": "mlp"}


@dataclass
class Subject:
    """A descriptor, the config class it describes, and the tiny config it is verified on."""

    descriptor: type
    config_cls: type
    config: Any  # the tiny verification config
    tied_config: Any  # the same with tied embeddings; None where the config class refuses them
    tied_refused: str = ""  # why there is no tied config (the config class's own error)

    @cached_property
    def reference(self) -> Reference:
        return Reference(self.config)

    @property
    def n(self) -> int:
        return self.reference.num_layers

    def groups(self, names) -> dict[str, set[str]]:
        grouped = self.descriptor.get_weight_groups(list(names), self.n)
        return {k: set(v) for k, v in grouped.items()}


def _short(names, limit: int = 4) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _modules(names, prefix: str) -> str:
    """Tensor names shown as the modules of a layer they belong to."""
    cut = len(prefix) + 1
    return _short({n[cut:].rsplit(".", 1)[0] for n in names})


# -- 1. names -----------------------------------------------------------------------------------
def check_names(s: Subject) -> str:
    d, ref = s.descriptor, s.reference
    model = ref.model
    embed = ref.paths[id(model.get_input_embeddings())]
    head = ref.paths[id(model.get_output_embeddings())]
    expect(
        d.input_embedding_name() == embed,
        f"input_embedding_name() is {d.input_embedding_name()!r}; "
        f"get_input_embeddings() is {embed!r}",
    )
    expect(
        d.output_embedding_name() == head,
        f"output_embedding_name() is {d.output_embedding_name()!r}; "
        f"get_output_embeddings() is {head!r}",
    )
    classes = d.decoder_layer_cls()
    classes = tuple(classes) if isinstance(classes, (list, tuple)) else (classes,)
    for i in range(s.n):
        expect(
            d.layer_block_name(i) == ref.layer_path(i),
            f"layer_block_name({i}) is {d.layer_block_name(i)!r}; layer {i} of the stack is "
            f"{ref.layer_path(i)!r}",
        )
        expect(
            isinstance(ref.layer(i), classes),
            f"layer {i} is a {type(ref.layer(i)).__name__}, not among decoder_layer_cls() "
            f"{[c.__name__ for c in classes]}",
        )
    norm = d.final_norm_name()
    norms = ref.final_norms
    if norms:
        expect(
            norm in norms,
            f"final_norm_name() is {norm!r}; after the last layer the model applies {norms}",
        )
    else:
        expect(norm is None, f"final_norm_name() is {norm!r}; the model applies no final norm")
    return (
        f"embedding {embed}, head {head}, final norm {norm}, layers {ref.layer_path(0)}.."
        f"{s.n - 1}"
    )


# -- 2. identity --------------------------------------------------------------------------------
def check_identity(s: Subject) -> str:
    ref = s.reference
    candidate = build(s.descriptor, s.config, ref.own_block_configs())
    got = shapes(candidate)
    missing, extra = set(ref.state_shapes) - set(got), set(got) - set(ref.state_shapes)
    expect(not missing, f"the patched model lacks {_short(missing)}")
    expect(not extra, f"the patched model has extra tensors {_short(extra)}")
    wrong = sorted(k for k in got if got[k] != ref.state_shapes[k])
    expect(
        not wrong,
        "shapes differ from the original: "
        + ", ".join(f"{k} {got[k]} != {ref.state_shapes[k]}" for k in wrong[:3]),
    )
    candidate.load_state_dict(ref.model.state_dict())
    out = logits(candidate, ref.input_ids)
    expect(torch.equal(out, ref.logits), f"logits differ (max {_diff(out, ref.logits)})")
    return f"{len(got)} tensors with the original's names and shapes; logits bit-equal"


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"abs diff {(a.float() - b.float()).abs().max().item():.3g}"


# -- 3. weight groups ---------------------------------------------------------------------------
def _partition(s: Subject, names, label: str, n: int) -> None:
    predicates = s.descriptor.layer_name_predicates(n)
    for name in names:
        hits = [g for g, p in predicates.items() if p.match(name)]
        expect(len(hits) == 1, f"{label} model: {name} is in {hits or 'no group'}")
    grouped = s.descriptor.get_weight_groups(list(names), n)
    expect(sum(map(len, grouped.values())) == len(names), f"{label}: grouping lost names")


def _variants(s: Subject):
    """Other configs of the same type the descriptor must also partition: the default sizes,
    tied embeddings, and every `*_bias` option the config has turned on."""
    yield "default-size", default_config(s.config_cls)
    if s.tied_config is not None:
        yield "tiny tied", s.tied_config
    flags = {k: True for k, v in s.config.to_dict().items() if k.endswith("_bias") and v is False}
    if flags:
        variant = copy.deepcopy(s.config)
        for k, v in flags.items():
            setattr(variant, k, v)
        yield "tiny with " + ", ".join(sorted(flags)), variant


def check_groups(s: Subject) -> str:
    ref = s.reference
    for label, config in _variants(s):
        names = list(shapes(reference_model(config, device="meta")))
        n = int(config.get_text_config().num_hidden_layers)
        _partition(s, names, label, n)
    names = list(ref.state_shapes)
    _partition(s, names, "tiny", s.n)
    groups = s.groups(names)
    stack = under(names, ref.stack_path)
    unobserved = set(names) - stack - ref.before_stack - ref.after_stack
    for group, want, stage in (
        ("embeddings", ref.before_stack, "before layer 0"),
        ("lm_head", ref.after_stack, "after the last layer"),
    ):
        got = groups.get(group, set()) - unobserved
        expect(
            not want - got,
            f"{group} lacks {_short(want - got)}, which the model runs {stage}",
        )
        expect(
            not got - want,
            f"{group} holds {_short(got - want)}, which the model does not run {stage}",
        )
    # what a text-only forward never runs outside the language model (the module holding the
    # layers): a vision tower and its projector, in a group of its own (Model Optimizer's
    # vision_encoding) that holds nothing else
    owner = ref.stack_path.rpartition(".")[0]
    beside = {n for n in unobserved - stack if not (owner and n.startswith(owner + "."))}
    others = {g: v for g, v in groups.items() if g not in ("embeddings", "lm_head")}
    others = {g: v for g, v in others.items() if not g.startswith("block_")}
    if others or beside:
        encoder = set().union(*others.values()) if others else set()
        expect(
            encoder == beside,
            f"{', '.join(sorted(others)) or 'no group of its own'} holds "
            f"[{_short(encoder)}]; the tensors beside the language model that a text-only "
            f"forward never runs are [{_short(beside)}]",
        )
    for i in range(s.n):
        roles = ref.roles(i)
        prefix = ref.layer_path(i)
        layer_names = under(names, prefix)
        children = {c for k in KINDS for c in roles.members[k]} | roles.shared | roles.unused
        loose = layer_names - ref.layer_tensors(i, children)  # tensors of the layer itself
        flexible = ref.layer_tensors(i, roles.shared | roles.unused) | loose
        for kind in KINDS:
            group = f"block_{i}_{kind}"
            got = groups.get(group, set())
            want = ref.layer_tensors(i, roles.members[kind])
            expect(
                not want - got,
                f"{group} lacks {_modules(want - got, prefix)} of layer {i}'s {kind} "
                f"({roles.describe()})",
            )
            expect(
                not got - want - flexible,
                f"{group} holds {_modules(got - want - flexible, prefix)}, not part of layer "
                f"{i}'s {kind} ({roles.describe()})",
            )
        outside = {k for k, v in groups.items() if v & layer_names} - {
            f"block_{i}_{k}" for k in KINDS
        }
        expect(not outside, f"tensors of layer {i} are in {sorted(outside)}")
    return f"{len(names)} tensors; layer 0: {ref.roles(0).describe()}"


# -- 4. overrides -------------------------------------------------------------------------------
def check_overrides(s: Subject) -> str:
    ref = s.reference
    fields = ref.size_fields
    if not fields:  # nothing a block config carries changes a shape (Bloom: 4 x hidden, MHA)
        return "the model reads no block-config size from its config: nothing to override"
    done = []
    for size, sf in fields.items():
        kind, layer = sf.kind, sf.layer
        prefix = ref.layer_path(layer)
        blocks = ref.own_block_configs()
        set_size(blocks[layer], size, sf.smaller)
        got = shapes(build(s.descriptor, s.config, blocks, device="meta"))
        resized = ref.meta_shapes(ref.with_fields({sf.field: sf.smaller}))
        want = dict(ref.state_shapes)
        for name in under(resized, prefix) | under(want, prefix):
            want.pop(name, None)
            if name in resized:
                want[name] = resized[name]
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if wrong and all(got.get(k) == ref.state_shapes.get(k) for k in wrong):
            raise VerificationError(
                f"no override for {size}: config.{sf.field} changes layer {layer}'s {kind} "
                f"tensors ({_modules(wrong, prefix)}), but {size}={sf.smaller} builds the "
                f"original layer"
            )
        expect(
            not wrong,
            f"{size}={sf.smaller} on layer {layer}: "
            + ", ".join(f"{k} {got.get(k)} != {want.get(k)}" for k in wrong[:3])
            + f" (want the shapes of config.{sf.field}={sf.smaller})",
        )
        done.append(f"{size} -> config.{sf.field}" + _check_whole_kind(s, size, sf))
    top_k = _check_top_k(s)
    if top_k:
        done.append(top_k)
    return "; ".join(done) or "the model reads no block-config size from its config"


def _check_whole_kind(s: Subject, size: str, sf) -> str:
    """The size asked of every layer of layer sf.layer's kind changes the same tensors in each
    of them: a kind whose layers read the size from different config fields (Inkling's sliding
    layers read swa_num_key_value_heads, its full layers num_key_value_heads) must have each of
    them written, or a block config resizes some of its layers and silently not the others."""
    ref = s.reference
    same = [
        i for i in range(ref.num_layers) if ref.kind_signature(i) == ref.kind_signature(sf.layer)
    ]
    if len(same) < 2:
        return ""
    blocks = ref.own_block_configs()
    for i in same:
        set_size(blocks[i], size, sf.smaller)
    got = shapes(build(s.descriptor, s.config, blocks, device="meta"))
    first = ref.layer_path(sf.layer)
    moved = {
        name[len(first) + 1 :]
        for name in under(ref.state_shapes, first)
        if got.get(name) != ref.state_shapes[name]
    }
    for i in same:
        prefix = ref.layer_path(i)
        stale = sorted(
            rel
            for rel in moved
            if f"{prefix}.{rel}" in ref.state_shapes
            and got.get(f"{prefix}.{rel}") == ref.state_shapes[f"{prefix}.{rel}"]
        )
        expect(
            not stale,
            f"{size}={sf.smaller} on every layer of layer {sf.layer}'s kind resizes layer "
            f"{sf.layer}'s {', '.join(sorted(moved)[:2])} but not layer {i}'s "
            f"{', '.join(stale[:2])}: that layer reads the size from another config field, "
            "which no override writes",
        )
    return f" (all {len(same)} layers of its kind)"


def _check_top_k(s: Subject) -> str | None:
    """The experts a token is routed to change no shape but the logits: block configs asking
    every layer for fewer must give the logits of the reference built with that many."""
    ref = s.reference
    field, experts = ref.top_k_field, ref.size_fields.get("ffn.moe.num_local_experts")
    if field is None or experts is None:
        return None
    value = config_value(ref.text, field)
    fewer = value - 1 if value > 1 else None
    if fewer is None:
        return None
    other = reference_model(ref.with_fields({field: fewer}))
    other.load_state_dict(ref.model.state_dict())
    want = logits(other, ref.input_ids)
    if torch.equal(want, ref.logits):
        return None  # the model does not route by it
    blocks = ref.own_block_configs()
    for block in blocks:
        if "moe" in block["ffn"]:
            block["ffn"]["moe"]["num_experts_per_tok"] = fewer
    candidate = build(s.descriptor, s.config, blocks)
    candidate.load_state_dict(ref.model.state_dict())
    got = logits(candidate, ref.input_ids)
    if torch.equal(got, ref.logits):
        raise VerificationError(
            f"no override for ffn.moe.num_experts_per_tok: config.{field}={fewer} changes the "
            f"logits, but ffn.moe.num_experts_per_tok={fewer} builds the original routing"
        )
    expect(
        torch.equal(got, want),
        f"ffn.moe.num_experts_per_tok={fewer} on every layer: logits differ from the original "
        f"built with config.{field}={fewer} ({_diff(got, want)})",
    )
    return f"ffn.moe.num_experts_per_tok -> config.{field} (logits)"


# -- 5. no-ops ----------------------------------------------------------------------------------
def _no_op_model(s: Subject, layer: int, kinds: tuple[str, ...]):
    d, ref = s.descriptor, s.reference
    for kind in kinds:
        expect(
            getattr(d, f"{_PREFIX[kind]}_no_op_supported")(),
            f"the descriptor has no {kind} no-op",
        )
    blocks = ref.own_block_configs()
    for kind in kinds:
        blocks[layer][kind] = {"no_op": True}
    candidate = build(d, s.config, blocks)
    want = ref.model.state_dict()
    got = candidate.state_dict()
    expect(not set(got) - set(want), f"the no-op adds tensors {_short(set(got) - set(want))}")
    candidate.load_state_dict({k: want[k] for k in got})
    return candidate, set(want) - set(got)


def check_no_ops(s: Subject) -> str:
    """On the first layer of every layer kind (and on layer 1); then on each layer kind only
    another config of the type builds (see `other_kind_configs`), in a model of that config."""
    ref = s.reference
    layers = sorted(set(ref.kind_layers) | {1 % s.n})
    for layer in layers:
        _check_no_ops_on(s, layer)
    others = []
    for label, config, layer in other_kind_configs(s.config):
        variant = Subject(s.descriptor, s.config_cls, config, config)
        names = list(variant.reference.state_shapes)
        _partition(variant, names, f"{label} ({len(names)} tensors)", variant.n)
        _check_no_ops_on(variant, layer)
        others.append(f"{label}: layer {layer}")
    return (
        f"layers {', '.join(map(str, layers))}"
        + (f"; {'; '.join(others)}" if others else "")
        + ": each no-op removes exactly its subblock and matches the original"
    )


def other_kind_configs(config):
    """(label, config, layer) for each layer kind the reference builds when the last layer of a
    per-layer type list (`layer_types`, `mlp_layer_types`) takes another value that the model's
    own source names (LFM2's default config has attention layers only; "conv" builds its short
    convolution layers), and that no layer of `config` has."""
    import inspect

    from transformers import configuration_utils as cu

    text = config.get_text_config()
    vocab = {
        "layer_types": getattr(cu, "ALLOWED_ATTN_LAYER_TYPES", ()),
        "mlp_layer_types": getattr(cu, "ALLOWED_MLP_LAYER_TYPES", ()),
    }
    base = reference_model(config, device="meta")
    stack = _stack_of(base, int(text.num_hidden_layers))
    if stack is None:
        return
    known = {_kind_signature(layer) for layer in stack}
    sources = ""
    for obj in (type(config), type(text), type(base)):
        try:
            sources += inspect.getsource(inspect.getmodule(obj))
        except (OSError, TypeError):
            pass
    for field, values in vocab.items():
        current = getattr(text, field, None)
        if not isinstance(current, list) or not all(isinstance(v, str) for v in current):
            continue
        for value in values:
            if value in current or f'"{value}"' not in sources:
                continue
            variant = copy.deepcopy(config)
            if not settable(variant.get_text_config(), field, current[:-1] + [value]):
                break  # derived from other fields (a read-only property): not a per-layer choice
            try:
                other = _stack_of(reference_model(variant, device="meta"), len(current))
            except Exception:
                continue
            if other is None or _kind_signature(other[-1]) in known:
                continue
            known.add(_kind_signature(other[-1]))
            yield f"{field}[-1] = {value!r}", variant, len(current) - 1


def _stack_of(model, n: int):
    lists = [m for _, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    lists = [m for m in lists if len(m) == n]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _kind_signature(layer) -> tuple:
    return (type(layer), tuple((n, type(c)) for n, c in layer.named_children()))


def _check_no_ops_on(s: Subject, layer: int) -> None:
    ref = s.reference
    prefix = ref.layer_path(layer)
    groups = s.groups(ref.state_shapes)
    roles = ref.roles(layer)
    for kind in KINDS:
        candidate, removed = _no_op_model(s, layer, (kind,))
        members = ref.layer_tensors(layer, roles.members[kind])
        expect(
            removed == members,
            f"{kind} no-op on layer {layer} removes [{_modules(removed, prefix)}]; "
            f"the {kind} subblock is [{_modules(members, prefix) or '-'}]",
        )
        # what a no-op keeps in place: shared and unused children, and tensors of the layer
        # itself (Doge's residual scales), whichever group holds them
        children = {n for n, _ in ref.layer(layer).named_children()}
        own = under(ref.state_shapes, prefix) - ref.layer_tensors(layer, children)
        group = (
            groups.get(f"block_{layer}_{kind}", set())
            - ref.layer_tensors(layer, roles.shared | roles.unused)
            - own
        )
        expect(
            removed == group,
            f"{kind} no-op on layer {layer} removes [{_modules(removed, prefix)}]; its weight "
            f"group holds [{_modules(group, prefix) or '-'}]",
        )
        _, want = layer_io(ref.model, ref.layer(layer), ref.input_ids, ref.zeroed(layer, kind))
        _, got = layer_io(candidate, candidate.get_submodule(prefix), ref.input_ids)
        expect(
            torch.equal(got, want),
            f"{kind} no-op on layer {layer}: output differs from the original layer with its "
            f"{kind} zeroed ({_diff(got, want)})",
        )
    # both no-ops: the original layer with both subblocks zeroed (its input itself, unless
    # modules applied to the residual stream, post-LN norms, still shape it)
    candidate, _ = _no_op_model(s, layer, KINDS)
    _, want = layer_io(ref.model, ref.layer(layer), ref.input_ids, ref.zeroed(layer, KINDS))
    _, got = layer_io(candidate, candidate.get_submodule(prefix), ref.input_ids)
    expect(
        torch.equal(got, want),
        f"layer {layer} with both subblocks no-op differs from the original with both zeroed "
        f"({_diff(got, want)})",
    )


# -- 6. sharded stages --------------------------------------------------------------------------
def check_stages(s: Subject) -> str:
    from puzzletron_runtime import load_model

    ref, d = s.reference, s.descriptor
    splits = sorted({1, s.n // 2, s.n - 1} - {0, s.n})
    expect(splits, f"a model of {s.n} layer(s) cannot be split")
    with tempfile.TemporaryDirectory() as tmp:
        shards = save_sharded(ref.model, Path(tmp))
        whole = load_model(d, tmp, dtype=torch.float32)
        _expect_same_buffers(whole, ref.model)
        out = logits(whole, ref.input_ids)
        expect(
            torch.equal(out, ref.logits),
            f"the whole model's logits differ ({_diff(out, ref.logits)})",
        )
        for k in splits:
            first = load_model(d, tmp, owned_blocks=set(range(k)), dtype=torch.float32)
            second = load_model(d, tmp, owned_blocks=set(range(k, s.n)), dtype=torch.float32)
            # the whole forward: the stage's stand-ins after its last block must run as well
            _, hidden = layer_io(
                first, first.get_submodule(d.layer_block_name(k - 1)), ref.input_ids, whole=True
            )
            # a stage whose layers read inputs the model computes from the token ids (Gemma 4's
            # per-layer inputs) is given the token ids too; either way its first layer reads
            # the previous stage's hidden states
            if d.stages_need_token_ids():
                inputs = {"input_ids": ref.input_ids}
            else:
                inputs = {"inputs_embeds": torch.zeros(*ref.input_ids.shape, hidden.shape[-1])}
            entry = second.get_submodule(d.layer_block_name(k))
            with replace_layer_input(entry, hidden), torch.no_grad():
                out = second(**inputs).logits
            expect(
                torch.equal(out, ref.logits),
                f"stages [0, {k}) + [{k}, {s.n}): logits differ from the original "
                f"({_diff(out, ref.logits)})",
            )
    return (
        f"{len(shards)} shards; whole model (every buffer equal) and splits at {splits} give "
        "the original's logits"
    )


def _expect_same_buffers(loaded, original) -> None:
    """Every buffer, in the state dict or not (rotary frequencies, embedding scales, causal
    masks), equals the one the original model built on its own."""
    want = dict(original.named_buffers())
    got = dict(loaded.named_buffers())
    expect(set(got) == set(want), f"buffers differ: {_short(set(got) ^ set(want))}")
    for name, buf in want.items():
        expect(
            got[name].dtype == buf.dtype and torch.equal(got[name], buf),
            f"buffer {name} differs after loading ({got[name].dtype} vs {buf.dtype}; "
            f"{_diff(got[name], buf)})",
        )


# -- 7. heterogeneous round trip ----------------------------------------------------------------
def check_round_trip(s: Subject) -> str:
    from puzzletron_runtime import load_model

    details = []
    for tied, config in ((False, s.config), (True, s.tied_config)):
        if config is None:
            continue  # the config class refuses tied embeddings: said below
        ref = s.reference  # tying changes no layer: the same block configs apply
        blocks = ref.own_block_configs()
        # every size the reference still runs with (shapes alone are checked by `overrides`)
        runnable = [size for size in ref.size_fields if ref.runs_with(size)]
        for size in runnable:
            sf = ref.size_fields[size]
            set_size(blocks[sf.layer], size, sf.smaller)
        blocks[-1]["attention"] = {"no_op": True}
        config = copy.deepcopy(config)
        config.block_configs = blocks
        config.get_text_config().block_configs = blocks  # where a nested text model reads them
        source = build(s.descriptor, config, seed=3)
        want = logits(source, ref.input_ids)
        with tempfile.TemporaryDirectory() as tmp:
            save_sharded(source, Path(tmp))
            loaded = load_model(s.descriptor, tmp, dtype=torch.float32)
            got = logits(loaded, ref.input_ids)
        # tied exactly when transformers' own model of this config ties (Moshi and
        # Nemotron-H keep their own head whatever tie_word_embeddings says)
        want_tied = _is_tied(reference_model(config, device="meta"))
        expect(
            _is_tied(loaded) == want_tied,
            (
                "the loaded model's head is no longer tied to its embedding"
                if want_tied
                else "the loaded model's head is tied to its embedding; the original's is not"
            ),
        )
        expect(
            torch.equal(want, got), f"logits differ after loading (tied={tied}; {_diff(got, want)})"
        )
        details.append("tied" if tied else "untied")
    skipped = [size for size in ref.size_fields if not ref.runs_with(size)]
    note = f" (not resized: {', '.join(skipped)}, the original does not run so)" if skipped else ""
    if s.tied_config is None:
        note += f"; no tied checkpoint: the config refuses tied embeddings ({s.tied_refused})"
    return (
        "block_configs in config.json; " + ", ".join(details) + " checkpoints load bit-equal" + note
    )


def _is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


@dataclass(frozen=True)
class CheckDef:
    name: str
    fn: Callable[[Subject], str]
    reference: str  # what the check compares against


CHECKS: tuple[CheckDef, ...] = (
    CheckDef(
        "names",
        check_names,
        "get_input_embeddings() / get_output_embeddings(), the layer stack and the norm the "
        "original applies after its last layer (forward hooks)",
    ),
    CheckDef(
        "identity",
        check_identity,
        "the original model: block configs of its own sizes give its tensor names, shapes and "
        "bit-equal logits with its weights",
    ),
    CheckDef(
        "weight groups",
        check_groups,
        "the modules the original runs before layer 0 / after the last layer, and each layer's "
        "subblock modules found by zeroing and scaling them",
    ),
    CheckDef(
        "overrides",
        check_overrides,
        "the original built with the config field set to the block config's size",
    ),
    CheckDef(
        "no-ops",
        check_no_ops,
        "the original layer with that subblock's outputs zeroed (forward hooks)",
    ),
    CheckDef(
        "sharded stages",
        check_stages,
        "the original's buffers and logits, from its save_pretrained checkpoint loaded whole "
        "and in two stages",
    ),
    CheckDef(
        "heterogeneous round trip",
        check_round_trip,
        "the heterogeneous model before saving (the loader must honour block_configs)",
    ),
)
