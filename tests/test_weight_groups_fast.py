"""get_weight_groups reads names in one pass, yet equals the first-match rule of the API.

The rule (a name goes to the first group, in predicate order, whose pattern matches it) is
written out again here, name by name, and every case compares the two: the names of every
committed descriptor's tiny and default models, a DeepSeek-V3-shaped MoE list, hand-picked
adversarial predicate sets, and randomly generated patterns and names.
"""

import functools
import random
import re
from pathlib import Path

import pytest
import torch

import generated
import puzzletron_runtime.model_descriptor.weight_groups as weight_groups
from puzzletron_runtime.loading import from_config
from generator import coverage
from generator.source import resolve
from generator.tiny import default_config, tiny_config
from puzzletron_runtime import ModelDescriptor, deci_x_patcher
from puzzletron_runtime.model_descriptor.weight_groups import literal_prefixes


@pytest.fixture(autouse=True, params=["slices", "trie regex"])
def dispatch(request, monkeypatch):
    """Every test runs with both ways of finding a name's longest prefix."""
    never = request.param == "slices"
    monkeypatch.setattr(weight_groups, "REGEX_DISPATCH_NAMES_PER_KEY", 10**9 if never else 0)
    monkeypatch.setattr(weight_groups, "REGEX_DISPATCH_AFTER_CALLS", 10**9 if never else 0)
    weight_groups._index.cache_clear()
    yield request.param
    weight_groups._index.cache_clear()


# the descriptors coverage.json records as verified: the others may not build every config here
VERIFIED = [
    t
    for t, row in coverage.load(Path(generated.__file__).parent).items()
    if row.status == coverage.VERIFIED
]


def first_match_rule(predicates, names):
    """The API's rule, applied literally: (groups, or the ValueError's tensor name)."""
    preds = list(predicates.items())
    groups = {}
    for name in names:
        for group, pattern in preds:
            if pattern.match(name):
                groups.setdefault(group, []).append(name)
                break
        else:
            return None, name
    order = [g for g, _ in preds]
    return {g: groups[g] for g in order if g in groups}, None


def descriptor_with(predicates):
    class Adversarial(ModelDescriptor):
        decoder_layer_cls = block_config_to_layer_overrides = init_rotary_embedding = None
        input_embedding_name = output_embedding_name = final_norm_name = None
        layer_block_name = None

        @staticmethod
        def layer_name_predicates(num_layers):
            return dict(predicates)

    return Adversarial


def assert_same(predicates, names):
    expected, unmatched = first_match_rule(predicates, names)
    d = descriptor_with(predicates)
    if unmatched is None:
        got = d.get_weight_groups(iter(names), 1)
        assert got == expected
        assert list(got) == list(expected)  # group order too
    else:
        with pytest.raises(ValueError, match=re.escape(repr(unmatched))):
            d.get_weight_groups(iter(names), 1)


# -- every committed descriptor -------------------------------------------------------------------
def meta_names(descriptor, config, block_configs=None):
    with torch.device("meta"), deci_x_patcher(descriptor, block_configs):
        model = from_config(config)
    return list(model.state_dict())


@functools.lru_cache(maxsize=None)
def committed_name_lists(model_type):
    """The state-dict names of a committed descriptor's models: tiny, tiny tied, tiny
    heterogeneous, and the default-size meta model (built once per type, shared by both ways of
    dispatching)."""
    d = generated.get_descriptor(model_type)
    config_cls = resolve(model_type).config_cls
    n = tiny_config(config_cls).get_text_config().num_hidden_layers
    on = {"no_op": False, "num_key_value_heads": 1}
    ffn = {"no_op": False, "intermediate_size": 96}
    kinds = [
        {"attention": {"no_op": True}, "ffn": ffn},
        {"attention": on, "ffn": {"no_op": True}},
        {"attention": {"no_op": True}, "ffn": {"no_op": True}},
        {"attention": on, "ffn": ffn},
    ]
    heterogeneous = [kinds[i % len(kinds)] for i in range(n)]
    default = default_config(config_cls)
    try:  # a config class that refuses tied embeddings (DBRX's) has no tied model
        tied = [meta_names(d, tiny_config(config_cls, tie_word_embeddings=True))]
    except Exception:
        tied = []
    return (
        n,
        default.get_text_config().num_hidden_layers,
        (
            meta_names(d, tiny_config(config_cls)),
            *tied,
            meta_names(d, tiny_config(config_cls), heterogeneous),
            meta_names(d, default),
        ),
    )


