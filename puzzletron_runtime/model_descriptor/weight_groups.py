"""One pass over tensor names for ModelDescriptor.get_weight_groups.

The rule of the API: a name belongs to the first group, in the order of
`layer_name_predicates`, whose pattern matches it (`pattern.match(name)`). Applied literally,
every name is tried against every group one after another, so the cost grows with
names x layers. This module gets the same answer with a bounded amount of work per name:

1. Every pattern is read for the literal text that any name it matches must start with (by a
   small reader that treats digit runs as tokens, so one reading serves every layer, and by
   the `re` module's own parser wherever that reader is unsure). `^model\\.layers\\.3\\.(?:self_attn\\..+|input_layernorm\\..+)$`
   gives {"model.layers.3.self_attn.", "model.layers.3.input_layernorm."}; a pattern that
   cannot be read this way (case-insensitive, starts with a class or a repeat, ...) gives {""}:
   it stays a candidate for every name.
2. A name can only match patterns one of whose prefixes starts it. All prefixes that start a
   given name are prefixes of each other, so the longest one decides the candidate set: its
   own patterns plus those of every shorter prefix of it. The longest prefix is found by
   slicing the name at each prefix length (nothing to set up), or, once a call brings many
   names per prefix or the same predicates come again, by one compiled trie-shaped regex (a
   single C-level match per name).
3. The candidates are tried in predicate order (as one combined alternation when that is
   provably the same as trying them one by one), so the first match among them is the first
   match among all patterns: the ones skipped could not have matched.

Predicates that are not compiled `str` regexes make `group_names` fall back to the per-name
rule for the whole call. Built indexes are cached per predicate set (patterns compare by text
and flags), so repeated calls with the same descriptor and layer count skip step 1.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from typing import Any, Iterable

try:  # the parser behind re.compile (Python >= 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "group_names",
    "literal_prefixes",
    "move_to_sole_subblock",
    "reference_group_names",
]

_IGNORECASE = int(re.IGNORECASE)  # plain ints: flag enums are slow to combine
_VERBOSE = int(re.VERBOSE)

# The trie regex that finds prefixes is compiled (once per index) when a call brings more
# names than this per known prefix, or when the index serves a call after this many.
REGEX_DISPATCH_NAMES_PER_KEY = 16
REGEX_DISPATCH_AFTER_CALLS = 1

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
        # prefix -> (match, positions): `match(name)` finds the first candidate that matches
        # and `positions[m.lastindex or 0]` is its index among the predicates. The prefixes
        # of a key that are keys come before it in sorted order: a stack holds them.
        self.buckets: dict[str, tuple[Any, tuple[int, ...]]] = {}
        stack: list[tuple[str, list[int]]] = []
        for key in sorted(owners):
            while stack and not key.startswith(stack[-1][0]):
                stack.pop()
            inherited = stack[-1][1] if stack else []
            candidates = sorted({*inherited, *owners[key]})
            stack.append((key, candidates))
            self.buckets[key] = _matcher(patterns, candidates)
        # the longest key that starts a name: by slices of each key length (no set-up) or,
        # once a call brings many names or the index is used again, by one trie-shaped regex
        # (compiled once: about 30 us per key, then one C-level match per name)
        self.lengths = sorted({len(key) for key in owners}, reverse=True)
        self.simple = all(len(set(positions)) == 1 for _, positions in self.buckets.values())
        self._dispatch = None
        self.calls = 0

    def dispatch(self):
        if self._dispatch is None:
            self._dispatch = re.compile(_trie_regex(self.buckets), re.DOTALL).match
        return self._dispatch

    def group(self, layer_names: Iterable[str], owner: str) -> dict[str, list[str]]:
        names = layer_names if isinstance(layer_names, (list, tuple)) else list(layer_names)
        found: list[list[str]] = [[] for _ in self.groups]
        appends = [names_of_group.append for names_of_group in found]
        buckets = self.buckets  # prefix -> (match, predicate index by lastindex)
        self.calls += 1
        many = len(names) > REGEX_DISPATCH_NAMES_PER_KEY * len(buckets)
        if self._dispatch is not None or many or self.calls > REGEX_DISPATCH_AFTER_CALLS:
            dispatch = self.dispatch()
            if self.simple:  # one candidate per prefix: no lastindex to read
                plain = {key: (match, appends[at[0]]) for key, (match, at) in buckets.items()}
                for name in names:
                    m = dispatch(name)
                    if m is not None:
                        match, append = plain[m[0]]
                        if match(name) is not None:
                            append(name)
                            continue
                    raise ValueError(f"{owner}: tensor {name!r} matches no weight group")
            else:
                for name in names:
                    m = dispatch(name)
                    if m is not None:
                        match, at = buckets[m[0]]
                        hit = match(name)
                        if hit is not None:
                            appends[at[hit.lastindex or 0]](name)
                            continue
                    raise ValueError(f"{owner}: tensor {name!r} matches no weight group")
        else:
            lengths, get = self.lengths, buckets.get
            for name in names:
                for length in lengths:
                    bucket = get(name[:length])
                    if bucket is not None:
                        match, at = bucket
                        hit = match(name)
                        if hit is not None:
                            appends[at[hit.lastindex or 0]](name)
                            break
                        raise ValueError(f"{owner}: tensor {name!r} matches no weight group")
                else:
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
    end = "\n" if flags & _VERBOSE else ""  # ends a trailing comment in verbose mode
    try:
        combined = re.compile("|".join(f"({p.pattern}{end})" for p in patterns), flags)
    except re.error:
        return None
    return combined if combined.groups == len(patterns) else None


def literal_prefixes(pattern: re.Pattern) -> frozenset[str]:
    """Literal strings one of which starts every string `pattern.match` accepts ({""}: none
    known). Conservative: anything not read as plain literal text ends the prefix."""
    if pattern.flags & _IGNORECASE or not isinstance(pattern.pattern, str):
        return frozenset({""})
    return _literal_prefixes(pattern.pattern, pattern.flags)


@functools.lru_cache(maxsize=4096)
def _literal_prefixes(source: str, flags: int) -> frozenset[str]:
    fast = _fast_prefixes(source, flags)
    if fast is not None:
        return fast
    return _parsed_prefixes(source, flags)


def _parsed_prefixes(source: str, flags: int) -> frozenset[str]:
    """literal_prefixes through re's own parser (exact, slower)."""
    try:
        parsed = _sre_parse.parse(source, flags)
    except Exception:  # noqa: BLE001 - unreadable: no prefix, the per-name rule decides
        return frozenset({""})
    if parsed.state.flags & _IGNORECASE:  # global inline (?i)
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
            if (add_flags | del_flags) & _IGNORECASE:
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
    (no match when none does): a trie of the keys, each optional continuation tried first."""

    def emit(suffixes: list[str]) -> str:
        """Continuations that reach one of `suffixes` (sorted, non-empty strings)."""
        alternatives = []
        for _, run in itertools.groupby(suffixes, key=lambda k: k[0]):
            run = list(run)
            common = os.path.commonprefix(run)
            rest = [k[len(common) :] for k in run]
            text = re.escape(common)
            if rest[0] == "":  # `common` is itself a key (sorted: "" comes first)
                if len(rest) > 1:
                    text += f"(?:{emit(rest[1:])})?"
            else:
                text += emit(rest)
            alternatives.append(text)
        if len(alternatives) == 1:
            return alternatives[0]
        return "(?:" + "|".join(alternatives) + ")"

    ordered = sorted(set(keys))
    if not ordered:
        return "(?!)"
    if ordered[0] == "":
        return f"(?:{emit(ordered[1:])})?" if len(ordered) > 1 else ""
    return emit(ordered)


# -- a fast reader for the common case ----------------------------------------------------------
# Parsing with re's parser costs about 0.4 ms for a verbose generated pattern, and a model has
# two per layer. Patterns of one descriptor differ only in their layer numbers, so the source
# is split into its text and its runs of ASCII digits, and a small reader works on the text
# with each digit run as one token: where a run is literal text, its prefixes name it and are
# filled in per pattern; where it is not (a count, a backreference, inside a class) the reader
# stops, whatever the digits are. The reading is cached per text, so one read serves every
# layer. Anything the reader is not sure of structurally sends the pattern to re's parser.

_DIGITS = re.compile(r"([0-9]+)")
_SPACE = frozenset(" \t\n\r\f\v")
_QUANTIFIERS = frozenset("*+?{")
_NOT_LITERAL = frozenset(".$*+?{")


class _Unsure(Exception):
    """The reader cannot vouch for its reading: use re's parser."""


