"""A checkpoint with its own code, generated WITHOUT --trust-remote-code: the code is parsed with
libcst and a static build stands in for the probe (generator/static_probe.py). Nothing of the
checkpoint's files is imported while generating (marker files prove it); the descriptor, once the
test imports the code with trust_remote_code, verifies against that very model; and a model whose
code the parse cannot decide stops with one line naming the fact."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import filelock
import pytest
from checkpoint_fixtures import save_custom, save_ported, save_ported_type

from generator import cli
from generator.spec import IMPORTED_ORIGIN, STATIC_ORIGIN, DescriptorSpec
from generator.static_probe import rendered_facts

REPO = Path(__file__).resolve().parent.parent
FIXTURES = {"ported": save_ported, "toy": save_custom}  # self-contained; subclasses transformers'
MODEL = {"ported": ("mini", "Mini", "modeling_mini"), "toy": ("toy_lm", "Toy", "modeling_toy")}


def _env(tmp: Path) -> dict:
    # one torch thread: the subprocess shares the cores with the other xdist worker
    return {**os.environ, "HF_MODULES_CACHE": str(tmp / "hf_modules"), "OMP_NUM_THREADS": "1"}


def _run(tmp: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(tmp), capture_output=True, text=True
    )


def _on(*kinds):
    return pytest.mark.parametrize("generated", kinds, indirect=True)


BOTH, PORTED = _on(*sorted(FIXTURES)), _on("ported")


class Generated(NamedTuple):
    ckpt: Path
    marker: Path  # where importing the code leaves files: stays empty
    out: Path
    kind: str
    spec: DescriptorSpec  # `inspect --json` without the flag


@pytest.fixture(scope="module")
def generated(request, tmp_path_factory) -> Generated:
    """Generated without the flag, once per test session: xdist's workers share it through a
    lock (pytest-xdist's recipe for once-only fixtures), and the tests only read it; a test
    that imports the code or edits a file works on its own copy (`_copy`)."""
    kind = request.param
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the session's workers
    base = root / f"static-{kind}"
    with filelock.FileLock(f"{base}.lock"):
        done = base / "inspect.json"
        if not done.exists():
            (base / "marker").mkdir(parents=True)
            ckpt = FIXTURES[kind](base / kind, base / "marker")
            assert cli.main(["generate", str(ckpt), "--out", str(base / "out")]) == 0
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                assert cli.main(["inspect", str(ckpt), "--json"]) == 0
            done.write_text(text.getvalue())
    spec = DescriptorSpec.from_json(done.read_text())
    return Generated(base / kind, base / "marker", base / "out", kind, spec)


def _copy(generated: Generated, tmp: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, marker dir, output dir) of a private copy: its code files touch its own
    marker dir."""
    ckpt, marker, out = tmp / generated.kind, tmp / "marker", tmp / "out"
    shutil.copytree(generated.ckpt, ckpt)
    shutil.copytree(generated.out, out)
    marker.mkdir()
    for code in ckpt.glob("*.py"):
        code.write_text(code.read_text().replace(repr(str(generated.marker)), repr(str(marker))))
    return ckpt, marker, out


def _descriptor_path(out: Path, kind: str) -> Path:
    model_type = MODEL[kind][0]
    return out / model_type / f"{model_type}_model_descriptor.py"


@BOTH
def test_generated_without_the_flag_and_nothing_imported(generated):
    ckpt, marker, out, kind, _ = generated
    model_type, prefix, module = MODEL[kind]
    assert list(marker.iterdir()) == []  # neither configuration_*.py nor modeling_*.py ran
    # the checkpoint's module itself (transformers' modeling_minimax, which other tests import,
    # merely starts with modeling_mini)
    assert not [m for m in sys.modules if m.rsplit(".", 1)[-1] == module]
    text = _descriptor_path(out, kind).read_text()
    lines = text.splitlines()
    # regenerating needs no flag: nothing is imported to generate it
    assert lines[2] == f"# Regenerate: puzzle-gen generate {ckpt} --out {out}"
    assert "parsed with libcst and never imported" in text
    # loading the model still needs its code
    assert "def requires_trust_remote_code() -> bool:\n        return True" in text
    assert f'return _remote_class("{module}", "{prefix}DecoderLayer")' in text


IMPORTED = """
import contextlib, importlib.util, io, sys
from pathlib import Path
from generator import cli

ckpt, out, spec_path, descriptor, class_name = sys.argv[1:6]
text = io.StringIO()
with contextlib.redirect_stdout(text):
    code = cli.main(["inspect", ckpt, "--json", "--trust-remote-code"])
assert code == 0, code
Path(spec_path).write_text(text.getvalue())
if descriptor == "-":
    raise SystemExit(0)
# verify PATH: the checkpoint's tensors through the descriptor against from_pretrained
print("verify exit", cli.main(["verify", ckpt, "--trust-remote-code", "--out", out]), flush=True)

from transformers import AutoConfig, AutoModelForCausalLM
from puzzletron_runtime import ModelDescriptorFactory
from generator.verify import verify_descriptor

config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True)
# the oracle builds tiny models with AutoModelForCausalLM.from_config: register the imported classes
AutoConfig.register(config.model_type, type(config), exist_ok=True)
AutoModelForCausalLM.register(type(config), type(model), exist_ok=True)
spec = importlib.util.spec_from_file_location("static_descriptor", descriptor)
module = importlib.util.module_from_spec(spec)
with ModelDescriptorFactory.scratch():
    spec.loader.exec_module(module)
for check in verify_descriptor(getattr(module, class_name), type(config)):
    print("ok" if check.ok else "FAIL", check.name, " ".join(check.detail.split()), sep="\t")
"""


@BOTH
def test_inspect_says_which_evidence_is_static(generated):
    _, marker, _, _, spec = generated
    assert spec.code_origin == STATIC_ORIGIN and spec.requires_trust_remote_code is True
    assert spec.modeling_module.startswith("transformers_modules.")
    evidence = [e for f in spec.facts for e in f.evidence]
    assert not [e for e in evidence if e.startswith("probe: ")]  # no real build was made
    assert "static: its parsed forward's returns agree with the call site (nothing was run)" in (
        spec.fact("self_attn returns").evidence
    )
    assert any(e.startswith("not tried (the code was not run)") for e in evidence)
    assert list(marker.iterdir()) == []


@PORTED
def test_check_regenerates_without_importing(generated, capsys):
    """`check` regenerates the files byte for byte from the checkpoint the header names, without
    the flag and so without importing (that check finds an edited file: test_checkpoint_dir.py)."""
    _, marker, out, _, _ = generated
    capsys.readouterr()
    assert cli.main(["check", "--out", str(out)]) == 0, capsys.readouterr().err
    files = len([p for p in out.rglob("*") if p.is_file()])
    assert f"puzzle-gen check: {files} file(s) up to date" in capsys.readouterr().err
    assert list(marker.iterdir()) == []


@BOTH
def test_verify_needs_the_flag_to_import_the_code(generated, capsys):
    ckpt, marker, out, _, _ = generated
    capsys.readouterr()
    assert cli.main(["verify", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"puzzle-gen: {ckpt}: verify compares the descriptor with the model")
    assert "pass it to import the code (generate did not need it)" in err
    assert list(marker.iterdir()) == []


@BOTH
def test_importing_the_code_infers_the_same_and_the_descriptor_verifies(generated, tmp_path):
    """One process imports the checkpoint's code (trust_remote_code; one, as it is the slow
    part): its `inspect --json` has the facts the static build inferred. For the self-contained
    port, the descriptor generated without the flag then passes `verify PATH` (the checkpoint's
    weights through it give from_pretrained's logits) and every check of the oracle against the
    imported model; the toy's classes are transformers' Llama, verified with the flag in
    test_checkpoint_dir.py."""
    ckpt, marker, out = _copy(generated, tmp_path)  # importing it touches the copy's marker
    kind, static = generated.kind, generated.spec
    descriptor = ["-", "-"]
    if kind == "ported":
        descriptor = [str(_descriptor_path(out, kind)), f"{MODEL[kind][1]}ModelDescriptor"]
    spec_path = tmp_path / "imported.json"
    run = _run(tmp_path, "-c", IMPORTED, str(ckpt), str(out), str(spec_path), *descriptor)
    # the flag imports the code (the test's process); generating without it did not
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in marker.iterdir()) == [
        "configuration_imported",
        "modeling_imported",
    ]
    assert list(generated.marker.iterdir()) == []

    imported = DescriptorSpec.from_json(spec_path.read_text())
    assert imported.code_origin == IMPORTED_ORIGIN
    assert rendered_facts(static) == rendered_facts(imported)
    assert static.fact("attention override").value == (
        "config.num_key_value_heads <- block_config.attention.num_key_value_heads"
    )
    if kind != "ported":
        return
    verify, _, oracle = run.stdout.partition("verify exit 0\n")
    assert "ok   checkpoint partition: 30 tensors, each in exactly one group" in verify
    assert "ok   trust_remote_code: requires_trust_remote_code() is True" in verify
    assert "ok   load through the descriptor: logits [1, 16, 128] identical to from_pretrained" in (
        verify
    )
    rows = [line.split("\t") for line in oracle.splitlines()]
    assert [(ok, name) for ok, name, _ in rows] == [
        ("ok", "names"), ("ok", "identity"), ("ok", "weight groups"), ("ok", "overrides"),
        ("ok", "no-ops"), ("ok", "sharded stages"), ("ok", "heterogeneous round trip"),
    ], oracle  # fmt: skip


# -- the checkpoint's own tensor names ---------------------------------------------------------------
def _add_tensors(ckpt: Path, extra: dict) -> None:
    """Tensors the code does not build, added to model.safetensors, or for a sharded checkpoint
    in a shard of their own that the index names."""
    from safetensors.torch import load_file, save_file

    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        save_file(extra, str(ckpt / "model-extra.safetensors"), metadata={"format": "pt"})
        data = json.loads(index.read_text())
        data["weight_map"].update({name: "model-extra.safetensors" for name in extra})
        index.write_text(json.dumps(data))
        return
    tensors = load_file(ckpt / "model.safetensors")
    save_file({**tensors, **extra}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_the_groups_partition_the_checkpoints_own_names(sharded, tmp_path):
    """Without the flag, the descriptor's groups cover every tensor the safetensors header names,
    each once, including the per-layer inv_freq older conversions add (which the parsed code does
    not build as a persistent tensor)."""
    import torch
    from test_checkpoint_dir import load_descriptor

    from generator.checkpoint import Checkpoint

    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported(tmp_path / "mini", marker, sharded=sharded)
    assert (ckpt / "model.safetensors.index.json").exists() == sharded
    _add_tensors(ckpt, {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(6)
                        for i in range(3)})  # fmt: skip
    out = tmp_path / "out"
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 0
    descriptor = load_descriptor(out / "mini" / "mini_model_descriptor.py").MiniModelDescriptor
    names = list(Checkpoint(ckpt).tensors)
    assert len(names) == 30 + 3
    groups = descriptor.get_weight_groups(names, 3)
    placed = [n for members in groups.values() for n in members]
    assert sorted(placed) == sorted(names)  # every name, none twice
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in groups["block_1_attention"]
    assert "model.layers.2.mlp.down_proj.weight" in groups["block_2_ffn"]
    assert list(marker.iterdir()) == []


def test_a_moe_model_as_checkpoint_code_generates_without_the_flag(tmp_path):
    """Mixtral's code as a checkpoint's own (experts, a router): generated from the parse, its
    groups partition the header's names, and the experts and the router go with the FFN."""
    from test_checkpoint_dir import load_descriptor

    from generator.checkpoint import Checkpoint

    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported_type(tmp_path / "moe", marker, "mixtral")
    config = json.loads((ckpt / "config.json").read_text())
    out = tmp_path / "out"
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 0
    assert list(marker.iterdir()) == []
    assert not [m for m in sys.modules if m.rsplit(".", 1)[-1] == "modeling_ported"]
    path = out / "ported_mixtral" / "ported_mixtral_model_descriptor.py"
    assert "parsed with libcst and never imported" in path.read_text()
    descriptor = load_descriptor(path).MixtralModelDescriptor
    layers = config["num_hidden_layers"]
    names = list(Checkpoint(ckpt).tensors)
    groups = descriptor.get_weight_groups(names, layers)
    placed = [n for members in groups.values() for n in members]
    assert sorted(placed) == sorted(names)  # every name, none twice
    ffn = [n for n in names if n.startswith("model.layers.0.mlp.")]
    assert ffn and set(ffn) <= set(groups["block_0_ffn"]), groups["block_0_ffn"]
    assert list(marker.iterdir()) == []


def test_tensors_no_group_takes_are_named_one_by_one(tmp_path, capsys):
    import torch

    marker = tmp_path / "marker"
    marker.mkdir()
    ckpt = save_ported(tmp_path / "mini", marker)
    _add_tensors(ckpt, {"model.extra_proj.weight": torch.ones(2),
                        "model.layers.1.mystery.weight": torch.ones(2)})  # fmt: skip
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "(2 wrong)" in err[-1], err[-1]
    assert "model.extra_proj.weight in no group" in err[-1]
    assert "model.layers.1.mystery.weight in no group" in err[-1]
    assert not out.exists()
    assert list(marker.iterdir()) == []


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


def test_a_module_beside_the_language_model_is_refused_without_running_it(tmp_path, capsys):
    """A weighted module beside the base model (a vision tower) is grouped by whether a
    text-only forward calls it: that needs the code run, so the parse refuses, naming it."""
    import torch

    marker = tmp_path / "marker"
    marker.mkdir()

    def with_a_tower(src: str) -> str:
        return src.replace(
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n",
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n"
            "        self.vision_tower = nn.Linear(4, config.hidden_size)\n",
            1,
        )

    ckpt = save_ported(tmp_path / "mini", marker, edit=with_a_tower)
    _add_tensors(ckpt, {"vision_tower.weight": torch.ones(48, 4),
                        "vision_tower.bias": torch.ones(48)})  # fmt: skip
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("puzzle-gen: cannot infer the weight group of vision_tower: "), err
    assert "--trust-remote-code" in err[-1]
    assert not out.exists()
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
HELPER = """
from pathlib import Path

Path({marker!r}, "helper_imported").touch()

import torch


class MiniAct(torch.nn.Module):
    def forward(self, x):
        return x
"""


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
