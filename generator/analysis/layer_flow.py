"""Residual segments of a decoder layer, read as data flow.

A residual join is an addition (`a + b`, `+=`, `dropout_add(b, a, ...)`) where one operand `a`
is an ancestor of the other `b` through at least one child-module call: `a` is the residual and
the calls on the paths from `a` to `b` form the segment. Following the returned value back to
the input gives the main stream: its joins in order, and the calls applied to the stream itself
(post-norms), which belong to the segment whose join they follow.

A segment is the attention (token-mixing) subblock when its core module receives context besides
the hidden states (mask, position embeddings, cache: any other forward argument); otherwise it is
the FFN subblock. A segment with two cores is a parallel layout: attention and MLP read the same
input and join the residual once; modules feeding only one core belong to it, modules feeding
both are shared and stay in place on a no-op.

A core that adds its input to its output (`x + conv(x)`: Inkling's short convolution after the
attention and after the MLP) refines what the core before it in the segment computed: the
segment's kind is that core's, whatever context the refinement reads (a convolution cache). The
refining core is still the one whose output the no-op replaces with zeros (the last of the
chain); the override inference accepts a size that changes the core it refines.

A second FFN segment that mixes in a layer argument other than the hidden states by an
element-wise operation on its path, its cores reading only what that path computes (Gemma 4's
per-layer input: `act(gate(h)) * per_layer_input`, projected back and added to the residual), is
position-wise like the MLP and reads no context: it joins the FFN subblock, which then has two
residual joins, and the FFN no-op zeroes both. Puzzletron's FFN group then holds its weights, and
a layer with both subblocks a no-op is the identity. Any other second segment of one kind stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import InferenceError
from .containers import ChildInfo, child_infos, containers, scope_answers
from .dataflow import Call, FlowGraph, FlowInterpreter, Input, Item, Node, Op, Phi
from .source_index import SourceIndex, param_names

ATTENTION, FFN = "attention", "ffn"
_MIXER_NAME = re.compile(r"attn|attention|mixer|mamba|ssm|retention|time_?mix|conv", re.I)
_FFN_NAME = re.compile(r"mlp|ffn|feed_?forward|moe|expert|channel_?mix", re.I)


@dataclass
class Subblock:
    kind: str
    cores: list[str]  # children whose output the no-op replaces with zeros
    members: list[str]  # every child of the subblock in data-flow order (cores included)
    joins: list[str] = field(default_factory=list)  # where its residual joins are
    evidence: list[str] = field(default_factory=list)
    # cores that add the residual they are passed to their own output: core -> (position or
    # None when passed by keyword, parameter name); their no-op returns that argument
    residual_args: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    # per core, the child whose inputs decided its kind: the core itself, or the core it refines
    judges: list[str] = field(default_factory=list)
    # layer arguments besides the hidden states that a segment mixes in element-wise
    # (Gemma 4's per_layer_input), with the line that does it
    layer_inputs: list[str] = field(default_factory=list)


@dataclass
class LayerFlow:
    class_name: str
    layout: str  # "sequential" | "parallel"
    subblocks: dict[str, Subblock]
    shared: list[str]  # children used by both subblocks (left in place on a no-op)
    arity: dict[str, int | None]  # child -> tuple size at its call sites (None: a tensor)
    indexed: dict[str, bool]  # child -> call site indexes into the result (size unknown)
    called: list[str]  # every child called, in first-call order
    sites: dict[str, str]  # child -> "file:line `code`" of its first call
    returns_tuple: bool
    evidence: list[str]
    # children whose forward was read in place of their call (containers.py): their children
    # are units of the layer, at dotted paths
    containers: tuple[str, ...] = ()


def analyze_layer(
    cls: type, instance: object, children: dict[str, ChildInfo], index: SourceIndex
) -> LayerFlow:
    """Analyse `cls.forward` with `self` bound to the probed `instance`."""
    parsed, owner, func = index.find_method(cls, "forward")
    graph = _interpreter(instance, set(children), index, parsed).run(func)
    fact = f"residual segments of {cls.__name__}.forward ({parsed.where(func)})"
    if graph.returned is None:
        raise InferenceError(fact, "forward returns nothing")
    found = containers(graph, instance, children, index)
    if found:
        # read each container's forward in place of its call: its children become units
        children = dict(children)
        for name, scope in found.items():
            del children[name]
            children.update(child_infos(scope.instance, name + "."))
        graph = _interpreter(instance, set(children), index, parsed, found).run(func)
        if graph.returned is None:
            raise InferenceError(fact, "forward returns nothing")

    memo: dict[tuple[str, int | str], str | None] = {}

    def adds_argument(call: Call, slot: int | str) -> str | None:
        key = (call.target, slot)
        if key not in memo:
            memo[key] = _adds_argument(instance, call.target, slot, index)
        return memo[key]

    flow = _segments(cls.__name__, graph, children, fact, adds_argument)
    flow.containers = tuple(found)
    for name in found:
        flow.evidence.insert(
            0,
            f"{flow.sites.get(name) or name}: {name} hands on more than one value carrying the "
            "hidden states (part of a segment and its join): its forward is read in place of "
            "its call",
        )
    return flow


def _interpreter(instance: object, children: set[str], index: SourceIndex, parsed, found=None):
    """`children` are the layer's units: direct children, and the children of a container at
    their dotted paths; a call of a container (`found`: name -> Scope) is read in place."""
    tops = {c.split(".")[0] for c in children}
    is_child, method_source = scope_answers(instance, tops, index)
    return FlowInterpreter(parsed, instance, is_child, method_source, (found or {}).get)


def _adds_argument(instance: object, target: str, slot: int | str, index: SourceIndex):
    """The parameter name when child `target`'s forward adds the argument passed at `slot` to
    its output (`return dropout_add(out, residual, ...)`, `output + residual`): a residual join
    inside the subblock. None when it does not, or when its source cannot be read."""
    module = instance
    for part in target.split("."):
        module = getattr(module, part, None)
    if module is None or isinstance(slot, bool):
        return None
    try:
        parsed, _, func = index.find_method(type(module), "forward")
    except InferenceError:
        return None
    names = param_names(func)[1:]
    name = names[slot] if isinstance(slot, int) and slot < len(names) else slot
    if not isinstance(name, str) or name not in names:
        return None
    grand = {n for n, _ in module.named_children()} if hasattr(module, "named_children") else set()
    try:
        graph = _interpreter(module, grand, index, parsed).run(func, input_param=name)
    except InferenceError:
        return None
    # the sum may be cast on its way out (`(out + residual).to(input_dtype)`), and the residual
    # may be a cast of the argument (`residual = hidden_states.float()`: Inkling's convolutions)
    for out in _call_free_chain(graph, graph.returned):
        if isinstance(out, Op) and out.additive:
            terms = _flatten_sum(graph, out) if out.kind in ("Add", "+=") else list(out.inputs)
            if any(graph.input in _call_free_chain(graph, t) for t in terms):
                return name
            return None
    return None


def _top(call: Call) -> str:
    return call.unit or call.target.split(".")[0]


def _as_join(graph: FlowGraph, op: Op) -> tuple[Node, Node] | None:
    """(residual, branch) when `op` adds a value to something derived from it through calls.

    `residual + f(residual)` is the plain case. A sum of three terms (`residual + attn + mlp`,
    Cohere and GPT-NeoX parallel layers) is read by flattening nested additions, unless an inner
    sum is itself the residual of another term (two sequential segments).
    """
    for terms in (list(op.inputs), _flatten_sum(graph, op)):
        derived = [x for x in terms if graph.derived(x)]
        for term in derived:
            others = [b for b in derived if b is not term]
            if not others:
                continue
            # the residual may be a call-free function of the stream value the branch reads
            # (`residual = residual.to(torch.float32)`, Mamba's residual_in_fp32)
            for r in _call_free_chain(graph, term):
                if not all(id(r) in graph.ancestors(b) for b in others):
                    continue
                branch = others[0] if len(others) == 1 else op
                if _calls_between(graph, r, branch):
                    return r, branch
    return None


def _call_free_chain(graph: FlowGraph, node: Node) -> list[Node]:
    """`node`, then the values it is computed from by operations without module calls that take
    one stream input (a dtype cast, a reshape), nearest first."""
    chain = [node]
    while isinstance(chain[-1], Op) and len(chain) < 8:
        derived = _unique([x for x in chain[-1].inputs if graph.derived(x)])
        if len(derived) != 1:
            break
        chain.append(derived[0])
    return chain


def _flatten_sum(graph: FlowGraph, op: Op) -> list[Node]:
    terms: list[Node] = []
    for x in op.inputs:
        inner_is_residual = any(id(x) in graph.ancestors(y) for y in op.inputs if y is not x)
        if isinstance(x, Op) and x.additive and len(x.inputs) == 2 and not inner_is_residual:
            terms.extend(_flatten_sum(graph, x))
        else:
            terms.append(x)
    return terms


def _calls_between(graph: FlowGraph, start: Node, end: Node) -> list[Call]:
    anc_end = graph.ancestors(end)
    return [
        c for c in graph.calls if (c is end or id(c) in anc_end) and id(start) in graph.ancestors(c)
    ]


def _main_stream(
    graph: FlowGraph, fact: str, adds_argument=None
) -> list[tuple[str, Node, Node | None, Node | None]]:
    """Walk back from the output to the input along the residual stream.

    Returns, in forward order, ("join", op, residual, branch) for each residual join and
    ("stream", call, None, None) for each module applied to the stream itself (post-norms).
    A child call that receives both a value and something derived from it through calls
    (`self.mlp(norm(x), x)`) joins the residual inside itself when its forward adds that
    argument to its output (`adds_argument` confirms it from the child's source): the join node
    is then the call itself.
    """
    events: list[tuple[str, Node, Node | None, Node | None]] = []
    node = graph.returned
    for _ in range(10_000):
        if node is graph.input:
            events.reverse()
            return events
        if isinstance(node, Op) and node.additive and (join := _as_join(graph, node)):
            events.append(("join", node, join[0], join[1]))
            node = join[0]
            continue
        derived = [x for x in node.inputs if graph.derived(x)]
        if isinstance(node, Call):
            residual = _inner_residual(graph, node, derived, adds_argument)
            if residual is not None:
                events.append(("join", node, residual, node))
                node = residual
                continue
            if len(_unique(derived)) != 1:
                raise InferenceError(fact, f"{node.target} combines several streams", [node.where])
            events.append(("stream", node, None, None))
        elif len(derived) != 1:
            kind = "a branch merge" if isinstance(node, Phi) else f"`{node.code or node.kind}`"
            raise InferenceError(
                fact,
                f"cannot follow the hidden states through {kind}",
                [node.where] if node.where else [],
            )
        node = derived[0]
    raise InferenceError(fact, "the main stream does not reach the input")


def _inner_residual(graph: FlowGraph, call: Call, derived: list[Node], adds_argument):
    """The residual `call` joins inside the child: the stream value it receives besides a value
    computed from it (`self.mlp(norm(x), x)`), or its only stream input (`self.self_att(x)`
    whose forward returns `x + attention(norm(x))`: CPM-Ant), when the child's forward adds
    that argument to its output."""
    derived = _unique(derived)
    if adds_argument is None:
        return None
    if len(derived) == 1:
        slot = call.slot_of(derived[0])
        param = adds_argument(call, slot) if slot is not None else None
        if param is not None:
            call.residual_slot, call.residual_param = slot, param
            return derived[0]
        return None
    if len(derived) != 2:
        return None
    for r in derived:
        (other,) = [x for x in derived if x is not r]
        if id(r) not in graph.ancestors(other) or not _calls_between(graph, r, other):
            continue
        slot = call.slot_of(r)
        param = adds_argument(call, slot) if slot is not None else None
        if param is not None:
            call.residual_slot, call.residual_param = slot, param
            return r
    return None


def _calls_per_segment(graph: FlowGraph, events):
    """Per residual join: the calls of its segment, evidence lines, and the join's location.

    A segment holds the calls between its residual and its join, the stream calls after the
    join (before the first join they go to the first segment), and context calls (not on the
    hidden-state path, e.g. a position-bias module) that feed one of those.
    """
    joins = [e for e in events if e[0] == "join"]
    calls: list[list[Call]] = [[] for _ in joins]
    evidence: list[list[str]] = [[] for _ in joins]
    sites: list[list[str]] = [[] for _ in joins]
    k = 0
    for kind, n, residual, branch in events:
        if kind == "join":
            calls[k].extend(c for c in _calls_between(graph, residual, branch) if c not in calls[k])
            evidence[k].append(f"{n.where} residual join `{n.code}`")
            sites[k].append(n.where)
            k += 1
        else:
            j = max(0, k - 1)
            calls[j].append(n)
            where = "after the join" if k > 0 else "before the first segment"
            evidence[j].append(f"{n.where} `{n.code}` on the residual stream {where}")
    for c in graph.calls:
        if graph.derived(c) or any(c in s for s in calls):
            continue
        for s in calls:
            if any(id(c) in graph.ancestors(x) for x in s):
                s.append(c)
                break
    return calls, evidence, sites


def _segments(class_name, graph: FlowGraph, children, fact, adds_argument=None) -> LayerFlow:
    events = _main_stream(graph, fact, adds_argument)
    if not any(e[0] == "join" for e in events):
        raise InferenceError(fact, "no residual join found (expected `residual + ...`)")
    seg_calls, seg_evidence, seg_joins = _calls_per_segment(graph, events)

    def is_core(c: Call) -> bool:
        info = children.get(_top(c))
        return bool(info and info.has_matrix)

    def context_fed(c: Call) -> bool:
        return any(not graph.derived(x) and graph.depends_on_context(x) for x in c.inputs)

    def wraps_its_input(c: Call) -> bool:
        """`c`'s forward adds its only stream input to its output (`x + conv(x)`)."""
        derived = _unique([x for x in c.inputs if graph.derived(x)])
        if adds_argument is None or len(derived) != 1:
            return False
        slot = c.slot_of(derived[0])
        return slot is not None and adds_argument(c, slot) is not None

    def judge_of(c: Call) -> Call:
        """The core whose inputs decide the kind of core `c`: `c` itself, or, for a core that
        adds its input to its output (Inkling's short convolution after the attention and after
        the MLP), the nearest core of its segment feeding it, unless that one adds its input too
        (a chain of blocks that each hold their own residual, CPM-Ant's). Such a core refines
        what the core before it computed: the segment is what that core is, whatever context the
        refinement reads (its convolution cache)."""
        if wraps_its_input(c):
            segment = next((s for s in seg_calls if c in s), [])
            feeders = [
                d
                for d in graph.calls
                if d is not c and d in segment and is_core(d) and id(d) in graph.ancestors(c)
            ]
            if feeders and not wraps_its_input(feeders[-1]):
                return feeders[-1]
        return c

    def kind_of(c: Call) -> str:
        return ATTENTION if context_fed(judge_of(c)) else FFN

    def name_hint(c: Call) -> str | None:
        info = children.get(_top(c))
        text = f"{_top(c)} {info.class_name if info else ''}"
        if _MIXER_NAME.search(text) and not _FFN_NAME.search(text):
            return ATTENTION
        if _FFN_NAME.search(text) and not _MIXER_NAME.search(text):
            return FFN
        return None

    subblocks: dict[str, Subblock] = {}
    shared: list[str] = []
    parallel = False
    call_kind: dict[str, str] = {}
    for calls, evidence, join_sites in zip(seg_calls, seg_evidence, seg_joins):
        cores = _sink_cores(graph, [c for c in calls if is_core(c)])
        if not cores:
            raise InferenceError(fact, "a residual segment calls no module with weights", evidence)
        core_calls = {name: [c for c in calls if _top(c) == name] for name in cores}
        kinds = {name: kind_of(cs[0]) for name, cs in core_calls.items()}
        if len(cores) == 1:
            (name,) = cores
            kind = kinds[name]
            if kind in subblocks:
                kind = name_hint(core_calls[name][0]) or kind
            assignments = {name: kind}
        else:
            assignments = _split_parallel(cores, core_calls, kinds, name_hint, fact, evidence)
            # attention and FFN side by side; several cores of one kind (Falcon-H1's
            # attention beside its Mamba mixer) are one subblock with several cores
            parallel = parallel or len(set(assignments.values())) > 1
        for name, kind in assignments.items():
            first = core_calls[name][0]
            why = (
                f"adds its input to its output: it refines {_top(judge_of(first))}, fed only "
                "that core's output, so that core decides the subblock"
                if judge_of(first) is not first
                else (
                    "receives context besides the hidden states"
                    if kind == ATTENTION
                    else "receives only the hidden states"
                )
            )
            if kind in subblocks and name not in subblocks[kind].cores:
                mixed = _layer_input_mixed(graph, first) if kind == FFN else None
                if subblocks[kind].joins != list(join_sites) and mixed is not None:
                    sb = subblocks[kind]
                    sb.cores.append(name)
                    sb.judges.append(_top(judge_of(first)))
                    sb.joins.extend(j for j in join_sites if j not in sb.joins)
                    sb.layer_inputs.append(mixed.where)
                    sb.evidence.append(
                        f"{first.where} `{first.code}` {why}; its segment mixes in a layer "
                        f"argument besides the hidden states ({mixed.where} `{mixed.code}`) "
                        "position-wise, so it is a second FFN segment"
                    )
                    sb.evidence.extend(evidence)
                    continue
                if subblocks[kind].joins != list(join_sites):
                    raise InferenceError(
                        fact,
                        f"two {kind} segments in one layer ({subblocks[kind].cores[0]} and "
                        f"{name})",
                        evidence,
                    )
                subblocks[kind].cores.append(name)
                subblocks[kind].judges.append(_top(judge_of(first)))
                subblocks[kind].evidence.append(f"{first.where} `{first.code}` {why}")
                continue
            subblocks[kind] = Subblock(
                kind,
                [name],
                [],
                list(join_sites),
                [f"{first.where} `{first.code}` {why}"] + evidence,
                judges=[_top(judge_of(first))],
            )
        # every call of the segment joins the subblock of the cores it feeds or follows
        for c in calls:
            name = _top(c)
            if name in assignments:
                owners = {assignments[name]}
            else:
                owners = set()
                for core_name, kind in assignments.items():
                    for cc in core_calls[core_name]:
                        if id(c) in graph.ancestors(cc) or id(cc) in graph.ancestors(c):
                            owners.add(kind)
                if not owners:
                    owners = set(assignments.values())
            prev = call_kind.get(name)
            if len(owners) > 1 or (prev is not None and prev not in owners):
                call_kind[name] = "shared"
            else:
                call_kind[name] = next(iter(owners))

    # a module applied to the residual stream itself (a norm before the residual is saved, or
    # after a join: MiniMax, post-LN layers) shapes what every later part of the layer reads:
    # it is part of neither subblock and stays in place on a no-op
    cores_all = {c for sb in subblocks.values() for c in sb.cores}
    for kind_, n, _r, _b in events:
        if kind_ == "stream" and _top(n) not in cores_all:
            call_kind[_top(n)] = "shared"
    order = _unique([_top(c) for c in graph.calls])
    for name in order:
        kind = call_kind.get(name)
        if kind == "shared":
            shared.append(name)
        elif kind is not None:
            sb = subblocks[kind]
            if name not in sb.members:
                sb.members.append(name)
    for sb in subblocks.values():
        sb.members.sort(key=order.index)
    for kind, n, _r, _b in events:
        if kind == "join" and isinstance(n, Call) and n.residual_param is not None:
            for sb in subblocks.values():
                if _top(n) in sb.cores:
                    position = n.residual_slot if isinstance(n.residual_slot, int) else None
                    sb.residual_args[_top(n)] = (position, n.residual_param)
                    sb.evidence.append(
                        f"{n.where} `{n.code}`: {_top(n)} adds its argument "
                        f"{n.residual_param!r} (the residual) to its output"
                    )

    arity: dict[str, int | None] = {}
    indexed: dict[str, bool] = {}
    for c in graph.calls:
        name = _top(c)
        if name != c.target:
            continue  # a call below a child (self.mlp.experts(...)) says nothing of the child
        a = c.unpacked
        if name in arity and arity[name] != a and not (c.indexed or indexed.get(name)):
            raise InferenceError(
                f"tuple arity of {name}", f"call sites disagree ({arity[name]} vs {a})", [c.where]
            )
        arity[name] = a if a is not None else arity.get(name)
        indexed[name] = indexed.get(name, False) or c.indexed

    return LayerFlow(
        class_name=class_name,
        layout="parallel" if parallel else "sequential",
        subblocks=subblocks,
        shared=shared,
        arity=arity,
        indexed=indexed,
        called=order,
        sites={
            name: next(f"{c.where} `{c.code}`" for c in graph.calls if _top(c) == name)
            for name in order
        },
        returns_tuple=graph.returns_tuple,
        evidence=[e for ev in seg_evidence for e in ev],
    )


def _layer_input_mixed(graph: FlowGraph, core: Call) -> Op | None:
    """The element-wise operation on the hidden-state path into `core` that mixes in a forward
    argument besides the hidden states (`h * per_layer_input`), when `core` itself is called on
    hidden states alone; None otherwise. The walk stays on the hidden-state path and stops at
    other module calls' context (an attention's mask is passed to a call, not mixed in)."""
    if any(not graph.derived(x) and graph.depends_on_context(x) for x in core.inputs):
        return None
    seen: set[int] = set()
    todo = [x for x in core.inputs if graph.derived(x)]
    while todo:
        node = todo.pop()
        if id(node) in seen or node is graph.input:
            continue
        seen.add(id(node))
        if isinstance(node, Op) and not node.additive:
            if any(not graph.derived(x) and graph.depends_on_context(x) for x in node.inputs):
                return node
        if isinstance(node, Op) and node.additive:
            continue  # a residual join: the segment before it is another one
        todo.extend(x for x in node.inputs if graph.derived(x))
    return None


def _sink_cores(graph: FlowGraph, core_calls: list[Call]) -> list[str]:
    """Cores whose output no other core consumes: in a chain (`fc2(act(fc1(x)))`) only the last
    one becomes zeros (zeros shaped like fc2's input would have the wrong width); the others are
    bypassed. Two sinks mean two parallel branches."""
    sinks = [
        c
        for c in core_calls
        if not any(d is not c and id(c) in graph.ancestors(d) for d in core_calls)
    ]
    return _unique([_top(c) for c in sinks])


def _split_parallel(cores, core_calls, kinds, name_hint, fact, evidence) -> dict[str, str]:
    """The subblock of each core of a segment with several: by the context each receives, or,
    when that does not separate two of them, by their names; cores that remain alike are one
    subblock with several cores (a Mamba mixer beside an attention, a shared MLP beside the
    experts)."""
    if len(set(kinds.values())) > 1 or len(cores) != 2:
        return dict(kinds)
    a, b = cores
    ha, hb = name_hint(core_calls[a][0]), name_hint(core_calls[b][0])
    if ha and hb and ha != hb:
        return {a: ha, b: hb}
    return dict(kinds)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


__all__ = [
    "ATTENTION",
    "FFN",
    "ChildInfo",
    "LayerFlow",
    "Subblock",
    "analyze_layer",
    "Input",
    "Item",
]