# both dispatch params of a type run on one xdist worker, which builds its models once
BY_TYPE = [pytest.param(t, marks=pytest.mark.xdist_group(f"names-{t}"), id=t) for t in VERIFIED]


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_committed_descriptors_match_the_rule(model_type):
    d = generated.get_descriptor(model_type)
    n, default_layers, name_lists = committed_name_lists(model_type)
    # the base class's one-pass grouping (a descriptor may regroup after it: Nemotron-H moves
    # a single-subblock layer's norm to that subblock)
    base_groups = ModelDescriptor.get_weight_groups.__func__
    for names in name_lists:
        layers = n if names is not name_lists[-1] else default_layers
        preds = d.layer_name_predicates(layers)
        expected, unmatched = first_match_rule(preds, names)
        assert unmatched is None
        assert base_groups(d, names, layers) == expected
        # shuffled input, and names the descriptor does not know
        shuffled = random.Random(0).sample(names, len(names))
        assert base_groups(d, shuffled, layers) == first_match_rule(preds, shuffled)[0]
        bad = names[:3] + [names[3] + "x", "model.layers.999.mlp.weight", "zzz"]
        assert_same(preds, [n_ for n_ in bad if first_match_rule(preds, [n_])[1] is None])
        assert_same(preds, bad)


def test_committed_descriptors_use_the_fast_path(monkeypatch):
    """The per-name fallback is not what makes the comparisons above pass."""

    def refuse(*args):
        raise AssertionError("fell back to the per-name rule")

    monkeypatch.setattr(weight_groups, "reference_group_names", refuse)
    for model_type in VERIFIED:
        d = generated.get_descriptor(model_type)
        names = [f"{d.input_embedding_name()}.weight", f"{d.output_embedding_name()}.weight"]
        assert d.get_weight_groups(names, 2)


