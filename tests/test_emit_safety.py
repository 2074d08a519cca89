"""Emitted code is safe from its input. Property-based: descriptors rendered from random
identifier-like module and tensor names always compile and their predicates partition exactly
the names they were built from; hostile strings in any spec field are refused or reach the module
only as escaped literals, never as code."""

import ast
import builtins
import dataclasses
import functools
import keyword
import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from generator import predicates, render
from generator.errors import PuzzleGenError
from generator.infer import infer
from generator.spec import (
    ClassRef,
    ConfigOverride,
    ConfigVariant,
    DescriptorSpec,
    DummyBlock,
    ModuleReplacement,
    check_renderable,
)
from puzzletron_runtime import ModelDescriptorFactory

# derandomized: CI sees the same examples on every run (a failure reproduces); raise
# max_examples locally to explore further
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    derandomize=True,
)


@functools.lru_cache(maxsize=None)
def base_spec() -> DescriptorSpec:
    return infer("llama")


def execute(source: str) -> dict:
    """Compile and run a rendered descriptor module; the factory registration is undone."""
    namespace: dict = {"__name__": "_emit_safety_descriptor"}
    with ModelDescriptorFactory.scratch():  # the model type may be registered already
        exec(compile(source, "<descriptor>", "exec"), namespace)
    return namespace


def shape(source: str) -> tuple:
    """The structure of a rendered module: top-level statement kinds, the number of names each
    import binds, each class's methods and the statement kinds of their bodies (names that are
    data, like the class name, may vary). Injected code changes it."""
    tree = ast.parse(source)
    imported = sum(len(n.names) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = [("imports", imported)]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            methods = tuple(
                (n.name, tuple(type(b).__name__ for b in n.body))
                for n in node.body
                if isinstance(n, ast.FunctionDef)
            )
            out.append(("class", methods))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        elif isinstance(node, ast.FunctionDef):
            out.append(("def", node.name))
        else:
            out.append((type(node).__name__,))
    return tuple(out)


# -- random, well-formed names --------------------------------------------------------------------
_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s)
)
# names that shadow builtins or the template's own names are fine as attributes
_IDENT = st.one_of(_NAMES, st.sampled_from(["print", "list", "re", "nn", "sys", "Any", "type"]))
_PATH = st.lists(_IDENT, min_size=1, max_size=3).map(".".join)


@st.composite
def layouts(draw):
    stack = draw(_PATH)
    tops = draw(st.lists(_PATH, min_size=3, max_size=3, unique=True))
    children = draw(st.lists(_IDENT, min_size=2, max_size=6, unique=True))
    split = draw(st.integers(1, len(children) - 1))
    params = draw(st.lists(_IDENT, min_size=1, max_size=2, unique=True))
    num_layers = draw(st.integers(1, 4))
    # top-level modules must not contain one another or the layer stack
    paths = [stack, *tops]
    for i, a in enumerate(paths):
        for j, b in enumerate(paths):
            assume(i == j or not (b + ".").startswith(a + "."))
    return stack, tops, children[:split], children[split:], params, num_layers


def spec_for(stack, tops, attention, ffn, dummy_attrs=()) -> DescriptorSpec:
    base = base_spec()
    emb, head, norm = tops

    def sub(kind, members, template):
        return dataclasses.replace(
            template,
            replacements=tuple(
                ModuleReplacement(m, "MatchingZeros" if i == len(members) - 1 else "Same", None)
                for i, m in enumerate(members)
            ),
            weight_modules=tuple(members),
        )

    return dataclasses.replace(
        base,
        layer_stack=stack,
        input_embedding=emb,
        output_embedding=head,
        final_norm=norm,
        kinds=(
            dataclasses.replace(
                base.kinds[0],
                children=tuple(attention) + tuple(ffn),
                attention=sub("attention", attention, base.kinds[0].attention),
                ffn=sub("ffn", ffn, base.kinds[0].ffn),
                shared_modules=(),
            ),
        ),
        rebuilt_buffers=(),
        config_variants=(),
        dummy_block=DummyBlock(False, tuple(dummy_attrs)),
        predicates=predicates.build([emb], [norm, head], stack, attention, ffn),
    )


