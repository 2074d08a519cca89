"""One pass over tensor names for ModelDescriptor.get_weight_groups.

The rule of the API: a name belongs to the first group, in the order of
`layer_name_predicates`, whose pattern matches it (`pattern.match(name)`). Applied literally,
every name is tried against every group one after another, so the cost grows with
names x layers. This module gets the same answer with a bounded amount of work per name:

1. Every pattern is read (with the `re` module's own parser) for the literal text that any
   name it matches must start with. `^model\\.layers\\.3\\.(?:self_attn\\..+|input_layernorm\\..+)$`
   gives {"model.layers.3.self_attn.", "model.layers.3.input_layernorm."}; a pattern that
   cannot be read this way (case-insensitive, starts with a class or a repeat, ...) gives {""}:
   it stays a candidate for every name.
2. A name can only match patterns one of whose prefixes starts it. All prefixes that start a
   given name are prefixes of each other, so the longest one decides the candidate set: its
   own patterns plus those of every shorter prefix of it. One compiled trie-shaped regex finds
   that longest prefix in a single C-level match.
3. The candidates are tried in predicate order (as one combined alternation when that is
   provably the same as trying them one by one), so the first match among them is the first
   match among all patterns: the ones skipped could not have matched.

Predicates that are not compiled `str` regexes make `group_names` fall back to the per-name
rule for the whole call. Built indexes are cached per predicate set (patterns compare by text
and flags), so repeated calls with the same descriptor and layer count skip step 1.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable

try:  # the parser behind re.compile (Python >= 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["group_names", "literal_prefixes", "reference_group_names"]

# Bound on the number of alternative prefixes one pattern expands to (character classes and
# alternations multiply); past it the prefixes found so far are kept, which is still sound.
_MAX_PREFIXES = 64


def reference_group_names(
    predicates: list[tuple[str, Any]], layer_names: Iterable[str], owner: str
) -> dict[str, list[str]]:
    """The first-match rule, name by name: the definition the fast path must equal."""
    groups: dict[str, list[str]] = {}
    for name in layer_names:
        for group, pattern in predicates:
            if pattern.match(name):
                groups.setdefault(group, []).append(name)
                break
        else:
            raise ValueError(f"{owner}: tensor {name!r} matches no weight group")
    order = {group: i for i, (group, _) in enumerate(predicates)}
    return dict(sorted(groups.items(), key=lambda item: order[item[0]]))


def group_names(
    predicates: list[tuple[str, Any]], layer_names: Iterable[str], owner: str
) -> dict[str, list[str]]:
    """Group `layer_names` by the first-match rule over `predicates` (group, pattern) in one
    pass. Raises ValueError naming the first name no pattern matches (`owner` names the
    descriptor in the message)."""
    if not all(isinstance(p, re.Pattern) and isinstance(p.pattern, str) for _, p in predicates):
        return reference_group_names(predicates, layer_names, owner)
    try:
        index = _index(tuple(predicates))
    except TypeError:  # unhashable pattern subclass: no cache, same index
        index = _GroupIndex(tuple(predicates))
    return index.group(layer_names, owner)


@functools.lru_cache(maxsize=16)
def _index(predicates: tuple[tuple[str, re.Pattern], ...]) -> _GroupIndex:
    return _GroupIndex(predicates)


class _GroupIndex:
    """Dispatch from a name's longest known literal prefix to its candidate patterns."""

    def __init__(self, predicates: tuple[tuple[str, re.Pattern], ...]):
        self.groups = [group for group, _ in predicates]
        patterns = [pattern for _, pattern in predicates]
        owners: dict[str, list[int]] = {}
        for i, pattern in enumerate(patterns):
            for prefix in literal_prefixes(pattern):
                owners.setdefault(prefix, []).append(i)
        lengths = sorted({len(key) for key in owners})
        # prefix -> (match, positions): `match(name)` finds the first candidate that matches
        # and `positions[m.lastindex or 0]` is its index among the predicates
        self.buckets: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for key in owners:
            found: set[int] = set()
            for length in lengths:
                if length > len(key):
                    break
                found.update(owners.get(key[:length], ()))
            self.buckets[key] = _matcher(patterns, sorted(found))
        self.dispatch = re.compile(_trie_regex(owners), re.DOTALL).match

    def group(self, layer_names: Iterable[str], owner: str) -> dict[str, list[str]]:
        found: list[list[str]] = [[] for _ in self.groups]
        # per call: prefix -> (match, the `append` of each candidate's list by lastindex)
        buckets = {
            key: (match, tuple(found[i].append for i in positions))
            for key, (match, positions) in self.buckets.items()
        }
        dispatch = self.dispatch
        for name in layer_names:
            m = dispatch(name)
            if m is not None:
                match, appends = buckets[m.group()]
                hit = match(name)
                if hit is not None:
                    appends[hit.lastindex or 0](name)
                    continue
            raise ValueError(f"{owner}: tensor {name!r} matches no weight group")
        return {group: names for group, names in zip(self.groups, found) if names}


