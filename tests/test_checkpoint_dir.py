"""`generate PATH` / `inspect PATH` on local checkpoint directories: the checkpoint's config (not
its model type's defaults) is probed, the predicates partition the checkpoint's own tensor names,
and custom code is parsed without being run unless --trust-remote-code says so."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_fixtures import SMALL_LLAMA, save_custom, save_llama
from safetensors.torch import load_file, save_file

from generator import cli
from generator.checkpoint import Checkpoint
from generator.source import resolve_target
from generator.spec import DescriptorSpec

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    # tied embeddings and 3 layers of width 48: LlamaConfig() unties and has 32 layers of 4096
    return save_llama(tmp_path_factory.mktemp("ckpt") / "single", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_llama(
        tmp_path_factory.mktemp("ckpt") / "sharded", sharded=True, tie_word_embeddings=True
    )


def inspect_json(capsys, *args) -> DescriptorSpec:
    capsys.readouterr()
    assert cli.main(["inspect", *map(str, args), "--json"]) == 0
    return DescriptorSpec.from_json(capsys.readouterr().out)


def load_descriptor(path: Path):
    """Import a generated descriptor file without leaving it in the descriptor factory."""
    from puzzletron_runtime import ModelDescriptorFactory

    spec = importlib.util.spec_from_file_location(f"_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with ModelDescriptorFactory.scratch():  # a name an installed descriptor holds is no clash
        spec.loader.exec_module(module)
    return module


def test_resolve_target_reads_the_checkpoint_config(single):
    target = resolve_target(str(single))
    assert target.model_type == "llama"
    assert target.checkpoint == Checkpoint(single)
    assert target.config.num_hidden_layers == 3 and target.config.hidden_size == 48
    assert target.config.tie_word_embeddings is True
    assert target.trust_remote_code is False and target.custom_code is None
    assert resolve_target("llama").checkpoint is None  # a model type stays a model type


def test_checkpoint_headers_are_read_without_tensor_data(single, sharded):
    a, b = Checkpoint(single).tensors, Checkpoint(sharded).tensors
    assert set(a) == set(b) and "model.layers.2.mlp.down_proj.weight" in a
    assert a["model.layers.2.mlp.down_proj.weight"].shape == (48, 96)
    assert len({info.file for info in b.values()}) > 1  # really sharded


def test_inspect_probes_the_checkpoint_config_not_the_defaults(capsys, single):
    spec = inspect_json(capsys, single)
    assert spec.tied_embeddings is True  # LlamaConfig() has untied embeddings
    assert "probe: ModuleList of 3 = num_hidden_layers" in spec.fact("layer stack").evidence
    assert spec.source_argument == str(single)
    assert spec.requires_trust_remote_code is False and spec.code_origin == "transformers"
    default = inspect_json(capsys, "llama")
    assert default.tied_embeddings is False
    assert "probe: ModuleList of 32 = num_hidden_layers" in default.fact("layer stack").evidence


def test_generate_path_writes_a_descriptor_that_partitions_the_checkpoint(single, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["generate", str(single), "--out", str(out)]) == 0
    path = out / "llama" / "llama_model_descriptor.py"
    text = path.read_text()
    assert text.splitlines()[2] == f"# Regenerate: puzzle-gen generate {single} --out {out}"
    assert "Inferred from a checkpoint directory" in text
    assert "requires_trust_remote_code" not in text
    descriptor = load_descriptor(path).LlamaModelDescriptor
    names = list(Checkpoint(single).tensors)
    groups = descriptor.get_weight_groups(names, 3)
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    assert set(groups["block_2_ffn"]) == {
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.mlp.gate_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.2.post_attention_layernorm.weight",
    }


def test_sharded_and_single_file_checkpoints_give_the_same_descriptor(single, sharded, tmp_path):
    texts = []
    for ckpt in (single, sharded):
        out = tmp_path / ckpt.name
        assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 0
        lines = (out / "llama" / "llama_model_descriptor.py").read_text().splitlines()
        texts.append([line for line in lines if not line.startswith("# Regenerate:")])
    assert texts[0] == texts[1]


def test_check_regenerates_from_the_checkpoint_directory(single, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", str(single), "--out", str(out)]) == 0
    assert cli.main(["check", "--out", str(out)]) == 0
    target = out / "llama" / "llama_model_descriptor.py"
    target.write_text(target.read_text().replace("Inferred from a checkpoint", "Edited"))
    capsys.readouterr()
    assert cli.main(["check", "--out", str(out)]) == 1
    assert f"out of date: {target}" in capsys.readouterr().err


def rewrite(ckpt: Path, tmp_path: Path, extra: dict) -> Path:
    import shutil

    dst = tmp_path / "rewritten"
    shutil.copytree(ckpt, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors.update(extra)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_per_layer_inv_freq_of_older_conversions_lands_in_the_attention_group(single, tmp_path):
    import torch

    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(6) for i in range(3)}
    ckpt = rewrite(single, tmp_path, extra)
    out = tmp_path / "out"
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 0
    descriptor = load_descriptor(out / "llama" / "llama_model_descriptor.py").LlamaModelDescriptor
    groups = descriptor.get_weight_groups(list(Checkpoint(ckpt).tensors), 3)
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in groups["block_1_attention"]


def test_tensors_outside_every_group_are_named_one_by_one(single, tmp_path, capsys):
    import torch

    extra = {
        "model.extra_proj.weight": torch.ones(2),
        "model.layers.1.mystery.weight": torch.ones(2),
    }
    ckpt = rewrite(single, tmp_path, extra)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "do not partition the checkpoint's" in err and "(2 wrong)" in err
    assert "model.extra_proj.weight in no group" in err
    assert "model.layers.1.mystery.weight in no group" in err
    assert not out.exists()


# -- custom code -------------------------------------------------------------------------------
@pytest.fixture
def custom(tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    return save_custom(tmp_path / "toy", marker), marker


# Custom code without the flag (a static build of the parsed code; what it cannot decide, and
# `inspect` then): tests/test_static_custom_code.py


def test_builtin_model_type_with_auto_map_uses_transformers_without_the_flag(custom, capsys):
    ckpt, marker = custom
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    spec = inspect_json(capsys, ckpt)
    assert spec.modeling_module == "transformers.models.llama.modeling_llama"
    assert spec.code_origin.endswith("(the checkpoint's own code was parsed, not imported)")
    assert list(marker.iterdir()) == []


def test_custom_code_is_imported_with_the_flag_and_the_descriptor_says_so(custom, tmp_path):
    ckpt, marker = custom
    out = tmp_path / "out"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    gen = subprocess.run(
        [sys.executable, "-m", "generator.cli", "generate", str(ckpt), "--trust-remote-code",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert sorted(p.name for p in marker.iterdir()) == [
        "configuration_imported",
        "modeling_imported",
    ]
    path = out / "toy_lm" / "toy_lm_model_descriptor.py"
    text = path.read_text()
    assert f"# Regenerate: puzzle-gen generate {ckpt} --trust-remote-code --out {out}" in text
    assert "the checkpoint's own code, imported with --trust-remote-code" in text
    # The descriptor finds the custom layer class once transformers has imported the code.
    script = f"""