@SETTINGS
@given(layouts(), st.lists(_IDENT, max_size=2, unique=True))
def test_random_names_render_to_a_module_whose_groups_partition_them(layout, dummy_attrs):
    stack, (emb, head, norm), attention, ffn, params, n = layout
    spec = spec_for(stack, (emb, head, norm), attention, ffn, dummy_attrs)
    source = render.render_descriptor(spec)
    descriptor = execute(source)[spec.class_name]
    names = [f"{emb}.weight", f"{head}.weight", f"{norm}.weight"]
    expected = {"embeddings": {f"{emb}.weight"}, "lm_head": {f"{head}.weight", f"{norm}.weight"}}
    for i in range(n):
        for kind, members in (("attention", attention), ("ffn", ffn)):
            group = {f"{stack}.{i}.{m}.{p}" for m in members for p in params}
            expected[f"block_{i}_{kind}"] = group
            names += sorted(group)
    groups = descriptor.get_weight_groups(names, n)
    assert {g: set(v) for g, v in groups.items() if v} == expected
    assert descriptor.layer_block_name(n - 1) == f"{stack}.{n - 1}"
    assert descriptor.input_embedding_name() == emb and descriptor.final_norm_name() == norm
    # and the predicates validate as the partition the generator checks before rendering
    predicates.validate(spec.predicates, names, n, "the random names")


# -- hostile strings ----------------------------------------------------------------------------
HOSTILE = [
    'a"; import os; os.system("echo pwned") #',
    "x'\nimport os\n",
    'doc"""\nimport os\n"""',
    "{{ spec.class_name }}",
    "{% raw %}x{% endraw %}",
    "}{",
    "a\\",
    "layers.0)\nimport os\n#",
    "__import__('os')",
    "class",
    "print(1)",
    "a b",
    "",
    "x\x00y",
    "é",
]
_HOSTILE = st.one_of(st.sampled_from(HOSTILE), st.text(string.printable, max_size=12))


def _set(path: str):
    """A setter of one spec field (dotted through nested dataclasses / first tuple items)."""

    def apply(spec, value):
        def go(obj, parts):
            head, *rest = parts
            if isinstance(obj, tuple):
                first = go(obj[0], parts) if obj else obj
                return (first, *obj[1:])
            if not rest:
                return dataclasses.replace(obj, **{head: value})
            return dataclasses.replace(obj, **{head: go(getattr(obj, head), rest)})

        return go(spec, path.split("."))

    return apply


def llama_with_buffers_and_attrs() -> DescriptorSpec:
    base = base_spec()
    assert base.rebuilt_buffers, "llama's rotary buffers are rebuilt"
    # every optional part present, so that a field set to a valid identifier (text_config_attr
    # "A") changes no structure and only hostile text can
    return dataclasses.replace(
        base,
        dummy_block=DummyBlock(True, ("attention_type",)),
        config_variants=(ConfigVariant("extra_norm", "attention", "use_extra_norm", True),),
        text_config_attr="text_config",
    )


FIELDS = [
    "model_type",
    "package",
    "class_name",
    "transformers_version",
    "modeling_module",
    "layer_stack",
    "layer_stack_at",
    "input_embedding",
    "output_embedding",
    "final_norm",
    "final_norm_at",
    "text_config_attr",
    "kinds.layout",
    "kinds.label",
    "kinds.children",
    "num_layers_field",
    "code_origin",
    "source_argument",
    "config_class.name",
    "causal_lm_class.name",
    "decoder_layer_classes.name",
    "decoder_layer_classes.module",
    "kinds.attention.replacements.attr",
    "kinds.attention.replacements.replacement",
    "kinds.attention.joins",
    "overrides.config_field",
    "overrides.block_config_attr",
    "overrides.read_at",
    "overrides.with_flag",
    "rebuilt_buffers.module",
    "rebuilt_buffers.buffers",
    "rebuilt_buffers.init_class",
    "config_variants.module",
    "config_variants.group",
    "config_variants.flag",
    "dummy_block.attributes",
    "predicates.embeddings",
    "predicates.layer_prefix",
    "predicates.attention",
]