class _Hit:
    """What the one-by-one matcher returns: `lastindex` as a combined pattern would set it."""

    __slots__ = ("lastindex",)

    def __init__(self, lastindex: int):
        self.lastindex = lastindex


def _matcher(patterns: list[re.Pattern], candidates: list[int]):
    """(match, positions) for trying `patterns[candidates]` in order: `match(name)` returns a
    match object or None, and `positions[m.lastindex or 0]` is the predicate index."""
    if len(candidates) == 1:
        (only,) = candidates
        pattern = patterns[only]
        return pattern.match, (only,) * (pattern.groups + 1)
    positions = (candidates[0], *candidates)  # lastindex is never 0 here
    combined = _combine([patterns[i] for i in candidates])
    if combined is not None:
        return combined.match, positions
    matches = [patterns[i].match for i in candidates]

    def first(name: str):
        for i, match in enumerate(matches, 1):
            if match(name) is not None:
                return _Hit(i)
        return None

    return first, positions


def _combine(patterns: list[re.Pattern]) -> re.Pattern | None:
    """`(p1)|(p2)|...` when it provably behaves like trying p1, p2, ... in turn, else None.

    Alternation in `re` is ordered and nothing follows it, so the first alternative that
    matches wins, and with no groups of their own the wrapping group's number says which one.
    That holds when every pattern has the same flags (one set applies to the whole) and no
    groups (no renumbered backreferences); a source that does not compile once wrapped (global
    inline flags) is left alone.
    """
    flags = patterns[0].flags
    if any(p.flags != flags or p.groups for p in patterns):
        return None
    end = "\n" if flags & re.VERBOSE else ""  # ends a trailing comment in verbose mode
    try:
        combined = re.compile("|".join(f"({p.pattern}{end})" for p in patterns), flags)
    except re.error:
        return None
    return combined if combined.groups == len(patterns) else None


def literal_prefixes(pattern: re.Pattern) -> frozenset[str]:
    """Literal strings one of which starts every string `pattern.match` accepts ({""}: none
    known). Conservative: anything not read as plain literal text ends the prefix."""
    if pattern.flags & re.IGNORECASE or not isinstance(pattern.pattern, str):
        return frozenset({""})
    return _literal_prefixes(pattern.pattern, pattern.flags)


@functools.lru_cache(maxsize=4096)
def _literal_prefixes(source: str, flags: int) -> frozenset[str]:
    try:
        parsed = _sre_parse.parse(source, flags)
    except Exception:  # noqa: BLE001 - unreadable: no prefix, the per-name rule decides
        return frozenset({""})
    if parsed.state.flags & re.IGNORECASE:  # global inline (?i)
        return frozenset({""})
    prefixes, _ = _sequence(list(parsed), at_start=True)
    return frozenset(prefixes)


def _sequence(items, at_start: bool) -> tuple[set[str], bool]:
    """(prefixes, exact) for a sequence of parsed items: every match of the sequence starts
    with one of `prefixes`; `exact` when every match *is* one of them (so what follows the
    sequence may extend them)."""
    prefixes = {""}
    for op, av in items:
        start = at_start and prefixes == {""}
        if op is _sre.LITERAL:
            options, exact = {chr(av)}, True
        elif op is _sre.AT and start and av in (_sre.AT_BEGINNING, _sre.AT_BEGINNING_STRING):
            continue  # `^` / `\A` at position 0 of a match always holds
        elif op is _sre.IN and all(o is _sre.LITERAL for o, _ in av):
            options, exact = {chr(v) for _, v in av}, True
        elif op is _sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & re.IGNORECASE:
                return prefixes, False
            options, exact = _sequence(list(sub), start)
        elif op is _sre.BRANCH:
            options, exact = set(), True
            for branch in av[1]:
                got, branch_exact = _sequence(list(branch), start)
                options |= got
                exact = exact and branch_exact
        else:
            return prefixes, False
        product = {p + o for p in prefixes for o in options}
        if len(product) > _MAX_PREFIXES:
            return prefixes, False
        prefixes = product
        if not exact:
            return prefixes, False
    return prefixes, True


def _trie_regex(keys: Iterable[str]) -> str:
    """A regex whose match at position 0 ends at the longest of `keys` that starts the string
    (no match when none does)."""
    root: dict = {}
    for key in keys:
        node = root
        for ch in key:
            node = node.setdefault(ch, {})
        node[""] = True  # marks the end of a key

    def emit(node: dict) -> str:
        """Continuations from `node` that reach a key, longer ones tried first."""
        alternatives = []
        for ch in sorted(k for k in node if k):
            child = node[ch]
            text = re.escape(ch)
            # a chain of one-child nodes that end no key: one literal run
            while "" not in child and len(child) == 1:
                (nxt,) = child
                text += re.escape(nxt)
                child = child[nxt]
            rest = emit(child) if len(child) > ("" in child) else ""
            if rest and "" in child:
                rest = f"(?:{rest})?"
            alternatives.append(text + rest)
        if len(alternatives) == 1:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")"

    body = emit(root) if len(root) > ("" in root) else ""
    if "" in root:
        return f"(?:{body})?" if body else ""
    return body if body else "(?!)"
