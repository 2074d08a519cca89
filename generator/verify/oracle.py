"""The oracle: what transformers' own model, built unpatched, says a descriptor must say.

Nothing here reads the descriptor or the generator's inference. Every fact comes from running
the reference model (the causal LM of the same config, built without the patcher) with hooks:

- the layer stack is the ModuleList of the text config's layer count whose layers run in order;
- the modules a pipeline stage needs before layer 0 are those that run, start to end, before
  layer 0 starts; after the last layer, those that run after it ends (final norm, head);
- a child whose output holds more than one tensor shaped like the hidden states it was called on
  hands on the residual stream and a value computed from it (DBRX's `norm_attn_norm`: the
  attention's join, then the FFN's norm): it is part of two subblocks, so its children with
  weights, at their dotted paths, stand in its place as the layer's *units*; "child" below means
  unit;
- inside a layer, the *cores* are the children holding matrices; an attention core is one called
  with context besides the hidden states (a cache, position embeddings, a mask), an FFN core one
  called on hidden states alone (first asked: does it mix tokens? Gemma 4's per-layer input gate
  and projection do not, so that segment is FFN, as the generator's data flow says); a chain of such children (one called on another's output) is
  one core, its last child, judged by that child, or, where that child is the identity with its
  weights zeroed (it refines its input: Inkling's short convolutions), by the child feeding it;
- every other child with weights (a norm) belongs to the subblock whose cores make it matter:
  scaling its output changes the layer's output when the FFN cores are zeroed but not when the
  attention cores are (attention), the reverse (FFN), or in both cases (shared: a parallel layout's
  common input norm).

"Zeroing a subblock" zeroes its cores' outputs and every module that is then called on one of
those zero tensors (a post-norm), which is what a subblock that contributes nothing means.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from puzzletron_runtime.puzzformer.patcher import set_config_field

from ..heterogeneous import config_value, field_names
from .roles import KINDS, LayerRoles, LayerRolesMixin, _params
from .models import (
    call_input,
    layer_change_fails,
    first_tensor,
    hooks,
    logits,
    reference_model,
    sample_input,
    shapes,
    under,
)

# Block-config sizes, and the config fields that may carry each one, in order of preference.
# The oracle only *offers* these: a field counts for a model when changing it changes the
# shapes of that subblock's tensors in the reference model and nothing else.
SIZE_FIELDS: dict[str, tuple[str, ...]] = {
    # KV heads: the names transformers' configs use for grouped-query / multi-query heads
    "attention.num_key_value_heads": (
        "num_key_value_heads",
        "num_kv_heads",
        "multi_query_group_num",
        "n_head_kv",
        "num_key_value_groups",
        "kv_n_heads",
    ),
    # a Mamba mixer in the attention's place: state size, heads, head width, groups; a gated
    # delta-rule linear attention in the same form (key head width, value heads and their
    # width, key heads), as Model Optimizer describes Qwen 3.5's
    "attention.mamba.state_dim": (
        "ssm_state_size",
        "state_size",
        "mamba_d_state",
        "d_state",
        "linear_key_head_dim",
    ),
    "attention.mamba.num_heads": ("mamba_num_heads", "mamba_n_heads", "linear_num_value_heads"),
    "attention.mamba.head_dim": ("mamba_head_dim", "mamba_headdim", "linear_value_head_dim"),
    "attention.mamba.num_groups": (
        "n_groups",
        "mamba_n_groups",
        "mamba_ngroups",
        "linear_num_key_heads",
    ),
    # experts: how many
    "ffn.moe.num_local_experts": (
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
        "num_routed_experts",
        "n_experts",
    ),
}
# FFN widths: which size a width field is follows from the tensors it resizes (see
# Reference.size_fields): the routed experts' (ffn.moe.expert_intermediate_dim), only a shared
# expert's beside them (ffn.moe.shared_expert_intermediate_dim), or a dense MLP's
# (ffn.intermediate_size).
WIDTH_FIELDS: tuple[str, ...] = (
    "intermediate_size",
    "moe_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
    "shared_expert_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "n_inner",
    "ffn_dim",
    "ffn_hidden_size",
    "d_ff",
    "inner_hidden_size",
    "mlp_hidden_size",
)
WIDTH_SIZES = (
    "ffn.intermediate_size",
    "ffn.moe.expert_intermediate_dim",
    "ffn.moe.shared_expert_intermediate_dim",
)

# The experts a token is routed to: not a size that changes shapes, but a block config with
# experts must carry it, so the oracle reads it from the config.
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "moe_topk", "top_k", "num_selected_experts")


def set_size(block: dict, size: str, value: int) -> None:
    """Set a dotted block-config size (`ffn.moe.num_local_experts`) in a block-config dict."""
    *path, last = size.split(".")
    for key in path:
        block = block.setdefault(key, {})
    block[last] = value


@dataclass(frozen=True)
class SizeField:
    size: str  # block-config attribute, e.g. "ffn.intermediate_size"
    kind: str  # "attention" | "ffn"
    field: str  # the config field the reference model reads it from
    value: int  # the config's own value
    smaller: int  # another valid value, used to probe overrides
    layer: int  # the first layer whose shapes the field changes


class Reference(LayerRolesMixin):
    """The reference model of `config` and the facts the oracle reads off it."""

    def __init__(self, config: Any, seed: int = 0, model: nn.Module | None = None):
        """`model`: an already built reference of `config` (tests build synthetic ones)."""
        self.config = config
        self.text = config.get_text_config()
        self.num_layers = int(self.text.num_hidden_layers)
        self.model = model if model is not None else reference_model(config, seed=seed)
        self.input_ids = sample_input(config)
        self.paths = {id(m): n for n, m in self.model.named_modules()}
        # per-layer facts, computed on first use (each costs forwards of the reference)
        self._roles: dict[int, LayerRoles] = {}
        self._zeroed_out: dict[tuple[int, str], torch.Tensor] = {}
        self._units: dict[int, list[tuple[str, nn.Module]]] = {}
        self._cores: dict[int, dict[str, str]] = {}
        self._adds: dict[tuple[int, str], Any] = {}
        self._runs: dict[str, bool] = {}
        self.not_per_layer: dict[str, str] = {}  # field -> why one layer cannot differ

    # -- the stack ------------------------------------------------------------------------------
    @cached_property
    def stack_path(self) -> str:
        """The ModuleList of `num_layers` modules that run one after another in the forward."""
        spans = self.spans
        candidates = []
        for name, mod in self.model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) != self.num_layers:
                continue
            starts = [spans.get(f"{name}.{i}", (None, None))[0] for i in range(len(mod))]
            if all(s is not None for s in starts) and starts == sorted(starts):
                candidates.append((sum(p.numel() for p in mod.parameters()), name))
        if not candidates:
            raise AssertionError(
                f"the reference model has no ModuleList of {self.num_layers} layers run in order"
            )
        return max(candidates)[1]

    def layer_path(self, i: int) -> str:
        return f"{self.stack_path}.{i}"

    def layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(self.layer_path(i))

    # -- call order -----------------------------------------------------------------------------
    @cached_property
    def spans(self) -> dict[str, tuple[int, int]]:
        """module path -> (first start, last end) in a forward of the reference model."""
        return {k: (v[0][0], v[-1][1]) for k, v in self.calls.items()}

    @cached_property
    def calls(self) -> dict[str, list[tuple[int, int]]]:
        """module path -> (start, end) of each of its calls in a forward of the reference
        model (a module may run more than once: NanoChat norms its embeddings and its last
        hidden states with one module)."""
        tick = itertools.count()
        calls: dict[str, list[list[int]]] = {}
        handles = []
        for name, mod in self.model.named_modules():
            if not name:
                continue

            def pre(_m, _a, name=name):
                calls.setdefault(name, []).append([next(tick), -1])

            def post(_m, _a, _o, name=name):
                calls[name][-1][1] = next(tick)

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        with hooks(*handles):
            logits(self.model, self.input_ids)
        return {k: [(a, b) for a, b in v] for k, v in calls.items()}

    def _outside_stack(self, before: bool) -> set[str]:
        first = self.spans[self.layer_path(0)][0]
        last = self.spans[self.layer_path(self.num_layers - 1)][1]
        paths = [
            p
            for p, (s, e) in self.spans.items()
            if (e < first if before else s > last)
            and not p.startswith(self.stack_path + ".")
            and any(True for _ in self.model.get_submodule(p).parameters(recurse=False))
        ]
        names = set(self.state_shapes)
        found = set()
        for p in paths:
            found |= {
                f"{p}.{n}" for n, _ in self.model.get_submodule(p).named_parameters(recurse=False)
            }
            found |= {
                f"{p}.{n}"
                for n in self.model.get_submodule(p).state_dict(keep_vars=True)
                if "." not in n
            }
        return found & names

    @cached_property
    def before_stack(self) -> set[str]:
        """State-dict names of the modules that run entirely before layer 0."""
        return self._outside_stack(before=True)

    @cached_property
    def after_stack(self) -> set[str]:
        """State-dict names of the modules that run entirely after the last layer."""
        return self._outside_stack(before=False)

    @cached_property
    def final_norms(self) -> list[str]:
        """The norms the model applies between its last layer and the head: modules run in
        that window whose weights, if any, are vectors and whose output does not change when
        their (scaled-up) input is scaled again (a norm, with or without weights; a dropout or
        an identity does change)."""
        last = self.spans[self.layer_path(self.num_layers - 1)][1]
        head = self.paths[id(self.model.get_output_embeddings())]
        head_start = self.spans[head][0]
        window = []
        for p, calls in sorted(self.calls.items(), key=lambda kv: kv[1][-1]):
            mod = self.model.get_submodule(p)
            own = list(mod.parameters(recurse=False))
            in_window = any(s > last and e < head_start for s, e in calls)
            if in_window and all(t.dim() == 1 for t in own):
                if own or not any(True for _ in mod.children()):
                    window.append(p)
        inputs: dict[str, tuple] = {}  # the input of each module's last call

        def keep(p, args, kwargs) -> None:
            inputs[p] = (args, kwargs)

        handles = [
            self.model.get_submodule(p).register_forward_pre_hook(
                lambda _m, args, kwargs, p=p: keep(p, args, kwargs), with_kwargs=True
            )
            for p in window
        ]
        with hooks(*handles):
            logits(self.model, self.input_ids)
        found = []
        for p in window:
            args, kwargs = inputs.get(p, ((), {}))
            x = call_input(args, kwargs)
            if x is None or not x.is_floating_point():
                continue
            mod = self.model.get_submodule(p)
            with torch.no_grad():  # large scales, so that a norm's epsilon does not show
                a = first_tensor(mod(x * 100.0))
                b = first_tensor(mod(x * 1000.0))
            if a is not None and b is not None and torch.allclose(a, b, rtol=1e-3, atol=1e-4):
                found.append(p)
        return found

    @cached_property
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return shapes(self.model)

    @cached_property
    def logits(self) -> torch.Tensor:
        return logits(self.model, self.input_ids)

    def layer_tensors(self, i: int, children) -> set[str]:
        prefix = self.layer_path(i)
        out: set[str] = set()
        for child in children:
            out |= under(self.state_shapes, f"{prefix}.{child}")
        return out

    # -- sizes ----------------------------------------------------------------------------------
    @cached_property
    def top_k(self) -> int | None:
        for name in [n for f in TOP_K_FIELDS for n in field_names(self.text, f)]:
            value = config_value(self.text, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @cached_property
    def top_k_field(self) -> str | None:
        for name in [n for f in TOP_K_FIELDS for n in field_names(self.text, f)]:
            value = config_value(self.text, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return name
        return None

    def _allowed(self, kind: str) -> set[str]:
        allowed = set()
        for i in range(self.num_layers):
            allowed |= self.layer_tensors(i, self.roles(i).members[kind] | self.roles(i).shared)
        return allowed

    def _first_layer(self, names) -> int:
        return min(i for i in range(self.num_layers) if under(names, self.layer_path(i)))

    @cached_property
    def size_fields(self) -> dict[str, SizeField]:
        """For each block-config size, the config field that changes exactly that subblock's
        tensor shapes in the reference model (absent when the model reads none).

        The expert count is found first: the tensors it resizes are the expert tensors (and
        the router). A width field is then the experts' width when it resizes expert tensors,
        the shared expert's when it resizes only other FFN tensors of layers that have experts,
        and the dense FFN width when it resizes layers without experts."""
        base = self.meta_shapes(self.config)
        allowed = {k: self._allowed(k) for k in KINDS}
        found: dict[str, SizeField] = {}
        expert_tensors: set[str] = set()
        for size, fields in SIZE_FIELDS.items():
            kind = size.split(".")[0]
            # a field of the config itself, or of a sub-config holding it (DBRX's
            # attn_config.kv_n_heads): the patcher writes either
            for name in [n for f in fields for n in field_names(self.text, f)]:
                value = config_value(self.text, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                    continue
                smaller = self._smaller(size, value)
                if smaller is None:
                    continue
                changed = self._changed(base, {name: smaller})
                if changed and changed <= allowed[kind]:
                    layer = self._first_layer(changed)
                    if not self._per_layer(layer, {name: smaller}):
                        continue
                    found[size] = SizeField(size, kind, name, value, smaller, layer)
                    if size == "ffn.moe.num_local_experts":
                        expert_tensors = changed
                    break
        moe_layers = {self._first_layer({t}) for t in expert_tensors}
        for name in [n for f in WIDTH_FIELDS for n in field_names(self.text, f)]:
            value = config_value(self.text, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                continue
            changed = self._changed(base, {name: value // 2})
            if not changed or not changed <= allowed["ffn"]:
                continue
            experts = found.get("ffn.moe.num_local_experts")
            stacked = (changed & expert_tensors, experts.value) if experts else None
            if not self._verbatim(base, {name: value // 2}, changed, value // 2, stacked):
                continue  # the model transforms it (halves, rounds): not a width to write
            layers = {self._first_layer({t}) for t in changed}
            if changed & expert_tensors:
                size = "ffn.moe.expert_intermediate_dim"
                layer = self._first_layer(changed & expert_tensors)
            elif expert_tensors and layers <= moe_layers:
                size = "ffn.moe.shared_expert_intermediate_dim"
                layer = min(layers)
            elif not layers & moe_layers:
                size = "ffn.intermediate_size"
                layer = min(layers)
            else:
                continue  # dense layers and shared experts at once: no one size
            if size not in found and self._per_layer(layer, {name: value // 2}):
                found[size] = SizeField(size, "ffn", name, value, value // 2, layer)
        dense = {t for t in allowed["ffn"] if self._first_layer({t}) not in moe_layers}
        if "ffn.intermediate_size" not in found and dense:
            # a dense width under a name the table lacks (CTRL's `dff`; MiniMax-M3's
            # dense_intermediate_size for its dense layers beside the expert ones)
            other = self._other_width_field(base, dense)
            if other is not None:
                found["ffn.intermediate_size"] = other
        return found

    def _verbatim(
        self, base: dict, changes: dict[str, Any], changed: set[str], value, stacked=None
    ) -> bool:
        """Whether the model builds the width it is given: some changed tensor has `value` at
        a dimension the change moved (RecurrentGemma halves intermediate_size first), or, for
        `stacked` = (expert tensors, expert count), an expert tensor holding every expert's
        rows in one dimension (DBRX's `w1`) has `value` times the count there."""
        resized = self.meta_shapes(self.with_fields(changes))
        tensors, count = stacked if stacked else (set(), 0)
        for name in changed:
            old, new = base.get(name, ()), resized.get(name, ())
            want = {value, value * count} if name in tensors else {value}
            if len(old) == len(new) and any(a != b and b in want for a, b in zip(old, new)):
                return True
        return False

    def _per_layer(self, layer: int, changes: dict[str, Any]) -> bool:
        """A size is a block-config size only if one layer can have another value: the model
        must build with `changes` to that layer's config alone (the rest of the model may read
        the field too, as Nemotron-H's weight init reads mamba_num_heads)."""
        failure = layer_change_fails(type(self.model), self.config, self.stack_path, layer, changes)
        if failure is not None:
            self.not_per_layer[next(iter(changes))] = failure
        return failure is None

    def _other_width_field(self, base: dict, allowed: set[str]) -> SizeField | None:
        """An FFN width under a name the table does not list (CTRL's `dff`): an int field
        whose halving resizes only FFN tensors, to that very number."""
        listed = {f for fields in SIZE_FIELDS.values() for f in fields} | set(WIDTH_FIELDS)
        for name, value in sorted(self.text.to_dict().items()):
            if name in listed or not isinstance(value, int) or isinstance(value, bool):
                continue
            if value < 4 or config_value(self.text, name) != value:
                continue
            smaller = value // 2
            try:
                resized = self.meta_shapes(self.with_fields({name: smaller}))
            except Exception:
                continue
            changed = {k for k in base if resized.get(k) != base[k]} | (set(resized) - set(base))
            if (
                changed
                and changed <= allowed
                and self._verbatim(base, {name: smaller}, changed, smaller)
            ):
                layer = min(i for i in range(self.num_layers) if under(changed, self.layer_path(i)))
                return SizeField("ffn.intermediate_size", "ffn", name, value, smaller, layer)
        return None

    def _smaller(self, size: str, value: int) -> int | None:
        if size == "attention.num_key_value_heads":
            return 1  # one KV head divides any number of heads
        if size == "ffn.moe.num_local_experts":
            smaller = max(self.top_k or 1, value // 2)
            return smaller if smaller < value else None
        return value // 2

    def _changed(self, base: dict, overrides: dict[str, Any]) -> set[str] | None:
        try:
            other = self.meta_shapes(self.with_fields(overrides))
        except Exception:
            return None
        if set(other) != set(base):
            return set(other) ^ set(base) | {k for k in base if other.get(k) != base[k]}
        return {k for k in base if other[k] != base[k]}

    def runs_with(self, size: str) -> bool:
        """Whether the reference still runs a forward with size field `size` at its smaller
        value (a Mamba mixer's heads must still multiply to its inner width, say)."""
        if size not in self._runs:
            sf = self.size_fields[size]
            try:
                logits(reference_model(self.with_fields({sf.field: sf.smaller})), self.input_ids)
                self._runs[size] = True
            except Exception:
                self._runs[size] = False
        return self._runs[size]

    def with_fields(self, overrides: dict[str, Any]) -> Any:
        """A copy of the config with text-config fields set (as the patcher sets them)."""
        config = copy.deepcopy(self.config)
        text = config.get_text_config()
        for k, v in overrides.items():
            set_config_field(text, k, v)
        return config

    @staticmethod
    def meta_shapes(config: Any) -> dict[str, tuple[int, ...]]:
        return shapes(reference_model(config, device="meta"))

    def own_block_config(self) -> dict:
        """A block config that repeats the config's own sizes (a stand-in of 1 for a size the
        model does not read)."""
        sizes = self.size_fields
        block = {
            "attention": {"no_op": False, "num_key_value_heads": 1},
            "ffn": {"no_op": False, "intermediate_size": 1},
        }
        if any(size.startswith("ffn.moe.") for size in sizes):
            experts = sizes.get("ffn.moe.num_local_experts")
            block["ffn"]["moe"] = {
                "num_local_experts": experts.value if experts else 1,
                "num_experts_per_tok": min(self.top_k or 1, experts.value if experts else 1),
                "expert_intermediate_dim": 1,
            }
        if any(size.startswith("attention.mamba.") for size in sizes):
            block["attention"]["mamba"] = {}
        for size, sf in sizes.items():
            set_size(block, size, sf.value)
        return block

    # -- layer kinds ----------------------------------------------------------------------------
    @cached_property
    def kind_layers(self) -> list[int]:
        """The first layer of each kind of the stack: layers that differ in class, or in the
        names or classes of their children with weights."""
        seen: dict[tuple, int] = {}
        for i in range(self.num_layers):
            seen.setdefault(self.kind_signature(i), i)
        return sorted(seen.values())

    def kind_signature(self, i: int) -> tuple:
        """What makes layer i's kind: its class, and the names and classes of its children
        with weights."""
        layer = self.layer(i)
        return (
            type(layer),
            tuple((n, type(c)) for n, c in layer.named_children() if _params(c)),
        )

    def own_block_configs(self) -> list[dict]:
        return [copy.deepcopy(self.own_block_config()) for _ in range(self.num_layers)]
