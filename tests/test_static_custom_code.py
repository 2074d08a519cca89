"""A checkpoint with its own code, generated WITHOUT --trust-remote-code: the code is parsed with
libcst and a static build stands in for the probe (generator/static_probe.py). Nothing of the
checkpoint's files is imported while generating (marker files prove it); the descriptor, once the
test imports the code with trust_remote_code, verifies against that very model; and a model whose
code the parse cannot decide stops with one line naming the fact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_fixtures import save_custom, save_ported

from generator import cli
from generator.spec import IMPORTED_ORIGIN, STATIC_ORIGIN, DescriptorSpec
from generator.static_probe import rendered_facts

REPO = Path(__file__).resolve().parent.parent
FIXTURES = {"ported": save_ported, "toy": save_custom}  # self-contained; subclasses transformers'
MODEL = {"ported": ("mini", "Mini", "modeling_mini"), "toy": ("toy_lm", "Toy", "modeling_toy")}


def _env(tmp: Path) -> dict:
    return {**os.environ, "HF_MODULES_CACHE": str(tmp / "hf_modules")}


def _run(tmp: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(tmp), capture_output=True, text=True
    )


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def generated(request, tmp_path_factory):
    """(checkpoint, marker dir, output dir, kind): generated without the flag, in this process."""
    tmp = tmp_path_factory.mktemp(request.param)
    marker = tmp / "marker"
    marker.mkdir()
    ckpt = FIXTURES[request.param](tmp / request.param, marker)
    out = tmp / "out"
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 0
    return ckpt, marker, out, request.param


def _descriptor_path(out: Path, kind: str) -> Path:
    model_type = MODEL[kind][0]
    return out / model_type / f"{model_type}_model_descriptor.py"


def test_generated_without_the_flag_and_nothing_imported(generated):
    ckpt, marker, out, kind = generated
    model_type, prefix, module = MODEL[kind]
    assert list(marker.iterdir()) == []  # neither configuration_*.py nor modeling_*.py ran
    assert not [m for m in sys.modules if module in m]
    text = _descriptor_path(out, kind).read_text()
    lines = text.splitlines()
    # regenerating needs no flag: nothing is imported to generate it
    assert lines[2] == f"# Regenerate: puzzle-gen generate {ckpt} --out {out}"
    assert "parsed with libcst and never imported" in text
    # loading the model still needs its code
    assert "def requires_trust_remote_code() -> bool:\n        return True" in text
    assert f'return _remote_class("{module}", "{prefix}DecoderLayer")' in text


def test_inspect_says_which_evidence_is_static(generated, capsys):
    ckpt, marker, _, _ = generated
    capsys.readouterr()
    assert cli.main(["inspect", str(ckpt), "--json"]) == 0
    spec = DescriptorSpec.from_json(capsys.readouterr().out)
    assert spec.code_origin == STATIC_ORIGIN and spec.requires_trust_remote_code is True
    assert spec.modeling_module.startswith("transformers_modules.")
    evidence = [e for f in spec.facts for e in f.evidence]
    assert not [e for e in evidence if e.startswith("probe: ")]  # no real build was made
    assert "static: its parsed forward's returns agree with the call site (nothing was run)" in (
        spec.fact("self_attn returns").evidence
    )
    assert any(e.startswith("not tried (the code was not run)") for e in evidence)
    assert list(marker.iterdir()) == []


def test_check_regenerates_without_importing(generated, capsys):
    ckpt, marker, out, kind = generated
    capsys.readouterr()
    assert cli.main(["check", "--out", str(out)]) == 0
    assert list(marker.iterdir()) == []
    path = _descriptor_path(out, kind)
    saved = path.read_text()
    path.write_text(saved.replace("a static build confirmed", "Edited"))
    try:
        assert cli.main(["check", "--out", str(out)]) == 1
        assert f"out of date: {path}" in capsys.readouterr().err
    finally:
        path.write_text(saved)


def test_verify_needs_the_flag_to_import_the_code(generated, capsys):
    ckpt, marker, out, _ = generated
    capsys.readouterr()
    assert cli.main(["verify", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"puzzle-gen: {ckpt}: verify compares the descriptor with the model")
    assert "pass it to import the code (generate did not need it)" in err
    assert list(marker.iterdir()) == []


def test_static_build_infers_what_importing_the_code_infers(generated, tmp_path, capsys):
    ckpt, marker, _, _ = generated
    capsys.readouterr()
    assert cli.main(["inspect", str(ckpt), "--json"]) == 0
    static = DescriptorSpec.from_json(capsys.readouterr().out)
    run = _run(tmp_path, "-m", "generator.cli", "inspect", str(ckpt), "--json",
               "--trust-remote-code")  # fmt: skip
    assert run.returncode == 0, run.stderr
    imported = DescriptorSpec.from_json(run.stdout)
    assert imported.code_origin == IMPORTED_ORIGIN
    assert rendered_facts(static) == rendered_facts(imported)
    assert static.fact("attention override").value == (
        "config.num_key_value_heads <- block_config.attention.num_key_value_heads"
    )


VERIFY_ORACLE = """
import importlib.util, sys
from transformers import AutoConfig, AutoModelForCausalLM
from puzzletron_runtime import ModelDescriptorFactory
from generator.verify import verify_descriptor

