"""`generate --all`, `verify --all` and COVERAGE.md: every type gets a status and a reason."""

import json
import re

import pytest

from generator import cli, coverage
from generator import source as source_module


@pytest.fixture
def few_types(monkeypatch):
    """`--all` over a handful of types: one that generates, one whose inference fails, one
    encoder-decoder and one encoder (both out of scope)."""
    types = ["bart", "bert", "llama", "xlstm"]
    monkeypatch.setattr(source_module, "known_model_types", lambda: list(types))
    return types


def read_rows(out):
    return json.loads((out / "coverage.json").read_text())["types"]


def test_generate_all_records_every_type_and_keeps_going(tmp_path, few_types, capsys):
    out = tmp_path / "gen"
    assert cli.main(["generate", "--all", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert sorted(rows) == few_types
    assert rows["llama"]["status"] == coverage.UNVERIFIED
    assert rows["llama"]["family"] == "dense" and rows["xlstm"]["family"] == "hybrid"
    assert (out / "llama" / "llama_model_descriptor.py").is_file()
    assert rows["xlstm"]["status"] == coverage.NOT_GENERATED
    assert rows["xlstm"]["reason"].startswith("cannot infer")
    assert rows["bart"]["status"] == coverage.OUT_OF_SCOPE
    assert rows["bart"]["reason"] == coverage.out_of_scope(
        "bart", type("C", (), {"is_encoder_decoder": True})()
    )
    assert rows["bert"]["status"] == coverage.OUT_OF_SCOPE
    assert not (out / "xlstm").exists() and not (out / "bart").exists()
    table = (out / "COVERAGE.md").read_text()
    assert "| `xlstm` | hybrid | not generated |  | cannot infer" in table
    assert "0 of 2 in-scope types verified" in table
    assert "| dense | 0 | 1 | 0% |" in table and "| hybrid | 0 | 1 | 0% |" in table


def test_verify_all_records_results_and_fails_on_a_broken_descriptor(tmp_path, few_types, capsys):
    few_types.append("qwen3")  # the patched list of known types is this list
    out = tmp_path / "gen"
    assert cli.main(["generate", "llama", "qwen3", "--out", str(out)]) == 0
    module = out / "qwen3" / "qwen3_model_descriptor.py"
    module.write_text(module.read_text().replace('return "model.norm"', "return None"))
    assert cli.main(["verify", "--all", "--jobs", "1", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert re.search(r"qwen3\s+6/7\s+FAIL names", printed.out)
    rows = read_rows(out)
    assert rows["llama"] == {"status": coverage.VERIFIED, "reason": "", "family": "dense"}
    assert rows["qwen3"]["status"] == coverage.FAILING
    assert rows["qwen3"]["reason"].startswith("names: final_norm_name() is None")
    assert "names" in rows["qwen3"]["failed_checks"]
    table = (out / "COVERAGE.md").read_text()
    assert "| `llama` | dense | verified | `llama.LlamaModelDescriptor` |" in table
    assert "| `qwen3` | dense | failing |" in table


def test_verify_record_updates_only_the_named_types(tmp_path, few_types, capsys):
    few_types.append("qwen3")
    out = tmp_path / "gen"
    assert cli.main(["generate", "llama", "qwen3", "--out", str(out)]) == 0
    module = out / "qwen3" / "qwen3_model_descriptor.py"
    module.write_text(module.read_text().replace('return "model.norm"', "return None"))
    # only llama is verified and recorded: qwen3's broken descriptor stays "unverified"
    assert cli.main(["verify", "--record", "llama", "--jobs", "1", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows["llama"]["status"] == coverage.VERIFIED
    assert rows["qwen3"]["status"] == coverage.UNVERIFIED
    assert cli.main(["verify", "--record", "qwen3", "--jobs", "1", "--out", str(out)]) == 1
    rows = read_rows(out)
    assert rows["llama"]["status"] == coverage.VERIFIED
    assert rows["qwen3"]["status"] == coverage.FAILING
    assert "| `qwen3` | dense | failing |" in (out / "COVERAGE.md").read_text()
    # a type that was never generated is a usage error, and nothing is recorded
    before = (out / "coverage.json").read_text()
    assert cli.main(["verify", "--record", "mistral", "--out", str(out)]) == 2
    assert "not generated" in capsys.readouterr().err
    assert (out / "coverage.json").read_text() == before


def test_check_fails_when_coverage_is_stale(tmp_path, few_types, capsys):
    out = tmp_path / "gen"
    assert cli.main(["generate", "llama", "--out", str(out)]) == 0
    assert cli.main(["check", "--out", str(out)]) == 0
    md = out / "COVERAGE.md"
    md.write_text(md.read_text().replace("unverified", "verified"))
    assert cli.main(["check", "--out", str(out)]) == 1
    assert f"out of date: {md}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_types_and_all_are_exclusive(command, capsys):
    assert cli.main([command]) == 2
    assert cli.main([command, "llama", "--all"]) == 2
    assert "give model types, or --all" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("llama", "dense"),
        ("mixtral", "MoE"),
        ("qwen3_moe", "MoE"),
        ("jamba", "hybrid"),
        ("qwen3_next", "hybrid"),
        ("nemotron_h", "hybrid"),
        ("gemma3", "multimodal"),
        ("gemma3_text", "dense"),
    ],
)
def test_family_from_the_default_config(model_type, expected):
    from generator.source import resolve

    assert coverage.family(resolve(model_type).config_cls()) == expected


def test_committed_coverage_lists_every_known_type():
    import generated
    from pathlib import Path

    rows = coverage.load(Path(generated.__file__).parent)
    table = (Path(generated.__file__).parent / "COVERAGE.md").read_text()
    for t in source_module.known_model_types():
        assert f"| `{t}` |" in table
    for t in generated.available():
        assert rows[t].status in coverage.GENERATED_STATUSES


def test_generate_all_records_an_internal_error_and_goes_on(tmp_path, monkeypatch):
    """A crash inside one type's inference (a bug, not a user error) is that type's reason."""
    import generator.infer as infer_module

    real = infer_module.infer

    def crashing(target):
        if target == "qwen2":
            raise AttributeError("'Qwen2Config' object has no attribute 'num_hidden_layers'")
        return real(target)

    monkeypatch.setattr(infer_module, "infer", crashing)
    monkeypatch.setattr(source_module, "known_model_types", lambda: ["llama", "qwen2"])
    out = tmp_path / "gen"
    assert cli.main(["generate", "--all", "--jobs", "1", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows["qwen2"]["status"] == coverage.NOT_GENERATED
    assert rows["qwen2"]["reason"].startswith("internal error: AttributeError(")
    assert rows["llama"]["status"] == coverage.UNVERIFIED


# -- scope rules that need a tiny model's forward ------------------------------------------------
def _default(model_type):
    from generator.source import resolve
    from generator.tiny import default_config

    return default_config(resolve(model_type).config_cls)


def test_a_config_with_is_decoder_off_whose_model_attends_both_ways_is_an_encoder():
    """BertGeneration's config declares is_decoder and leaves it off: its causal LM then lets
    earlier positions see later tokens. GPT-NeoX's config also declares the flag off, but its
    attention is causal regardless, so it stays in scope."""
    reason = coverage.out_of_scope("bert-generation", _default("bert-generation"))
    assert reason is not None and "is_decoder" in reason and "later tokens" in reason
    assert coverage.out_of_scope("gpt_neox", _default("gpt_neox")) is None
    decoder = _default("bert-generation")
    decoder.is_decoder = True  # configured as a decoder: not an encoder by this rule
    assert coverage.out_of_scope("bert-generation", decoder) is None


def test_a_model_whose_layers_run_more_than_once_per_forward_is_recurrent_depth(monkeypatch):
    from transformers.models.llama import modeling_llama

    llama = _default("llama")
    assert coverage.out_of_scope_by_running(llama) is None
    original = modeling_llama.LlamaModel.forward

    def twice(self, *args, **kwargs):  # the same layers applied in two cycles
        original(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", twice)
    reason = coverage.out_of_scope_by_running(llama)
    assert reason is not None and reason.startswith("recurrent depth")
    from generator.tiny import tiny_config

    layers = tiny_config(type(llama)).num_hidden_layers  # the reason counts the tiny model's
    assert f"{layers} layer modules make {2 * layers} layer calls" in reason


def test_generate_all_records_encoders_and_recurrent_depth_as_out_of_scope(tmp_path, monkeypatch):
    monkeypatch.setattr(source_module, "known_model_types", lambda: ["bert-generation", "hrm_text"])
    out = tmp_path / "gen"
    assert cli.main(["generate", "--all", "--jobs", "1", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert rows["bert-generation"]["status"] == coverage.OUT_OF_SCOPE
    assert rows["bert-generation"]["reason"] == coverage.out_of_scope(
        "bert-generation", _default("bert-generation")
    )
    assert rows["hrm_text"]["status"] == coverage.OUT_OF_SCOPE
    assert rows["hrm_text"]["reason"] == coverage.out_of_scope_by_running(_default("hrm_text"))
    table = (out / "COVERAGE.md").read_text()
    assert "| `hrm_text` | dense | out of scope |" in table
    assert "| `bert-generation` | dense | out of scope |" in table


def test_a_file_no_longer_generated_is_removed_and_check_names_it(tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli.main(["generate", "llama", "--out", str(out)]) == 0
    stale = out / "llama" / "llama_old_converter.py"  # e.g. a converter inference now refuses
    stale.write_text("# written by an older generator\n")
    assert cli.main(["check", "--out", str(out)]) == 1
    assert f"not generated any more: {stale}" in capsys.readouterr().err
    assert cli.main(["generate", "llama", "--out", str(out)]) == 0
    assert not stale.exists() and (out / "llama" / "llama_model_descriptor.py").is_file()
    assert cli.main(["check", "--out", str(out)]) == 0
