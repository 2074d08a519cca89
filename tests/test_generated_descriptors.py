"""Every committed descriptor under generated/, verified by the oracle of `puzzle-gen verify`.

One test id per model type and check: the checks are generator.verify's own (one
implementation for the command and the suite), each comparing the descriptor with transformers'
own model built unpatched from the same tiny config. The tests after them cover what `verify`
does not: the package table, the factory, and names as save_pretrained writes them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import generated
from generator import coverage
from generator.source import resolve
from generator.verify import CHECKS, build, make_subject, run_check, save_sharded
from generator.verify.models import reference_model
from puzzletron_runtime import ModelDescriptorFactory

MODEL_TYPES = generated.available()
COVERAGE = coverage.load(Path(generated.__file__).parent)
_SUBJECTS = {}


def subject(model_type):
    """The verification subject of a model type, built once per session (its reference model
    is shared by all checks of that type)."""
    if model_type not in _SUBJECTS:
        descriptor = generated.get_descriptor(model_type)
        _SUBJECTS[model_type] = make_subject(descriptor, resolve(model_type).config_cls)
    return _SUBJECTS[model_type]


# every test of one model type runs on one xdist worker, which builds its subject once
BY_TYPE = [pytest.param(t, marks=pytest.mark.xdist_group(f"type-{t}"), id=t) for t in MODEL_TYPES]


@pytest.mark.parametrize("check", CHECKS, ids=[c.name.replace(" ", "_") for c in CHECKS])
@pytest.mark.parametrize("model_type", BY_TYPE)
def test_verify(model_type, check):
    """COVERAGE.md's claim about the type holds: every check passes for a verified (or not yet
    verified) type; for a type recorded as failing, the recorded check still fails."""
    row = COVERAGE.get(model_type)
    result = run_check(subject(model_type), check)
    if row is not None and row.status == coverage.FAILING and check.name in row.failed_checks:
        assert not result.ok, f"{model_type} is recorded as failing {check.name!r}, but passes it"
    else:
        assert result.ok, f"{model_type}: {check.name}: {result.detail}"


def test_every_generated_type_has_a_verification_result():
    missing = [t for t in MODEL_TYPES if t not in COVERAGE or not COVERAGE[t].verified_or_failing]
    assert not missing, f"run `puzzle-gen verify --all`: no result recorded for {missing}"


def test_the_four_families_are_generated():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(MODEL_TYPES)


def test_import_generated_imports_no_modeling_module():
    code = (
        "import sys, generated; "
        "print(sorted(m for m in sys.modules if '.modeling_' in m)); "
        "print(generated.available())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"
    assert "llama" in lines[1]


def test_unknown_model_type_lists_available():
    with pytest.raises(KeyError, match="available: .*llama"):
        generated.get_descriptor("not_a_model")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_registered_in_the_factory(model_type):
    descriptor = generated.get_descriptor(model_type)  # importing it registers it
    assert ModelDescriptorFactory.get(model_type) is descriptor


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_checkpoint_names_partition(model_type, tmp_path):
    """The names transformers' save_pretrained writes (not only the module names)."""
    s = subject(model_type)
    config = s.tied_config or s.config  # DBRX's config refuses tied embeddings
    save_sharded(reference_model(config), tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = list(index["weight_map"])
    n = config.get_text_config().num_hidden_layers
    predicates = s.descriptor.layer_name_predicates(n)
    hits = {name: [g for g, p in predicates.items() if p.match(name)] for name in names}
    assert all(len(h) == 1 for h in hits.values()), {k: h for k, h in hits.items() if len(h) != 1}
    grouped = s.descriptor.get_weight_groups(names, n)
    assert sorted(x for v in grouped.values() for x in v) == sorted(names)


@pytest.mark.parametrize("model_type", BY_TYPE)
def test_a_both_no_op_layer_has_no_subblock_weights(model_type):
    if COVERAGE.get(model_type) and COVERAGE[model_type].status == coverage.FAILING:
        pytest.skip("recorded as failing a check: its no-ops are not claimed to work")
    s = subject(model_type)
    blocks = s.reference.own_block_configs()
    blocks[1] = {"attention": {"no_op": True}, "ffn": {"no_op": True}}
    model = build(s.descriptor, s.config, blocks, device="meta")
    roles = s.reference.roles(1)
    left = {n for n, _ in model.get_submodule(s.descriptor.layer_block_name(1)).named_parameters()}
    # parameters of the layer module itself (Doge's residual scales) are neither subblock's:
    # they stay, as the no-op check confirms; every child left must be a shared module
    assert {n.split(".")[0] for n in left if "." in n} <= set(roles.shared)