ckpt, path, class_name = sys.argv[1:4]
config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True)
# the oracle builds tiny models with AutoModelForCausalLM.from_config: register the imported classes
AutoConfig.register(config.model_type, type(config), exist_ok=True)
AutoModelForCausalLM.register(type(config), type(model), exist_ok=True)
spec = importlib.util.spec_from_file_location("static_descriptor", path)
module = importlib.util.module_from_spec(spec)
with ModelDescriptorFactory.scratch():
    spec.loader.exec_module(module)
for check in verify_descriptor(getattr(module, class_name), type(config)):
    print("ok" if check.ok else "FAIL", check.name, " ".join(check.detail.split()), sep="\t")
"""


def test_descriptor_verifies_against_the_imported_model(generated, tmp_path):
    """After generation, the test imports the checkpoint's code (trust_remote_code): the
    checkpoint's weights through the descriptor give from_pretrained's logits, and every check
    of the oracle passes against the imported model."""
    ckpt, marker, out, kind = generated
    run = _run(tmp_path, "-m", "generator.cli", "verify", str(ckpt), "--trust-remote-code",
               "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok   checkpoint partition: 30 tensors, each in exactly one group" in run.stdout
    assert "ok   trust_remote_code: requires_trust_remote_code() is True" in run.stdout
    assert "ok   load through the descriptor: logits [1, 16, 128] identical to from_pretrained" in (
        run.stdout
    )
    prefix = MODEL[kind][1]
    oracle = _run(tmp_path, "-c", VERIFY_ORACLE, str(ckpt), str(_descriptor_path(out, kind)),
                  f"{prefix}ModelDescriptor")  # fmt: skip
    assert oracle.returncode == 0, oracle.stderr
    results = [line.split("\t") for line in oracle.stdout.splitlines()]
    assert [(ok, name) for ok, name, _ in results] == [
        ("ok", "names"), ("ok", "identity"), ("ok", "weight groups"), ("ok", "overrides"),
        ("ok", "no-ops"), ("ok", "sharded stages"), ("ok", "heterogeneous round trip"),
    ], oracle.stdout  # fmt: skip
    # the test imported the code; generating did not
    assert sorted(p.name for p in marker.iterdir()) == [
        "configuration_imported",
        "modeling_imported",
    ]
    for p in marker.iterdir():
        p.unlink()


# -- what the static build cannot decide ------------------------------------------------------------
def _width_from_numpy(src: str) -> str:
    """The MLP width computed by a library the parse does not read (numpy)."""
    src = src.replace("import torch\n", "import numpy as np\nimport torch\n", 1)
    return src.replace(
        "        self.intermediate_size = config.intermediate_size\n",
        "        self.intermediate_size = int(np.ceil(config.intermediate_size / 32) * 32)\n",
    )


def _attention_from_a_table(src: str) -> str:
    """The attention class picked by what is installed where the model runs (a key the module
    sets in a try/except at import time)."""
    src = src.replace(
        "class MiniDecoderLayer(GradientCheckpointingLayer):",
        "try:\n"
        "    import flash_attn  # noqa: F401\n\n"
        '    MINI_ATTENTION_IMPL = "flash"\n'
        "except ImportError:\n"
        '    MINI_ATTENTION_IMPL = "eager"\n'
        'MINI_ATTENTION = {"flash": MiniAttention, "eager": MiniAttention}\n\n\n'
        "class MiniDecoderLayer(GradientCheckpointingLayer):",
    )
    return src.replace(
        "self.self_attn = MiniAttention(config=config, layer_idx=layer_idx)",
        "self.self_attn = MINI_ATTENTION[MINI_ATTENTION_IMPL](config, layer_idx)",
    )


def _norm_on_an_unknown_flag(src: str) -> str:
    """A module built on a flag config.json does not have."""
    return src.replace(
        "        self.input_layernorm = MiniRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n",
        "        if config.use_input_norm:\n"
        "            self.input_layernorm = MiniRMSNorm(config.hidden_size, eps=config.rms_norm_eps)\n",
    )


UNDECIDABLE = {
    "width": (
        _width_from_numpy,
        "cannot infer what setting config.num_key_value_heads=1 changes in model.layers.0: the "
        "parse does not compute the shapes of model.layers.0.mlp.gate_proj (modeling_mini.py:",
    ),
    "class": (
        _attention_from_a_table,
        "cannot infer the module model.layers.0.self_attn: modeling_mini.py:",
    ),
    "condition": (
        _norm_on_an_unknown_flag,
        "cannot infer which modules the model builds: the condition `config.use_input_norm` is "
        "not decided by config.json",
    ),
}


@pytest.mark.parametrize("case", sorted(UNDECIDABLE))
def test_what_the_parse_cannot_decide_is_one_line(case, tmp_path, capsys):
    edit, message = UNDECIDABLE[case]
    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported(tmp_path / "mini", marker, edit=edit)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("puzzle-gen: " + message), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "untouched"
    assert list(marker.iterdir()) == []


def test_inspect_reports_the_parse_and_the_fact_that_stopped_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported(tmp_path / "mini", marker, edit=_attention_from_a_table)
    capsys.readouterr()
    assert cli.main(["inspect", str(ckpt), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["custom_code"] == "parsed, not imported"
    assert report["classes"]["AutoModelForCausalLM"] == "modeling_mini.py MiniForCausalLM"
    headers = report["headers"]
    assert headers["layer_stack"] == "model.layers" and headers["num_layers"] == 3
    assert headers["layer_children"] == [
        "input_layernorm", "mlp", "post_attention_layernorm", "self_attn"
    ]  # fmt: skip
    assert headers["layer_tensors"]["mlp.down_proj.weight"] == [48, 96]
    (static,) = report["layer_stack_in_code"]
    assert static["class"] == "MiniModel" and static["element"] == "MiniDecoderLayer"
    assert "cannot infer the module model.layers.0.self_attn" in captured.err
    assert list(marker.iterdir()) == []


def test_a_config_that_contradicts_the_parsed_shapes_is_refused(tmp_path, capsys):
    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported(tmp_path / "mini", marker)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 64  # the tensors are 96 wide
    (ckpt / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "config.json contradicts the tensors' shapes (as the checkpoint's parsed code" in err
    assert "model.layers.0.mlp.down_proj.weight is [48, 96] in model.safetensors, the parsed code " \
        "builds [48, 64]" in err  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert list(marker.iterdir()) == []


# -- what the interpretation never calls ------------------------------------------------------------
HELPER = '''
from pathlib import Path

Path({marker!r}, "helper_imported").touch()

import torch


class MiniAct(torch.nn.Module):
    def forward(self, x):
        return x
'''


def test_a_library_loader_in_the_code_is_not_called(tmp_path, capsys):
    """transformers' own loader, called from the model's __init__, would import a file of the
    checkpoint (get_class_from_dynamic_module): the interpretation calls only the library's
    model helpers, so the helper file is never imported, and the model still generates."""
    marker = tmp_path / "marker"
    marker.mkdir()
    directory = tmp_path / "mini"

    def load_act_from_the_checkpoint(src: str) -> str:
        src = src.replace(
            "import torch\n",
            "import torch\nfrom transformers.dynamic_module_utils import "
            "get_class_from_dynamic_module\n",
            1,
        )
        return src.replace(
            "        self.act_fn = ACT2FN[config.hidden_act]\n",
            "        self.act_fn = get_class_from_dynamic_module("
            f"'helper_mini.MiniAct', {str(directory)!r})()\n",
            1,
        )

    ckpt = save_ported(directory, marker, edit=load_act_from_the_checkpoint)
    (ckpt / "helper_mini.py").write_text(HELPER.format(marker=str(marker)))
    capsys.readouterr()
    code = cli.main(["generate", str(ckpt), "--out", str(tmp_path / "out")])
    assert list(marker.iterdir()) == [], capsys.readouterr().err
    assert code == 0, capsys.readouterr().err