def _fast_prefixes(source: str, flags: int) -> frozenset[str] | None:
    parts = _DIGITS.split(source)
    templates = _template_prefixes(tuple(parts[0::2]), bool(flags & _VERBOSE))
    if templates is None:
        return None
    runs = parts[1::2]
    return frozenset(template.format(*runs) for template in templates)


@functools.lru_cache(maxsize=256)
def _template_prefixes(texts: tuple[str, ...], verbose: bool) -> frozenset[str] | None:
    """The prefixes of a source with digit runs `texts` between them, as format strings
    ("model.layers.{0}.mlp."), or None when only re's parser can tell."""
    prefixes = _token_prefixes(texts, verbose)
    if prefixes is None:
        return None
    return frozenset(
        "".join(
            f"{{{p}}}" if isinstance(p, int) else p.replace("{", "{{").replace("}", "}}")
            for p in prefix
        )
        for prefix in prefixes
    )


def _token_prefixes(texts: tuple[str, ...], verbose: bool) -> frozenset[tuple] | None:
    tokens: list = []
    for k, text in enumerate(texts):
        if k:
            tokens.append(k - 1)  # the (k-1)th digit run
        tokens.extend(text)
    try:
        reader = _Reader(tokens, verbose)
        prefixes, _ = reader.alternation(at_start=True)
        if reader.pos != len(tokens):  # an unbalanced ")"
            raise _Unsure
    except _Unsure:
        return None
    return frozenset(prefixes)


