"""The oracle's roles inside one layer of the reference model: which children are cores and of
which subblock, which other children matter to which subblock, and what zeroing a subblock
means (see the oracle's module docstring for the rules). A mixin of `oracle.Reference`: every
answer comes from running the reference model with hooks, each forward stopped once the layer
asked about returns (`models.run_through`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import (
    call_input,
    first_tensor,
    hooks,
    layer_io,
    replace_call_input,
    replace_first,
    run_through,
)

KINDS = ("attention", "ffn")


@dataclass(frozen=True)
class LayerRoles:
    """The children of one layer, by the subblock they belong to."""

    cores: dict[str, str]  # child -> "attention" | "ffn"
    members: dict[str, frozenset[str]]  # kind -> children (cores and their norms)
    shared: frozenset[str]  # children both subblocks need (kept by either no-op)
    unused: frozenset[str]  # children with weights that did not affect the layer

    def describe(self) -> str:
        parts = [f"{k}: {', '.join(sorted(self.members[k])) or '-'}" for k in KINDS]
        if self.shared:
            parts.append(f"shared: {', '.join(sorted(self.shared))}")
        return "; ".join(parts)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())


def _is_core(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in _params(module))


def _has_context(args: tuple, kwargs: dict) -> bool:
    """Whether a call passed more than hidden states: a cache object, a tuple of tensors
    (position embeddings), or a tensor shaped unlike the hidden states (mask, positions)."""
    hidden = call_input(args, kwargs)
    for value in itertools.chain(args, kwargs.values()):
        if value is None or value is hidden or isinstance(value, (bool, int, float, str)):
            continue
        if isinstance(value, torch.Tensor) and hidden is not None and value.shape == hidden.shape:
            continue  # a second stream (Bloom's residual) is not context
        return True
    return False


def _second_stream(args: tuple, kwargs: dict):
    """Where a call passed a second tensor shaped like its hidden states (Bloom passes the
    residual into its attention and MLP): ("arg", position) or ("kw", name); None if none."""
    hidden = call_input(args, kwargs)
    if hidden is None:
        return None

    def alike(v) -> bool:
        return isinstance(v, torch.Tensor) and v is not hidden and v.shape == hidden.shape

    for pos, value in enumerate(args):
        if alike(value):
            return ("arg", pos)
    for name, value in kwargs.items():
        if alike(value):
            return ("kw", name)
    return None


def _stream_value(where, args: tuple, kwargs: dict):
    kind, key = where
    return args[key] if kind == "arg" else kwargs[key]


class LayerRolesMixin:
    """Questions about layer i of `self.model` (a `Reference`): its units, cores and roles."""

    # -- roles inside a layer -------------------------------------------------------------------
    def run_through(self, i: int) -> None:
        """A forward that stops once layer i returns: the questions below are about layer i."""
        run_through(self.model, self.layer(i), self.input_ids)

    def units(self, i: int) -> list[tuple[str, nn.Module]]:
        """The children of layer i, each child that hands on several hidden-states tensors
        (a tuple output with more than one tensor shaped like its input) replaced by its own
        children at their dotted paths, when some of those hold weights."""
        if i not in self._units:
            layer = self.layer(i)
            several: set[str] = set()
            handles = []
            for name, child in layer.named_children():
                if not any(_params(c) for c in child.children()):
                    continue

                def post(_m, args, kwargs, output, name=name):
                    x = call_input(args, kwargs)
                    if x is None or not isinstance(output, (tuple, list)):
                        return
                    alike = [
                        t for t in output if isinstance(t, torch.Tensor) and t.shape == x.shape
                    ]
                    if len(alike) > 1:
                        several.add(name)

                handles.append(child.register_forward_hook(post, with_kwargs=True))
            with hooks(*handles):
                self.run_through(i)
            units = []
            for name, child in layer.named_children():
                if name in several:
                    units.extend((f"{name}.{n}", c) for n, c in child.named_children())
                else:
                    units.append((name, child))
            self._units[i] = units
        return self._units[i]

    def roles(self, i: int) -> LayerRoles:
        if i not in self._roles:
            self._roles[i] = self._compute_roles(i)
        return self._roles[i]

    def _compute_roles(self, i: int) -> LayerRoles:
        children = {n for n, m in self.units(i) if _params(m)}
        cores = self.roles_cores(i)
        members = {k: {n for n, kind in cores.items() if kind == k} for k in KINDS}
        shared, unused = set(), set()
        for name in sorted(set(children) - set(cores)):
            # a child the FFN needs still matters with the attention zeroed, and vice versa
            needed_by = {
                "ffn": self._matters(i, name, zeroed="attention"),
                "attention": self._matters(i, name, zeroed="ffn"),
            }
            if all(needed_by.values()):
                shared.add(name)
            elif any(needed_by.values()):
                members["ffn" if needed_by["ffn"] else "attention"].add(name)
            else:
                unused.add(name)
        return LayerRoles(
            cores=cores,
            members={k: frozenset(v) for k, v in members.items()},
            shared=frozenset(shared),
            unused=frozenset(unused),
        )

    def _matters(self, i: int, child: str, zeroed: str) -> bool:
        """Does scaling `child`'s output change layer i's output while `zeroed` is zeroed?"""
        layer = self.layer(i)
        if (i, zeroed) not in self._zeroed_out:  # the same for every child asked about
            self._zeroed_out[(i, zeroed)] = layer_io(
                self.model, layer, self.input_ids, self.zeroed(i, zeroed)
            )[1]
        base = self._zeroed_out[(i, zeroed)]

        def scale(_m, _a, _k, output):
            t = first_tensor(output)
            return None if t is None else replace_first(output, t * 1.5)

        module = layer.get_submodule(child)
        with hooks(module.register_forward_hook(scale, with_kwargs=True, prepend=False)):
            _, out = layer_io(self.model, layer, self.input_ids, self.zeroed(i, zeroed))
        return not torch.equal(base, out)

    def zeroed(self, i: int, kind: str | tuple[str, ...]):
        """Hooks (a context manager) that make subblock `kind` of layer i contribute nothing:
        its cores return zeros (or, for a core that adds the residual it is passed, that
        residual), and so does every child of the layer called on those zeros."""
        kinds = (kind,) if isinstance(kind, str) else kind
        cores = {n for n, k in self.roles_cores(i).items() if k in kinds}
        adds = {n: self.adds_passed_stream(i, n) for n in cores}
        produced: list[torch.Tensor] = []  # keep the zero tensors alive: identity matters

        def hook(_m, args, kwargs, output, name):
            src = call_input(args, kwargs)
            if adds.get(name) is not None:  # it adds the residual it is passed: return that
                return replace_first(output, _stream_value(adds[name], args, kwargs))
            if name in cores or any(src is z for z in produced):
                t = first_tensor(output)
                if t is not None:
                    z = torch.zeros_like(t)
                    produced.append(z)
                    return replace_first(output, z)
            return None

        handles = [
            child.register_forward_hook(
                lambda m, a, k, o, name=name: hook(m, a, k, o, name), with_kwargs=True
            )
            for name, child in self.units(i)
        ]
        return hooks(*handles)

    def adds_passed_stream(self, i: int, name: str):
        """Where core `name` of layer i is passed a second hidden-states tensor that it adds to
        its output unchanged (a residual join inside the module): shifting that argument by a
        constant shifts the output by the same constant. None for a core that does not."""
        if (i, name) in self._adds:
            return self._adds[(i, name)]
        core = self.layer(i).get_submodule(name)
        seen: dict[str, Any] = {}

        def where(_m, args, kwargs):
            seen.setdefault("where", _second_stream(args, kwargs))

        def output(_m, _a, _k, out):
            seen.setdefault("outs", []).append(first_tensor(out))

        with hooks(
            core.register_forward_pre_hook(where, with_kwargs=True),
            core.register_forward_hook(output, with_kwargs=True),
        ):
            self.run_through(i)
        found = seen.get("where")
        if found is not None:

            def shift(_m, args, kwargs):
                kind, key = found
                if kind == "arg":
                    args = (*args[:key], args[key] + 0.25, *args[key + 1 :])
                else:
                    kwargs = {**kwargs, key: kwargs[key] + 0.25}
                return args, kwargs

            with hooks(
                core.register_forward_pre_hook(shift, with_kwargs=True),
                core.register_forward_hook(output, with_kwargs=True),
            ):
                self.run_through(i)
            base, shifted = seen["outs"][0], seen["outs"][-1]
            delta = shifted - base
            if not torch.allclose(delta, torch.full_like(delta, 0.25), atol=1e-4):
                found = None
        self._adds[(i, name)] = found
        return found

    def roles_cores(self, i: int) -> dict[str, str]:
        """Only the cores (computing them does not need the zeroing hooks). A core is the
        attention (the token mixer) when its output at later positions changes with its input
        at the first position; position-wise it is the FFN. A core whose call gives no such
        answer is told by the context it receives (a cache, positions, a mask)."""
        if i not in self._cores:
            layer = self.layer(i)
            context: dict[str, bool] = {}
            handles = []
            chain = [(n, c) for n, c in self.units(i) if _params(c) and _is_core(c)]
            # a child with matrices whose output another one reads (AXK2's gated input norm,
            # feeding the attention) is part of a chain, not a core: the chain's last one is
            feeds = self._feeding(i, chain)
            cores = [(n, c) for n, c in chain if n not in feeds]
            # the kind of a chain is that of its last module, unless that module only refines
            # what it is fed (it is the identity with its weights zeroed: Inkling's short
            # convolution after the attention and after the MLP): then it is that of the module
            # feeding it, unless that one is the identity with zero weights too (blocks that
            # each hold their own residual, CPM-Ant's)
            judge = {}
            for name, child in cores:
                judge[name] = name
                feeder = next((a for a, b in feeds.items() if b == name), None)
                if (
                    feeder is not None
                    and self._refines(i, child)
                    and not self._refines(i, layer.get_submodule(feeder))
                ):
                    judge[name] = feeder
            judged = [(n, layer.get_submodule(n)) for n in dict.fromkeys(judge.values())]
            for name, child in judged:

                def pre(_m, args, kwargs, name=name):
                    context[name] = context.get(name, False) or _has_context(args, kwargs)

                handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            with hooks(*handles):
                self.run_through(i)
            kinds = {}
            for name, child in judged:
                if name not in context:
                    continue
                mixes = self._mixes_tokens(i, child)
                kinds[name] = "attention" if (context[name] if mixes is None else mixes) else "ffn"
            out = {n: kinds[judge[n]] for n, _ in cores if judge[n] in kinds}
            self._cores[i] = out
        return self._cores[i]

    def _refines(self, i: int, module: nn.Module) -> bool:
        """Does `module` return its input unchanged once its parameters are zero (`x + f(x)`)?"""
        seen: dict[str, torch.Tensor] = {}

        def keep(_m, args, kwargs, output):
            x, y = call_input(args, kwargs), first_tensor(output)
            if x is not None and y is not None and "in" not in seen:
                seen["in"], seen["out"] = x.detach().clone(), y.detach().clone()

        saved = [p.detach().clone() for p in module.parameters()]
        try:
            with torch.no_grad():
                for p in module.parameters():
                    p.zero_()
            with hooks(module.register_forward_hook(keep, with_kwargs=True)):
                self.run_through(i)
        finally:
            with torch.no_grad():
                for p, v in zip(module.parameters(), saved):
                    p.copy_(v)
        x, y = seen.get("in"), seen.get("out")
        return x is not None and x.shape == y.shape and torch.equal(x.to(y.dtype), y)

    def _feeding(self, i: int, children: list[tuple[str, nn.Module]]) -> dict[str, str]:
        """The children among `children` whose output another one is called on as it is (a
        chain of modules with matrices: AXK2's gated input norm, then the attention), each with
        the child it feeds."""
        if len(children) < 2:
            return {}
        ins: dict[str, torch.Tensor] = {}
        outs: dict[str, torch.Tensor] = {}
        handles = []
        for name, child in children:

            def pre(_m, args, kwargs, name=name):
                x = call_input(args, kwargs)
                if x is not None and name not in ins:
                    ins[name] = x.detach().clone()

            def post(_m, _a, _k, output, name=name):
                t = first_tensor(output)
                if t is not None and name not in outs:
                    outs[name] = t.detach().clone()

            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
        with hooks(*handles):
            self.run_through(i)
        return {
            a: b
            for a, out in outs.items()
            for b, x in ins.items()
            if b != a and x.shape == out.shape and torch.equal(x, out)
        }

    def _mixes_tokens(self, i: int, core: nn.Module) -> bool | None:
        """Does `core`'s output at positions after the next one change when its input at the
        first position does? None when its input or output is not a sequence of vectors (or
        too short to tell). A token shift alone (RWKV's channel mix reads the previous
        position's input beside its own, then works position-wise) carries the first position
        to the second only: that is no token mixer; attention, recurrences and convolutions
        reach further."""
        outs: list[torch.Tensor] = []

        def keep(_m, _a, _k, output):
            t = first_tensor(output)
            outs.append(t.detach().clone() if t is not None else None)

        def shift_first(_m, args, kwargs):
            x = call_input(args, kwargs)
            if x is None or x.dim() != 3 or x.shape[1] < 2 or not x.is_floating_point():
                return None
            shifted = x.clone()
            shifted[:, 0] += 1.0
            return replace_call_input(args, kwargs, x, shifted)

        with hooks(core.register_forward_hook(keep, with_kwargs=True)):
            self.run_through(i)
        with hooks(
            core.register_forward_pre_hook(shift_first, with_kwargs=True),
            core.register_forward_hook(keep, with_kwargs=True),
        ):
            self.run_through(i)
        if len(outs) < 2 or outs[0] is None or outs[-1] is None:
            return None
        base, moved = outs[0], outs[len(outs) // 2]
        if base.shape != moved.shape or base.dim() != 3 or base.shape[1] < 3:
            return None
        if torch.equal(base[:, 0], moved[:, 0]):
            return None  # the shifted input did not reach it: no answer
        # a tolerance: experts batched by routing may round other tokens differently when one
        # token's route moves; a token mixer moves them by far more
        return not torch.allclose(base[:, 2:], moved[:, 2:], rtol=1e-4, atol=1e-5)