import importlib.util, sys
from transformers import AutoModelForCausalLM
from safetensors import safe_open
AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True, local_files_only=True)
spec = importlib.util.spec_from_file_location("toy_descriptor", {str(path)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
d = module.ToyModelDescriptor
with safe_open({str(ckpt / "model.safetensors")!r}, "pt") as f:
    names = list(f.keys())
groups = d.get_weight_groups(names, 3)
assert sorted(n for g in groups.values() for n in g) == sorted(names)
print(d.decoder_layer_cls().__name__, d.requires_trust_remote_code())
"""
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ToyDecoderLayer", "True"]


# -- verify PATH ----------------------------------------------------------------------------------
def test_verify_path_loads_the_checkpoint_through_the_descriptor(sharded, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", str(sharded), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(sharded), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "ok   checkpoint partition: 29 tensors, each in exactly one group" in report
    assert "ok   load through the descriptor: logits [1, 16, 128] identical to from_pretrained" in (
        report
    )


def test_verify_path_fails_on_a_descriptor_that_misses_tensors(single, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["generate", str(single), "--out", str(out)]) == 0
    path = out / "llama" / "llama_model_descriptor.py"
    text = path.read_text()
    assert "                  | mlp\\..+\n" in text
    path.write_text(text.replace("                  | mlp\\..+\n", ""))
    capsys.readouterr()
    assert cli.main(["verify", str(single), "--out", str(out)]) == 1
    report = capsys.readouterr().out
    assert (
        "FAIL checkpoint partition: 9 wrong: model.layers.0.mlp.down_proj.weight in no group"
        in (report)
    )


def test_check_imports_custom_code_only_when_told_to(custom, tmp_path, capsys):
    ckpt, marker = custom
    out = tmp_path / "out"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    gen = subprocess.run(
        [sys.executable, "-m", "generator.cli", "generate", str(ckpt), "--trust-remote-code",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    for name in list(marker.iterdir()):
        name.unlink()
    # the file's header asks for --trust-remote-code: that alone must not import anything
    capsys.readouterr()
    assert cli.main(["check", "--out", str(out)]) == 1
    assert "pass --trust-remote-code to check it" in capsys.readouterr().err
    assert list(marker.iterdir()) == []
    run = subprocess.run(
        [sys.executable, "-m", "generator.cli", "check", "--trust-remote-code", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "file(s) up to date" in run.stderr  # (how many depends on the package layout)


def test_names_renamed_on_load_are_reported_with_the_reason(tmp_path, capsys):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, num_local_experts=2,
    )  # fmt: skip
    ckpt = tmp_path / "mixtral"
    MixtralForCausalLM(config).save_pretrained(ckpt)
    ckpt = rewrite(ckpt, tmp_path, {"model.stray.weight": torch.ones(2)})
    capsys.readouterr()
    assert cli.main(["generate", str(ckpt), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    # (on disk Mixtral's experts are block_sparse_moe.experts.N.w1, in the module
    # mlp.experts.gate_up_proj: whether those are grouped is another matter; the stray is not)
    assert "model.stray.weight in no group" in err
    assert "transformers renames mixtral tensors between disk and module" in err
    assert not (tmp_path / "out").exists()