class _Reader:
    """Reads (prefixes, exact) like `_sequence`, straight from the tokens of a source."""

    def __init__(self, tokens: list, verbose: bool):
        self.tokens = tokens
        self.verbose = verbose
        self.pos = 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        if token is None:
            raise _Unsure
        self.pos += 1
        return token

    def skip_ignored(self) -> None:
        """Whitespace and comments, in verbose mode."""
        while self.verbose:
            token = self.peek()
            if token in _SPACE:
                self.pos += 1
            elif token == "#":
                while self.peek() not in (None, "\n"):
                    self.pos += 1
            else:
                return

    def alternation(self, at_start: bool) -> tuple[set, bool]:
        prefixes, exact = self.sequence(at_start)
        while self.peek() == "|":
            self.pos += 1
            more, more_exact = self.sequence(at_start)
            prefixes |= more
            exact = exact and more_exact
        return prefixes, exact

    def sequence(self, at_start: bool) -> tuple[set, bool]:
        prefixes: set = {()}
        live = True
        while True:
            self.skip_ignored()
            token = self.peek()
            if token is None or token in ("|", ")"):
                return prefixes, live
            start = at_start and prefixes == {()}
            if token == "^" and start:
                self.pos += 1
                continue
            options, exact = self.atom(start)
            if options is None:  # a comment group: nothing to match
                continue
            self.skip_comments()  # re applies a quantifier across them
            if self.quantifier():
                options, exact = None, False
            if not live:
                continue
            if options is None or not options:
                live = False
                continue
            product = {p + o for p in prefixes for o in options}
            if len(product) > _MAX_PREFIXES:
                live = False
                continue
            prefixes = product
            live = exact

    def skip_comments(self) -> None:
        """Verbose whitespace and comments, and (?#...) groups."""
        while True:
            self.skip_ignored()
            if self.tokens[self.pos : self.pos + 3] != ["(", "?", "#"]:
                return
            self.pos += 3
            while self.take() != ")":
                pass

    def quantifier(self) -> bool:
        """Read past a quantifier if one comes next (`{` counts only in re's own form:
        digits, optionally a comma and digits, then `}`; otherwise it is a literal `{`)."""
        token = self.peek()
        if token not in _QUANTIFIERS:
            return False
        if token == "{":
            end = self.pos + 1
            if isinstance(self.tokens[end] if end < len(self.tokens) else None, int):
                end += 1
            if end < len(self.tokens) and self.tokens[end] == ",":
                end += 1
                if isinstance(self.tokens[end] if end < len(self.tokens) else None, int):
                    end += 1
            if end == self.pos + 1 or end >= len(self.tokens) or self.tokens[end] != "}":
                return False  # a literal "{": the next atom reads it (and stops)
            self.pos = end + 1
        else:
            self.pos += 1
        if self.peek() in ("?", "+"):  # lazy or possessive
            self.pos += 1
        return True

    def atom(self, start: bool) -> tuple[set | None, bool]:
        """(options, exact) of the next atom: options None for anything not literal text
        (a comment group returns (None, True) and is skipped by the caller)."""
        token = self.take()
        if isinstance(token, int):
            return {(token,)}, True
        if token == "\\":
            escaped = self.take()
            if isinstance(escaped, int) or escaped.isascii() and escaped.isalnum():
                if escaped == "A" and start:
                    return {()}, True
                if escaped in ("x", "u", "U", "N", "0"):  # multi-token escapes: not read here
                    raise _Unsure
                return set(), False  # a class, an anchor or a backreference
            return {(escaped,)}, True
        if token == "[":
            return self.char_class(), True
        if token == "(":
            return self.group(start)
        if token in _NOT_LITERAL or token == "^":
            return set(), False
        return {(token,)}, True

    def char_class(self) -> set:
        members: set = set()
        plain = True
        if self.peek() == "^":
            self.pos += 1
            plain = False
        first = True
        while True:
            token = self.take()
            if token == "]" and not first:
                break
            first = False
            if token == "\\":
                self.take()
                plain = False
            elif isinstance(token, int) or token in ("-", "[", "&", "~", "|"):
                plain = False
            else:
                members.add((token,))
        return members if plain else set()

    def group(self, start: bool) -> tuple[set | None, bool]:
        if self.peek() == "?":
            self.pos += 1
            kind = self.take()
            if kind == "#":  # a comment, up to the first ")"
                while self.take() != ")":
                    pass
                return None, True
            if kind == "P" and self.peek() == "<":  # a named group: skip the name
                while self.take() != ">":
                    pass
            elif kind != ":":
                if kind in ("=", "!") or kind == "<" and self.peek() in ("=", "!"):
                    if kind == "<":
                        self.pos += 1
                    self.alternation(False)  # a lookaround: read past it, keep nothing
                    if self.take() != ")":
                        raise _Unsure
                    return set(), False
                raise _Unsure  # flags, conditionals, atomic groups, (?P=name)
        prefixes, exact = self.alternation(start)
        if self.take() != ")":
            raise _Unsure
        return prefixes, exact


def move_to_sole_subblock(
    groups: dict[str, list[str]], num_hidden_layers: int, followers: "re.Pattern"
) -> dict[str, list[str]]:
    """For stacks whose layers hold one subblock each (Nemotron-H: a norm, then a Mamba mixer,
    an attention, an MLP or experts): the names `followers` matches belong to the subblock
    their layer has. The predicates list them with the attention; in a layer whose attention
    group holds nothing else while its FFN group is not empty, they move to the FFN group.
    Groups left empty are dropped; the order of groups and names is kept."""
    out = {k: list(v) for k, v in groups.items()}
    for i in range(num_hidden_layers):
        attention, ffn = f"block_{i}_attention", f"block_{i}_ffn"
        names = out.get(attention, [])
        moving = [n for n in names if followers.match(n)]
        if not moving or len(moving) != len(names) or not out.get(ffn):
            continue
        out[ffn] = moving + out[ffn]
        del out[attention]
    return out
