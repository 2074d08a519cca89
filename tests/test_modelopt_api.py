"""Generated Model Optimizer descriptors, proven with Model Optimizer itself.

Runs in the Model Optimizer environment (`make test-modelopt`: nvidia-modelopt 0.47 and a
transformers inside its range); skipped where modelopt is not importable. For every type the
default target verifies (generated/coverage.json) that this transformers knows, the descriptor
and converter are generated here, under this environment's transformers, into a temporary
directory as `--layout modelopt-tree` writes them, and imported as a subpackage of Model
Optimizer's own `anymodel.models` (so their relative imports resolve as in a pull request).
"""

import atexit
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

anymodel = pytest.importorskip("modelopt.torch.puzzletron.anymodel")

from modelopt.torch.puzzletron.anymodel import convert_model  # noqa: E402
from modelopt.torch.puzzletron.anymodel.converter import Converter, ConverterFactory  # noqa: E402
from modelopt.torch.puzzletron.anymodel.model_descriptor import (  # noqa: E402
    ModelDescriptor,
    ModelDescriptorFactory,
)
from modelopt.torch.puzzletron.anymodel.puzzformer import deci_x_patcher  # noqa: E402
from modelopt.torch.puzzletron.block_config import BlockConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from generator import modelopt  # noqa: E402
from generator.cli import main  # noqa: E402
from generator.errors import InferenceError  # noqa: E402
from generator.infer import infer  # noqa: E402
from generator.probe import build_model, quiet_transformers  # noqa: E402
from generator.source import known_model_types, resolve  # noqa: E402
from generator.tiny import default_config, tiny_config  # noqa: E402

pytestmark = pytest.mark.modelopt

ROOT = Path(__file__).resolve().parent.parent
_COVERAGE = json.loads((ROOT / "generated" / "coverage.json").read_text())["types"]
VERIFIED = sorted(t for t, row in _COVERAGE.items() if row["status"] == "verified")
KNOWN = set(known_model_types())
MODEL_TYPES = [t for t in VERIFIED if t in KNOWN]
# `make test-modelopt MO_TYPES="llama gpt2"`: a sample (CI's), never a type outside the verified
_SAMPLE = os.environ.get("PUZZLE_GEN_MO_TYPES", "").split()
if _SAMPLE:
    assert set(_SAMPLE) <= set(MODEL_TYPES), sorted(set(_SAMPLE) - set(MODEL_TYPES))
    MODEL_TYPES = [t for t in MODEL_TYPES if t in _SAMPLE]
BY_TYPE = [pytest.param(t, marks=pytest.mark.xdist_group(f"mo-{t}"), id=t) for t in MODEL_TYPES]
if not _SAMPLE:  # verified types this transformers does not have: reported as skips
    BY_TYPE += [
        pytest.param(t, marks=pytest.mark.skip(reason="not in this transformers"), id=t)
        for t in VERIFIED
        if t not in KNOWN
    ]
# the hand-written Model Optimizer descriptor of the same model (the name it registers under)
# MoE types whose experts Model Optimizer's expert removal cannot rank or cut under this
# transformers, each with the reason the generated pruning_mixins docstring gives
NO_EXPERT_REMOVAL = {
    # a (1, experts) score-correction bias below the router: sliced by the first dimension
    "ernie4_5_moe": "has the experts along dimension 1, and Model Optimizer's expert removal",
    # transformers 5.14's Granite routers return (top_k_index, top_k_weights, router_logits): the
    # voting hooks read the first output as the logits (5.23's return the logits first)
    "granitemoe": "read its input and output one logit per expert, not one router",
    "granitemoehybrid": "read its input and output one logit per expert, not one router",
    "granitemoeshared": "read its input and output one logit per expert, not one router",
}
HAND_WRITTEN = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral_small"}
# what Model Optimizer registered before any generated module was imported
REGISTERED_BEFORE = (set(ModelDescriptorFactory.CLASS_MAPPING), set(ConverterFactory.CLASS_MAPPING))
PACKAGE = "modelopt.torch.puzzletron.anymodel.models"
OUT = Path(tempfile.mkdtemp(prefix="modelopt-tree-"))
atexit.register(shutil.rmtree, OUT, True)