def deepseek_like_names(layers, experts):
    names = ["model.embed_tokens.weight"]
    attn = ["q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{a}.weight" for a in attn + ["kv_b_proj", "o_proj"]]
        names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
        names += [p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
        names += [
            p + f"mlp.experts.{e}.{x}_proj.weight"
            for e in range(experts)
            for x in ("gate", "up", "down")
        ]
    return names + ["model.norm.weight", "lm_head.weight"]


def test_moe_names_with_a_generated_descriptor_shape():
    d = generated.get_descriptor("llama")  # predicates of the generated shape
    names = deepseek_like_names(12, 16)
    preds = d.layer_name_predicates(12)
    assert d.get_weight_groups(names, 12) == first_match_rule(preds, names)[0]
    assert (
        len(d.get_weight_groups(names, 12)["block_11_ffn"]) == 1 + 2 + 3 + 48
    )  # post-attention norm, router, shared, experts


# -- adversarial predicate sets -------------------------------------------------------------------
class ContainsPredicate:
    """Not a regex: anything with .match must still work (name by name)."""

    def __init__(self, text):
        self.text = text

    def match(self, name):
        return self.text in name


NAMES = [
    "a.b",
    "a.bc",
    "a.b.c",
    "ab",
    "A.B",
    "A.b",
    "x\n",
    "x",
    "",
    "a\nb",
    "layers.1.x",
    "layers.10.x",
    "layers.1",
    "ß.k",
    "zz.a.b",
    "a.b\n",
]

ADVERSARIAL = {
    "shorter prefix first": {"g1": re.compile(r"a\."), "g2": re.compile(r"a\.b")},
    "longer prefix first": {"g1": re.compile(r"a\.b\.c"), "g2": re.compile(r"a\.")},
    "no anchor, search-like": {"g1": re.compile(r".*b"), "g2": re.compile(r"a")},
    "ignorecase": {"g1": re.compile(r"a\.B", re.I), "g2": re.compile(r"A")},
    "inline global flags": {"g1": re.compile(r"(?i)a\.b$"), "g2": re.compile(r"(?x) a \. b c")},
    "scoped ignorecase": {"g1": re.compile(r"(?i:a)\.b"), "g2": re.compile(r"a\.bc")},
    "groups and backreference": {"g1": re.compile(r"(a)\.\1?b"), "g2": re.compile(r"(?P<n>a)b")},
    "optional literal": {"g1": re.compile(r"ab?\.b"), "g2": re.compile(r"ab?")},
    "counted repeat": {"g1": re.compile(r"a{0}\.b"), "g2": re.compile(r"a{1,2}b")},
    "classes": {"g1": re.compile(r"[ax]\.b"), "g2": re.compile(r"[^a]"), "g3": re.compile("[a-z]")},
    "empty branch": {"g1": re.compile(r"(?:|zz\.)a\.b$"), "g2": re.compile(r"a|x")},
    "dollar before newline": {
        "g1": re.compile(r"x$"),
        "g2": re.compile(r"a\.b$"),
        "g3": re.compile(""),
    },
    "multiline caret": {
        "g1": re.compile(r"a\n^b", re.M),
        "g2": re.compile(r"^a"),
        "g3": re.compile("x"),
    },
    "caret not first": {
        "g1": re.compile(r"a^b"),
        "g2": re.compile(r"\Aa\.b\Z"),
        "g3": re.compile("a"),
    },
    "lookarounds": {
        "g1": re.compile(r"(?=a\.b)a"),
        "g2": re.compile(r"(?!a)"),
        "g3": re.compile("a"),
    },
    "dotall": {"g1": re.compile(r"a.b", re.S), "g2": re.compile(r"a.")},
    "verbose with comments": {
        "g1": re.compile("a \\. b  # the b\n$", re.X),
        "g2": re.compile("a  # trailing comment, no newline", re.X),
    },
    "layer digits": {
        "layers_1": re.compile(r"layers\.1\."),
        "layers_10": re.compile(r"layers\.10\."),
        "layers_1_bare": re.compile(r"layers\.1$"),
    },
    "same pattern twice": {"g1": re.compile(r"a\.b"), "g2": re.compile(r"a\.b")},
    "unicode": {"g1": re.compile(r"ß\.k"), "g2": re.compile(r"(?i)SS")},
    "not a regex": {"g1": ContainsPredicate(".b"), "g2": re.compile("a")},
    "matches nothing": {"g1": re.compile(r"(?!)"), "g2": re.compile("q")},
    "empty pattern last": {"g1": re.compile(r"a\.b"), "g2": re.compile("")},
    "many alternatives": {
        "g1": re.compile("|".join(f"a{i}" for i in range(100))),
        "g2": re.compile(""),
    },
    "no predicates": {},
}


@pytest.mark.parametrize("predicates", ADVERSARIAL.values(), ids=list(ADVERSARIAL))
def test_adversarial_predicates(predicates):
    assert_same(predicates, NAMES)
    for name in NAMES:
        assert_same(predicates, [name])
    assert_same(predicates, [])


def test_bytes_pattern_raises_like_the_rule():
    d = descriptor_with({"g1": re.compile(r"a"), "g2": re.compile(rb"b")})
    assert d.get_weight_groups(["a"], 1) == {"g1": ["a"]}
    with pytest.raises(TypeError):
        d.get_weight_groups(["a", "b"], 1)


# -- random patterns --------------------------------------------------------------------------------
ATOMS = ["a", "b", r"\.", "1", "0", ".", "[ab]", "[^a]", r"\d", "x"]
QUANT = ["", "", "", "?", "*", "+", "{2}"]


def random_pattern(rng, depth=0):
    parts = []
    if rng.random() < 0.5:
        parts.append(rng.choice(["^", r"\A"]))
    for _ in range(rng.randint(0, 5)):
        if depth < 2 and rng.random() < 0.2:
            branches = [random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3))]
            parts.append("(?:" + "|".join(branches) + ")" + rng.choice(QUANT))
        else:
            parts.append(rng.choice(ATOMS) + rng.choice(QUANT))
    if rng.random() < 0.4:
        parts.append(rng.choice(["$", r"\Z"]))
    return "".join(parts)