@SETTINGS
@given(st.sampled_from(FIELDS), _HOSTILE)
def test_hostile_strings_are_refused_or_stay_literals(field, hostile):
    refused_or_literal(field, hostile)


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_refuses_each_known_hostile_string(field):
    for hostile in HOSTILE:
        refused_or_literal(field, hostile)


def refused_or_literal(field: str, hostile: str) -> None:
    base = llama_with_buffers_and_attrs()
    value = hostile
    leaf = field.split(".")[-1]
    if (
        leaf in ("joins", "buffers", "attributes", "embeddings", "attention", "children")
        and field != "attention"
    ):
        value = (hostile,)
    spec = _set(field)(base, value)
    try:
        source = render.render_descriptor(spec, out=hostile if field == "source_argument" else None)
    except PuzzleGenError:
        return  # refused: fine
    # Rendered: it must have exactly the structure of the clean descriptor, the hostile text
    # present only inside literals/comments, and compile.
    clean = render.render_descriptor(base)
    assert shape(source) == shape(clean), field
    compile(source, "<descriptor>", "exec")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and hostile and node.id == hostile:
            assert hostile.isidentifier()


def test_spec_from_json_with_an_injected_class_name_is_refused():
    text = (
        base_spec()
        .to_json()
        .replace(
            '"class_name": "LlamaModelDescriptor"',
            '"class_name": "X(ModelDescriptor):\\n    pass\\nimport os\\nclass Y"',
        )
    )
    spec = DescriptorSpec.from_json(text)
    with pytest.raises(PuzzleGenError, match="refusing to render the class name"):
        render.render_descriptor(spec)


def test_imported_class_names_may_not_shadow_builtins_or_template_names():
    base = base_spec()
    for name in ("range", "re", "Same", "dict"):
        spec = dataclasses.replace(
            base,
            decoder_layer_classes=(ClassRef("transformers.models.llama.modeling_llama", name),),
        )
        with pytest.raises(PuzzleGenError, match="shadow"):
            render.render_descriptor(spec)


def test_checkpoint_paths_are_quoted_in_the_regenerate_line():
    spec = dataclasses.replace(base_spec(), source_argument="/tmp/my ckpt/'x'$(rm -rf ~)")
    source = render.render_descriptor(spec)
    line = source.splitlines()[2]
    assert line == "# Regenerate: puzzle-gen generate '/tmp/my ckpt/'\"'\"'x'\"'\"'$(rm -rf ~)'"
    assert render.regenerate_target_from_line(line) == ("/tmp/my ckpt/'x'$(rm -rf ~)", False)
    with pytest.raises(PuzzleGenError, match="refusing"):
        render.render_descriptor(dataclasses.replace(spec, source_argument="/tmp/a\nimport os"))


def test_every_field_of_a_real_spec_passes_the_render_check():
    check_renderable(base_spec())  # the check refuses nothing inference really produces


@functools.lru_cache(maxsize=None)
def olmo_hybrid_spec() -> DescriptorSpec:
    spec = infer("olmo_hybrid")
    assert spec.predicates.by_kind and spec.predicates.kind_children
    return spec


@pytest.mark.parametrize(
    "field",
    [
        "predicates.by_kind",
        "predicates.kind_children.label",
        "predicates.kind_children.attention",
        "predicates.kind_children.ffn",
    ],
)
def test_the_layer_kind_table_refuses_hostile_strings_or_keeps_them_literal(field):
    """The table get_weight_groups tells layer kinds by (OLMo-hybrid's) is rendered from the
    spec: child names as string literals, kind labels as comments."""
    base = olmo_hybrid_spec()
    clean = render.render_descriptor(base)
    for hostile in HOSTILE:
        value = hostile if field.endswith("label") else (hostile,)
        spec = _set(field)(base, value)
        try:
            source = render.render_descriptor(spec)
        except PuzzleGenError:
            continue
        assert shape(source) == shape(clean), (field, hostile)
        compile(source, "<descriptor>", "exec")