@lru_cache(maxsize=None)
def tree(model_type):
    """Generate `model_type` for Model Optimizer (tree layout) and import it the way a pull
    request's `from .<name> import *` in models/__init__.py would."""
    if sub_config_overrides(model_type):
        # DBRX: Model Optimizer's patcher (config.update) cannot set a sub-config's field;
        # tests/test_modelopt_target.py checks that generate refuses it with that reason
        pytest.skip("its overrides set sub-config fields: no Model Optimizer descriptor")
    args = ["generate", model_type, "--target", "modelopt", "--layout", "modelopt-tree"]
    if main([*args, "--out", str(OUT)]) != 0:
        broken = own_forward_fails(model_type)
        assert broken, f"{model_type}: generate fails under this transformers"
        pytest.skip(f"transformers {transformers.__version__}: {broken}")
    names = modelopt.names_for(spec_of(model_type), "modelopt")
    name, path = names.registration, OUT / "models" / names.package
    qualified = f"{PACKAGE}.{names.package}"
    spec = importlib.util.spec_from_file_location(
        qualified, path / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    has_converter = (path / f"{names.package}_converter.py").exists()
    return SimpleNamespace(
        name=name,
        path=path,
        module=module,
        descriptor=ModelDescriptorFactory.get(name),
        converter=ConverterFactory.get(name) if has_converter else None,
    )


def sub_config_overrides(model_type) -> bool:
    """Whether the descriptor's overrides set a sub-config's field (False where inference
    itself fails under this transformers: generate then says why)."""
    try:
        return any("." in o.config_field for o in spec_of(model_type).overrides)
    except InferenceError:
        return False


def converted(model_type):
    """The tree of a type with a converter (a type whose layers no block config describes is
    skipped with the reason generate printed; tests/test_modelopt_target.py checks it)."""
    t = tree(model_type)
    if t.converter is None:
        pytest.skip("no converter: a layer kind no block config describes")
    return t


def kind_of(model_type, layer):
    spec = spec_of(model_type)
    (kind,) = [k for k in spec.kinds if modelopt.kind_holds(spec, k, layer)]
    return kind


@lru_cache(maxsize=None)
def own_forward_fails(model_type) -> str | None:
    """Why a forward of the type's tiny model fails in this transformers (the generator traces
    one), or None. NemotronH in 5.14.1: its DynamicCache has no layer type for MLP layers."""
    config = tiny(model_type)
    model = tiny_model(model_type, config).eval()
    try:
        with torch.no_grad():
            model(input_ids=ids_for(config))
    except Exception as exc:
        return f"the tiny model's own forward raises {type(exc).__name__}: {exc}"
    return None


@lru_cache(maxsize=None)
def spec_of(model_type):
    return infer(model_type)


def tiny(model_type, **extra):
    with quiet_transformers():
        return tiny_config(resolve(model_type).config_cls, **extra)


def tiny_model(model_type, config):
    torch.manual_seed(0)
    return build_model(resolve(model_type).causal_lm_cls, config, "cpu")


def ids_for(config):
    vocab = config.get_text_config().vocab_size
    return torch.arange(36).reshape(3, 12) % vocab  # batch 3: a forgotten tuple cannot hide


def first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def test_the_registration_rule_knows_every_name_model_optimizer_registers():
    descriptors, converters = REGISTERED_BEFORE
    assert descriptors == converters == set(modelopt.MODELOPT_REGISTERED)


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_module_imports_subclasses_and_registers(model_type):
    t = tree(model_type)
    assert isinstance(t.descriptor, type) and issubclass(t.descriptor, ModelDescriptor)
    if t.converter is not None:
        assert isinstance(t.converter, type) and issubclass(t.converter, Converter)
    assert t.name not in REGISTERED_BEFORE[0]  # never one of Model Optimizer's own names
    assert t.descriptor.__module__.startswith(f"{PACKAGE}.{t.path.name}.")
    assert t.descriptor.mlp_no_op_supported() and t.descriptor.attn_no_op_supported()
    assert set(t.descriptor.pruning_mixins()) <= {"ffn_intermediate", "kv_heads", "experts_removal"}
    # a drop-in file: Model Optimizer (relative imports), transformers and torch only
    for path in t.path.glob("*.py"):
        imported = re.findall(r"^(?:from|import) (\S+)", path.read_text(), re.M)
        assert {m.split(".")[0] for m in imported} <= {
            "",
            "copy",  # a converter of several layer kinds builds a deep copy of the config
            "re",
            "typing",
            "dataclasses",
            "torch",
            "transformers",
        }, path


def test_package_layout_imports_with_absolute_imports(tmp_path):
    """`--target modelopt` without the tree layout: a package importing modelopt absolutely."""
    assert main(["generate", "qwen3", "--target", "modelopt", "--out", str(tmp_path)]) == 0
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import qwen3_generated as m\n"
        "from modelopt.torch.puzzletron.anymodel.converter import ConverterFactory\n"
        "from modelopt.torch.puzzletron.anymodel.model_descriptor import ModelDescriptorFactory\n"
        "assert ModelDescriptorFactory.get('qwen3_generated') is m.Qwen3GeneratedModelDescriptor\n"
        "assert ConverterFactory.get('qwen3_generated') is m.Qwen3GeneratedConverter\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


# -- Model Optimizer's deci_x_patcher finds a layer's index by name in the calling frames -------


@lru_cache(maxsize=None)
def patcher_finds_the_index(model_type) -> bool:
    """Model Optimizer's patcher takes a layer's index from the first variable named layer_idx
    or idx up the stack of the layer's construction. Whether there is one is read here while
    transformers builds the tiny model (no patcher): at each decoder layer's construction, the
    frames that call it are searched for such a variable."""
    import inspect

    classes = converted(model_type).descriptor.decoder_layer_cls()
    classes = classes if isinstance(classes, list) else [classes]
    originals = {cls: cls.__init__ for cls in classes}
    found = []

    def watch(original):
        def init(self, *args, **kwargs):
            frame = inspect.currentframe().f_back
            names = set()
            while frame is not None:
                names |= set(frame.f_locals)
                frame = frame.f_back
            found.append(bool(names & {"layer_idx", "idx"}))
            original(self, *args, **kwargs)

        return init

    for cls, original in originals.items():
        cls.__init__ = watch(original)
    try:
        build_model(resolve(model_type).causal_lm_cls, tiny(model_type), "meta")
    finally:
        for cls, original in originals.items():
            cls.__init__ = original
    return bool(found) and all(found)


def expect_patcher(model_type):
    """A context: Model Optimizer's own patcher either works, or fails exactly where the
    modeling code names its loop variable otherwise (a Model Optimizer limit, not ours)."""
    if patcher_finds_the_index(model_type):
        return _nothing()
    return pytest.raises(RuntimeError, match=r"\['layer_idx', 'idx'\] not found in caller stack")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _load_converted(descriptor, out_dir, unplaced=None):
    """Load a converted checkpoint as Model Optimizer's sharded loader does for one rank owning
    every block: built on the meta device (its init_model_from_config: the class the config's
    architectures name) through its deci_x_patcher with the block configs of config.json, the subblock tensors assigned, tied weights re-tied, then the buffers rebuilt
    through the descriptor's init_rotary_embedding."""
    from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import init_model_from_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out_dir)
    block_configs = config.block_configs
    with quiet_transformers():
        with deci_x_patcher(descriptor, block_configs), torch.device("meta"):
            # the class config.architectures names, as Model Optimizer's sharded loader builds
            model = init_model_from_config(config)
    index = json.loads((Path(out_dir) / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(Path(out_dir) / file)))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta and unplaced is not None:  # the caller wants the tensors left unfilled
        unplaced.extend(on_meta)
        return None, block_configs, index
    assert not on_meta, on_meta
    descriptor.init_rotary_embedding(model, SimpleNamespace(device=torch.device("cpu")))
    assert not [n for n, b in model.named_buffers() if b.is_meta]
    return model.eval(), block_configs, index


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", BY_TYPE)
def test_convert_model_round_trip_gives_the_original_logits(model_type, tie, tmp_path):
    """Model Optimizer's own convert_model with our descriptor and converter, loaded back
    through its deci_x_patcher (buffers rebuilt by the descriptor's inline helper): the
    original model's logits, bit for bit."""
    t = converted(model_type)
    config = tiny(model_type, tie_word_embeddings=tie)
    # a copy: save_pretrained writes into the model's config (transformers 5.14 leaves its dtype
    # a string, which Apertus's xIELU activation cannot take when the config builds again)
    original = tiny_model(model_type, copy.deepcopy(config)).eval()
    original.save_pretrained(tmp_path / "hf")
    convert_model(str(tmp_path / "hf"), str(tmp_path / "anymodel"), converter=t.name)
    converted_dir = tmp_path / "anymodel"
    block_configs = json.loads((converted_dir / "config.json").read_text())["block_configs"]
    assert block_configs == t.converter.create_block_configs_from_main_config(config)
    index = json.loads((converted_dir / "model.safetensors.index.json").read_text())
    groups = {Path(f).stem for f in index["weight_map"].values()}
    # a group per subblock a layer has (its block config says which), the vision tower's own
    expected = {"embeddings", "lm_head"} | {
        f"block_{i}_{kind}"
        for i, block in enumerate(block_configs)
        for kind in ("attention", "ffn")
        if not block[kind]["no_op"]
    }
    if spec_of(model_type).predicates.encoders:
        expected.add("vision_encoding")
    if tie and "lm_head" not in groups:  # tied head, weightless final norm (OLMo): no tensor
        expected.discard("lm_head")
    assert groups == expected
    # Model Optimizer's loader assigns the checkpoint's tensors by name; convert_model keeps the
    # names save_pretrained wrote, and transformers writes some under legacy names (Qwen3-Next's
    # per-expert experts.N.gate_proj for the module's fused experts.gate_up_proj). Those the
    # loader cannot place: exactly the module tensors the checkpoint does not name.
    unnamed = set(tiny_model(model_type, config).state_dict()) - set(index["weight_map"])
    left = []
    with expect_patcher(model_type):
        model, _, _ = _load_converted(t.descriptor, converted_dir, unplaced=left)
    if not patcher_finds_the_index(model_type):
        return
    if left:
        assert set(left) <= unnamed, sorted(set(left) - unnamed)
        return
    with torch.no_grad():
        expected = original(input_ids=ids_for(config)).logits
        got = model(input_ids=ids_for(config)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _overridden(model_type):
    """{block-config size: config field} the descriptor overrides."""
    return {o.block_config_attr: o.config_field for o in spec_of(model_type).overrides}


def _leaf(block, size):
    node = block
    for part in size.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def _set(block, size, value):
    node = block
    *parents, last = size.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_patcher_builds_heterogeneous_block_configs(model_type):
    """Model Optimizer's deci_x_patcher with a list of its own BlockConfigs: no-op subblocks
    drop their tensors, a layer of both no-ops is an identity, and a layer with other sizes
    (for each size the descriptor overrides that its block holds) has the shapes transformers
    builds from a config with those sizes."""
    from generator.overrides import _fewer_heads, _other_size

    t = converted(model_type)
    config = tiny(model_type)
    text = config.get_text_config()
    base = t.converter.create_block_configs_from_main_config(config)
    assert len(base) >= 4
    blocks = json.loads(json.dumps(base))
    # layer 0: its first subblock a no-op; layer 1: its last; layer 3: both
    for i, which in ((0, ("attention", "ffn")), (1, ("ffn", "attention"))):
        kind = next(k for k in which if not base[i][k]["no_op"])
        blocks[i][kind] = {"no_op": True}
    blocks[3] = {"attention": {"no_op": True}, "ffn": {"no_op": True}}
    reference_fields = {}
    for size, field in _overridden(model_type).items():
        current = _leaf(base[2], size)
        if current is None or size == "ffn.moe.num_experts_per_tok":
            continue
        if size == "attention.num_key_value_heads":
            value = _fewer_heads(current, text)
        elif size == "ffn.moe.num_local_experts":
            value = current + 2
        else:
            value = _other_size(current, text)
        _set(blocks[2], size, value)
        reference_fields[field] = value
    blocks = [BlockConfig(**b) for b in blocks]
    with expect_patcher(model_type):
        with deci_x_patcher(t.descriptor, blocks):
            model = tiny_model(model_type, config).eval()
    if not patcher_finds_the_index(model_type):
        return
    names = list(model.state_dict())
    groups = t.descriptor.get_weight_groups(names, text.num_hidden_layers)
    original = tiny_model(model_type, config)

    def has(layer, which):  # a tensor of the subblock's core modules is left in that layer
        kind = kind_of(model_type, original.get_submodule(t.descriptor.layer_block_name(layer)))
        prefix = t.descriptor.layer_block_name(layer)
        cores = modelopt.kind_cores(kind, which)
        return any(n.startswith(f"{prefix}.{c}.") for n in names for c in cores)

    for i in (0, 1):
        for which in ("attention", "ffn"):
            emptied = getattr(blocks[i], which).no_op and not base[i][which]["no_op"]
            if emptied:
                assert not has(i, which), (i, which)
            elif not base[i][which]["no_op"]:
                assert has(i, which), (i, which)
    assert not has(3, "attention") and not has(3, "ffn")
    assert "block_3_ffn" not in groups
    # the fields set on the built config, as a per-layer override sets them: a config class
    # that validates its fields together (GraniteMoE-Hybrid: the Mamba heads must divide the
    # inner width) refuses one changed alone in its constructor, not on the built config
    reference_config = tiny(model_type)
    for field, value in reference_fields.items():
        setattr(reference_config.get_text_config(), field, value)
    reference = tiny_model(model_type, reference_config)
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    state = model.state_dict()
    for name in groups.get("block_2_attention", []) + groups.get("block_2_ffn", []):
        assert state[name].shape == ref_shapes[name], name
    # the identity of layer 3 in a forward; layer 2 back at its own sizes (every size changed
    # at once need not be a combination the model's forward accepts: Qwen3-Next's value heads
    # must stay a multiple of its key heads)
    plain = [*blocks[:2], BlockConfig(**base[2]), *blocks[3:]]
    with deci_x_patcher(t.descriptor, plain):
        model = tiny_model(model_type, config).eval()
    seen = {}
    layer = model.get_submodule(t.descriptor.layer_block_name(3))
    hook = layer.register_forward_hook(
        lambda _m, args, kwargs, out: seen.update(
            x=args[0] if args else kwargs["hidden_states"], y=out
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=ids_for(config))
    hook.remove()
    assert torch.equal(first(seen["y"]), seen["x"])


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_dummy_blocks_pass_the_hidden_states_through_the_model_loop(model_type):
    """Every layer replaced by the descriptor's create_dummy_block (what Model Optimizer's
    sharded loader does with the layers another rank owns): the model loop runs, and what
    reaches the final norm (or the head) is what entered the first layer."""
    t = tree(model_type)
    config = tiny(model_type)
    model = tiny_model(model_type, config).eval()
    n = config.get_text_config().num_hidden_layers
    stack = model.get_submodule(t.descriptor.layer_block_name(0).rpartition(".")[0])
    for i in range(n):
        stack[i] = t.descriptor.create_dummy_block(stack[i], i)
    after = t.descriptor.final_norm_name() or t.descriptor.output_embedding_name()
    seen = {}

    def entered(_m, args, kwargs):
        seen.setdefault("in", args[0] if args else kwargs["hidden_states"])

    def left(_m, args):  # its last call: NanoChat runs the same norm before the loop too
        seen["out"] = args[0]

    hooks = [
        stack[0].register_forward_pre_hook(entered, with_kwargs=True),
        model.get_submodule(after).register_forward_pre_hook(left),
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids_for(config))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(seen["out"], seen["in"])


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_pruning_layer_descriptors_address_the_model(model_type):
    """Model Optimizer's mixins find what our layer descriptors name: its hook targets are the
    output projection (the router, for experts) of every layer that has the subblock, and every
    weight it slices exists with the sliced width."""
    t = converted(model_type)
    config = tiny(model_type)
    text = config.get_text_config()
    model = tiny_model(model_type, config)
    state = model.state_dict()
    mixins = t.descriptor.pruning_mixins()
    blocks = t.converter.create_block_configs_from_main_config(config)
    n = text.num_hidden_layers
    holding = {}
    for key, mixin in mixins.items():
        hooked = mixin.get_module_names_to_hook(model)
        suffix = mixin.layer_descriptor.module_name_regex()
        present = []
        for i in range(n):
            try:
                model.get_submodule(f"{t.descriptor.layer_block_name(i)}.{suffix}")
                present.append(i)
            except AttributeError:
                continue
        assert present and hooked == [
            (i, f"{t.descriptor.layer_block_name(i)}.{suffix}") for i in present
        ], key
        holding[key] = present
    if "ffn_intermediate" in mixins:
        ffn = mixins["ffn_intermediate"].layer_descriptor
        down = ffn.down_proj_name.rsplit(".", 1)[-1]
        for i in holding["ffn_intermediate"]:
            width = blocks[i]["ffn"]["intermediate_size"]
            for name in ffn.linear_weight_names:
                weight = state[f"{ffn.ffn_prefix(i)}.{name}.weight"]
                assert weight.shape[1 if name == down else 0] == width
    if "kv_heads" in mixins:
        kv = mixins["kv_heads"].layer_descriptor
        for i in holding["kv_heads"]:
            q, k, v, o = (state[f"{kv.attn_prefix(i)}.{p}.weight"] for p in kv.qkvo_weight_names)
            head_dim = q.shape[0] // text.num_attention_heads
            kv_heads = blocks[i]["attention"]["num_key_value_heads"]
            assert k.shape[0] == v.shape[0] == kv_heads * head_dim
            assert o.shape[1] == q.shape[0]
    if "experts_removal" in mixins:
        assert holding["experts_removal"] == [
            i for i, b in enumerate(blocks) if not b["ffn"]["no_op"] and b["ffn"].get("moe")
        ]


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_expert_removal_with_model_optimizers_mixin(model_type, tmp_path):
    """Model Optimizer's expert removal, driven by our layer descriptor, on one MoE layer: its
    voting hook ranks every expert from the router we name; the pruned tensors it returns are
    every tensor of that layer whose shape a block config with one expert fewer changes (found
    here by comparing the two models, not from the descriptor), each the original's rows of the
    experts it keeps; and the layer so built loads them."""
    from modelopt.torch.prune.importance_hooks.expert_removal_hooks import RankedChoiceVotingHook

    t = converted(model_type)
    if not any(o.block_config_attr.startswith("ffn.moe.") for o in spec_of(model_type).overrides):
        pytest.skip("no experts")
    mixins = t.descriptor.pruning_mixins()
    if model_type in NO_EXPERT_REMOVAL:  # the refusal, with its reason, in the docstring
        assert "experts_removal" not in mixins
        assert NO_EXPERT_REMOVAL[model_type] in " ".join(
            t.descriptor.pruning_mixins.__doc__.split()
        )
        return
    assert "experts_removal" in mixins, t.descriptor.pruning_mixins.__doc__
    mixin = mixins["experts_removal"]
    config = tiny(model_type)
    parent = tiny_model(model_type, config).eval()
    parent_state = parent.state_dict()
    base = t.converter.create_block_configs_from_main_config(config)
    layer = next(i for i, b in enumerate(base) if not b["ffn"]["no_op"] and b["ffn"].get("moe"))
    moe = base[layer]["ffn"]["moe"]
    experts = moe["num_local_experts"]
    # the voting hook on the module we name ranks all the experts
    (target,) = [m for i, m in mixin.get_module_names_to_hook(parent) if i == layer]
    router = parent.get_submodule(target)
    hook = RankedChoiceVotingHook(router, {"block_config": BlockConfig(**base[layer])})
    handle = router.register_forward_hook(hook)
    with torch.no_grad():
        parent(input_ids=ids_for(config))
    handle.remove()
    assert sorted(hook.to_dict()["expert_ranks"].tolist()) == list(range(experts))
    # one expert fewer in that layer
    child_blocks = json.loads(json.dumps(base))
    child_moe = child_blocks[layer]["ffn"]["moe"]
    child_moe["num_local_experts"] = experts - 1
    child_moe["num_experts_per_tok"] = min(moe["num_experts_per_tok"], experts - 1)
    with expect_patcher(model_type):
        with deci_x_patcher(t.descriptor, [BlockConfig(**b) for b in child_blocks]):
            child = tiny_model(model_type, config)
    if not patcher_finds_the_index(model_type):
        return
    child_state = child.state_dict()
    resized = {
        k
        for k in child_state
        if k not in parent_state or child_state[k].shape != parent_state[k].shape
    }
    assert resized and all(
        k.startswith(t.descriptor.layer_block_name(layer) + ".") for k in resized
    )
    scores = [(7 * e) % experts + 0.5 for e in range(experts)]  # distinct
    kept = sorted(range(experts), key=lambda e: scores[e], reverse=True)[: experts - 1]
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    out = mixin.prune_single_layer(
        layer_idx=layer,
        parent_state_dict=parent_state,
        new_state_dict=child_state,
        original_config=SimpleNamespace(block_configs=[BlockConfig(**b) for b in base]),
        new_config=SimpleNamespace(block_configs=[BlockConfig(**b) for b in child_blocks]),
        mlp_init_mode="ExpertRemoval",
        mlp_init_config={"expert_scores_file": str(tmp_path / "scores.json")},
        keys=dict.fromkeys(parent_state),
    )
    assert resized <= set(out)
    for k, tensor in out.items():
        assert tensor.shape == child_state[k].shape, k
        if k in parent_state and parent_state[k].shape[:1] == (experts,):  # fused / router
            assert torch.equal(tensor, parent_state[k][kept]), k
        else:  # per expert: experts.{j}.x holds the original experts.{kept[j]}.x
            prefix = mixin.layer_descriptor.moe_prefix(layer)
            rest = k[len(prefix) :]
            j = int(re.search(r"\.(\d+)\.", rest).group(1))
            source = prefix + rest.replace(f".{j}.", f".{kept[j]}.", 1)
            assert torch.equal(tensor, parent_state[source]), k
    child.load_state_dict({**child_state, **out}, strict=True)


# -- against Model Optimizer's hand-written descriptors ------------------------------------


def _names(model_type, config, device):
    return list(build_model(resolve(model_type).causal_lm_cls, config, device).state_dict())


def _fields(obj):
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def theirs_of(name):
    """Model Optimizer's hand-written descriptor and converter registered as `name`."""
    return SimpleNamespace(
        descriptor=ModelDescriptorFactory.get(name), converter=ConverterFactory.get(name)
    )


def theirs(model_type):
    return theirs_of(HAND_WRITTEN[model_type])


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_equal_to_model_optimizers_hand_written_descriptor(model_type):
    ours, hand = tree(model_type), theirs(model_type)
    assert ours.descriptor is not hand.descriptor
    for method in ("input_embedding_name", "output_embedding_name", "final_norm_name"):
        assert getattr(ours.descriptor, method)() == getattr(hand.descriptor, method)(), method
    assert ours.descriptor.layer_block_name(7) == hand.descriptor.layer_block_name(7)
    assert ours.descriptor.decoder_layer_cls() is hand.descriptor.decoder_layer_cls()
    with quiet_transformers():
        default = default_config(resolve(model_type).config_cls)
    for config, device in ((tiny(model_type), "cpu"), (default, "meta")):
        n = config.num_hidden_layers
        names = _names(model_type, config, device)
        mine = {k: sorted(v) for k, v in ours.descriptor.get_weight_groups(names, n).items()}
        their = {k: sorted(v) for k, v in hand.descriptor.get_weight_groups(names, n).items()}
        assert mine == their
        mine_blocks = ours.converter.create_block_configs_from_main_config(config)
        assert mine_blocks == hand.converter.create_block_configs_from_main_config(config)
        block = BlockConfig(**mine_blocks[0])
        assert ours.descriptor.block_config_to_layer_overrides(
            block
        ) == hand.descriptor.block_config_to_layer_overrides(block)
    # the no-op plans replace the same children by the same stand-ins
    layer_cls = ours.descriptor.decoder_layer_cls()
    config = tiny(model_type)
    for method in ("attn_no_op_post_init", "mlp_no_op_post_init"):
        a, b = layer_cls(config, 0), layer_cls(config, 0)
        getattr(ours.descriptor, method)(a)
        getattr(hand.descriptor, method)(b)
        assert {k: type(v) for k, v in a.named_children()} == {
            k: type(v) for k, v in b.named_children()
        }, method


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_rotary_rebuild_equals_model_optimizers(model_type):
    """Theirs constructs the rotary module anew; ours rebuilds every empty buffer through
    _init_weights: the same buffers."""
    ours, hand = tree(model_type), theirs(model_type)
    config = tiny(model_type)
    runtime = SimpleNamespace(device=torch.device("cpu"))
    models = []
    for descriptor in (ours.descriptor, hand.descriptor):
        model = build_model(resolve(model_type).causal_lm_cls, config, "meta")
        descriptor.init_rotary_embedding(model, runtime)
        models.append(dict(model.named_buffers()))
    mine, their = models
    names = [n for n in their if "inv_freq" in n]
    assert names
    for name in names:
        assert torch.equal(mine[name], their[name]), name


@pytest.mark.parametrize("model_type", sorted(HAND_WRITTEN))
def test_layer_descriptors_equal_model_optimizers(model_type):
    hand_module = sys.modules[theirs(model_type).descriptor.__module__]
    mixins = tree(model_type).descriptor.pruning_mixins()
    ours = {
        "FFNIntermediateLayerDescriptor": mixins["ffn_intermediate"].layer_descriptor,
        "KVHeadsLayerDescriptor": mixins["kv_heads"].layer_descriptor,
    }
    compared = 0
    for name, obj in vars(hand_module).items():
        for base, mine in ours.items():
            if isinstance(obj, type) and name.endswith(base) and name != base:
                assert _fields(obj()) == _fields(mine), name
                compared += 1
    assert compared >= 1  # Model Optimizer's qwen2 has an FFN descriptor only; ours adds KV


# -- gpt_oss and nemotron_h: compared with Model Optimizer's hand-written ones, on the same tiny
# models; where they differ, each difference is checked against transformers' own model


def _expert_widths(model, prefix):
    """{tensor: shape} of one layer's expert tensors."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_gpt_oss_equals_model_optimizers_except_where_theirs_misses_the_model():
    """Equal: names, decoder layer class, the weight partition (tiny and default-size names),
    KV-heads layer descriptor, router and fused expert tensors. Different, and theirs is what
    does not fit transformers' GptOss (checked, not assumed):
    - their converter reads `config.experts_per_token`, which GptOssConfig does not have;
    - their overrides write the expert width to `moe_intermediate_size`, which GptOss does not
      read: a block config with another expert width leaves its experts at the config's width,
      ours builds the requested one (the width of a config with that `intermediate_size`);
    - their expert-removal hooks look for a GptOssTopKRouter named `...mlp` (the router is
      `mlp.router`): they hook nothing; ours hooks each layer's router."""
    model_type = "gpt_oss"
    if model_type not in MODEL_TYPES:
        pytest.skip("gpt_oss is not verified in this run's sample")
    ours, hand = tree(model_type), theirs_of(model_type)
    for method in ("input_embedding_name", "output_embedding_name", "final_norm_name"):
        assert getattr(ours.descriptor, method)() == getattr(hand.descriptor, method)(), method
    assert ours.descriptor.layer_block_name(7) == hand.descriptor.layer_block_name(7)
    assert ours.descriptor.decoder_layer_cls() is hand.descriptor.decoder_layer_cls()
    with quiet_transformers():
        default = default_config(resolve(model_type).config_cls)
    config = tiny(model_type)
    for cfg, device in ((config, "cpu"), (default, "meta")):
        n = cfg.num_hidden_layers
        names = _names(model_type, cfg, device)
        mine = {k: sorted(v) for k, v in ours.descriptor.get_weight_groups(names, n).items()}
        their = {k: sorted(v) for k, v in hand.descriptor.get_weight_groups(names, n).items()}
        assert mine == their
    # their converter
    assert not hasattr(config, "experts_per_token")
    with pytest.raises(AttributeError, match="experts_per_token"):
        hand.converter.create_block_configs_from_main_config(config)
    # the expert width through each descriptor's overrides, against transformers' model
    blocks = ours.converter.create_block_configs_from_main_config(config)
    width = blocks[0]["ffn"]["moe"]["expert_intermediate_dim"]
    assert width == config.intermediate_size
    wider = json.loads(json.dumps(blocks))
    for b in wider:
        b["ffn"]["moe"]["expert_intermediate_dim"] = 2 * width
    wider = [BlockConfig(**b) for b in wider]
    prefix = f"{ours.descriptor.layer_block_name(0)}.mlp.experts."
    reference = _expert_widths(
        tiny_model(model_type, tiny(model_type, intermediate_size=2 * width)), prefix
    )
    original = _expert_widths(tiny_model(model_type, config), prefix)
    assert reference != original
    built = {}
    for who, descriptor in (("ours", ours.descriptor), ("theirs", hand.descriptor)):
        with deci_x_patcher(descriptor, wider):
            built[who] = _expert_widths(tiny_model(model_type, config), prefix)
    assert built["ours"] == reference
    assert built["theirs"] == original  # `moe_intermediate_size` is read by nothing
    assert "moe_intermediate_size" in hand.descriptor.block_config_to_layer_overrides(wider[0])
    # layer descriptors
    mine, their = ours.descriptor.pruning_mixins(), hand.descriptor.pruning_mixins()
    assert _fields(mine["kv_heads"].layer_descriptor) == _fields(their["kv_heads"].layer_descriptor)
    a, b = mine["experts_removal"].layer_descriptor, their["experts_removal"].layer_descriptor
    for f in ("moe_prefix_name", "router_weights", "router_biases", "is_fused_experts"):
        assert getattr(a, f) == getattr(b, f), f
    assert sorted(a.fused_expert_weights) == sorted(b.fused_expert_weights)
    model = tiny_model(model_type, config)
    n = config.num_hidden_layers
    assert their["experts_removal"].get_module_names_to_hook(model) == []
    assert mine["experts_removal"].get_module_names_to_hook(model) == [
        (i, f"{ours.descriptor.layer_block_name(i)}.mlp.router") for i in range(n)
    ]
    assert all(
        type(model.get_submodule(name)).__name__ == "GptOssTopKRouter"
        for _, name in mine["experts_removal"].get_module_names_to_hook(model)
    )


def _mixer_kind(mixer) -> str:
    """What a NemotronH layer's mixer computes, from its tensors (not its class name)."""
    names = {n for n, _ in mixer.named_parameters()}
    if "A_log" in names:
        return "mamba"
    if any(n.startswith("experts.") for n in names):
        return "moe"
    if any(n.startswith("q_proj") for n in names):
        return "attention"
    return "mlp"


def test_nemotron_h_differs_from_model_optimizers_and_why(tmp_path):
    """Model Optimizer's nemotron_h is written for the checkpoint's own code (trust_remote_code,
    layers under `backbone`); under this environment's transformers, with its built-in NemotronH
    (layers under `model`, checkpoints saved under the legacy `backbone` names):
    - the built-in model's own forward fails on a config with MLP layers (its cache has no layer
      type for them), so puzzle-gen, which traces a forward, generates nothing here and says so;
    - their decoder_layer_cls searches only the remote-code modules, so it raises;
    - their layer_block_name names `backbone.layers.N`, not a module of the built-in model;
    - their converter's kinds follow the pattern and agree with the built layers (checked);
    - their weight predicates do not cover an MLP layer's tensors (`mixer.up_proj`,
      `mixer.down_proj`): get_weight_groups raises on the checkpoint's names, and partitions
      the other layers' tensors."""
    model_type = "nemotron_h"
    if model_type not in KNOWN:
        pytest.skip("nemotron_h is not in this transformers")
    hand = theirs_of(model_type)
    config = tiny(model_type)
    if own_forward_fails(model_type) is None:
        pytest.fail("NemotronH's own forward works in this transformers: compare it like gpt_oss")
    assert main(["generate", model_type, "--target", "modelopt", "--out", str(tmp_path)]) != 0
    with pytest.raises(Exception):
        hand.descriptor.decoder_layer_cls()
    model = tiny_model(model_type, config)
    with pytest.raises(AttributeError):
        model.get_submodule(hand.descriptor.layer_block_name(0))
    stack = model.model.layers
    n = config.num_hidden_layers
    assert len(stack) == n
    kinds = [_mixer_kind(layer.mixer) for layer in stack]
    blocks = hand.converter.create_block_configs_from_main_config(config)
    assert len(blocks) == n
    for block, kind in zip(blocks, kinds):
        b = block if isinstance(block, dict) else block.to_dict()
        got = (
            "mamba" if b["attention"].get("mamba") else
            "attention" if not b["attention"]["no_op"] else
            "moe" if b["ffn"].get("moe") else "mlp"
        )  # fmt: skip
        assert got == kind
    assert "mlp" in kinds
    model.save_pretrained(tmp_path / "hf")
    index = tmp_path / "hf" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(index), "pt") as f:
        names = list(f.keys())
    mlp_layers = [i for i, k in enumerate(kinds) if k == "mlp"]
    mlp_tensors = [
        k for k in names for i in mlp_layers if k.startswith(f"backbone.layers.{i}.mixer.")
    ]
    assert mlp_tensors
    with pytest.raises(ValueError, match=re.escape(sorted(mlp_tensors)[0].rsplit(".", 2)[0])):
        hand.descriptor.get_weight_groups(sorted(names), n)
    # without the MLP layers (their norm too: alone in a group, their rule drops it), every
    # tensor is in exactly one group
    rest = [k for k in names if not any(k.startswith(f"backbone.layers.{i}.") for i in mlp_layers)]
    groups = hand.descriptor.get_weight_groups(rest, n)
    assert sorted(k for v in groups.values() for k in v) == sorted(rest)