def test_random_predicates_match_the_rule():
    rng = random.Random(11)
    alphabet = "ab.10x\n"
    for _ in range(300):
        predicates = {}
        for g in range(rng.randint(1, 6)):
            flags = rng.choice([0, 0, 0, re.I, re.M, re.S])
            predicates[f"g{g}"] = re.compile(random_pattern(rng), flags)
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7))) for _ in range(40)]
        names = list(dict.fromkeys(names))
        matched = [n for n in names if first_match_rule(predicates, [n])[1] is None]
        assert_same(predicates, matched)
        assert_same(predicates, names)


def test_literal_prefixes_are_sound_on_random_patterns():
    """Every string a pattern matches starts with one of its literal prefixes."""
    rng = random.Random(5)
    for _ in range(500):
        pattern = re.compile(random_pattern(rng))
        prefixes = literal_prefixes(pattern)
        for _ in range(30):
            name = "".join(rng.choice("ab.10x") for _ in range(rng.randint(0, 8)))
            if pattern.match(name):
                assert any(name.startswith(p) for p in prefixes), (pattern, name, prefixes)


RICH_ATOMS = ATOMS + [
    "{",
    "}",
    "{2}",
    "{1,}",
    "{,2}",
    "{}",
    "[]a]",
    "[a-b]",
    "(?#c|)",
    "(?P<n>a|1)",
    "(?=a)",
    "(?<=a)",
    "(?!b)",
    r"\n",
    r"\x31",
    "10",
    " ",
    "# c|(\n",
    r"\ ",
    r"\#",
]


def rich_pattern(rng, depth=0):
    parts = []
    if rng.random() < 0.3:
        parts.append("^")
    for _ in range(rng.randint(0, 6)):
        if depth < 2 and rng.random() < 0.2:
            branches = [rich_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3))]
            parts.append(rng.choice(["(?:", "("]) + "|".join(branches) + ")" + rng.choice(QUANT))
        else:
            parts.append(rng.choice(RICH_ATOMS) + rng.choice(QUANT + ["", "(?#q)*"]))
    return "".join(parts)


def test_fast_reader_is_sound_on_rich_random_patterns():
    """The fast reader (digit runs as tokens, verbose mode, comments, classes, counted
    repeats, literal braces) against strings the pattern matches; also the pattern twice
    with other digits, which reuses the cached reading."""
    rng = random.Random(7)
    read_fast = 0
    for _ in range(1500):
        source = rich_pattern(rng)
        flags = rng.choice([0, re.X])
        try:
            pattern = re.compile(source, flags)
        except re.error:
            continue
        read_fast += weight_groups._fast_prefixes(source, flags) is not None
        for variant in (pattern, re.compile(source.replace("1", "10"), flags)):
            prefixes = literal_prefixes(variant)
            for _ in range(40):
                name = "".join(rng.choice("ab.10x{} #\n") for _ in range(rng.randint(0, 9)))
                if variant.match(name):
                    assert any(name.startswith(p) for p in prefixes), (variant, name, prefixes)
    assert read_fast > 500  # the fast reader, not re's parser, read most of them


def test_fast_reader_reads_generated_patterns_like_res_parser():
    for model_type in generated.available():
        for pattern in generated.get_descriptor(model_type).layer_name_predicates(12).values():
            fast = weight_groups._fast_prefixes(pattern.pattern, pattern.flags)
            assert fast is not None
            assert fast == weight_groups._parsed_prefixes(pattern.pattern, pattern.flags)


def test_literal_prefixes_of_the_generated_shape():
    pattern = generated.get_descriptor("llama").layer_name_predicates(12)["block_11_attention"]
    assert literal_prefixes(pattern) == {
        "model.layers.11.input_layernorm.",
        "model.layers.11.self_attn.",
    }
    assert literal_prefixes(re.compile(r"a(?i:b)")) == {"a"}
    assert literal_prefixes(re.compile(r"[xy]z|q")) == {"xz", "yz", "q"}
    assert literal_prefixes(re.compile(r".+")) == {""}
