"""`generate --jobs` and `check --jobs`: the same files, stdout, stderr and exit code as a
serial run, including when a model type in the middle fails."""

import shutil
from pathlib import Path

import pytest

from generator import cli
from generator.errors import InferenceError

TYPES = ["llama", "qwen3", "mistral"]


def run_cli(capfd, *args):
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_generate_with_two_jobs_is_byte_identical(tmp_path, capfd):
    out = tmp_path / "g"
    serial = run_cli(capfd, "generate", *TYPES, "--out", str(out), "--jobs", "1")
    serial_files = snapshot(out)
    shutil.rmtree(out)
    parallel = run_cli(capfd, "generate", *TYPES, "--out", str(out), "--jobs", "2")
    assert serial[0] == 0
    assert parallel == serial
    assert snapshot(out) == serial_files
    # per type: descriptor, converter, __init__.py; then the table, coverage.json, COVERAGE.md
    assert len(serial_files) == 3 * len(TYPES) + 3
    assert "[3/3] mistral: inferring" in serial[2]

    target = out / "qwen3" / "qwen3_model_descriptor.py"
    target.write_text(target.read_text().replace("return", "return  ", 1))
    diffs = [
        run_cli(capfd, "generate", *TYPES, "--out", str(out), "--diff", "--jobs", j)
        for j in ("1", "2")
    ]
    assert diffs[0] == diffs[1]
    assert f"--- a/{target}" in diffs[0][1]


def test_check_with_two_jobs_reads_the_same(tmp_path, capfd):
    # a package of a few types: the repository's own package is checked by `make check` (CI)
    out = tmp_path / "g"
    assert run_cli(capfd, "generate", *TYPES, "--out", str(out))[0] == 0
    serial = run_cli(capfd, "check", "--out", str(out), "--jobs", "1")
    assert serial[0] == 0, serial[2]
    assert f"[{len(TYPES)}/{len(TYPES)}]" in serial[2]
    assert run_cli(capfd, "check", "--out", str(out), "--jobs", "2") == serial
    assert run_cli(capfd, "check", "--out", str(out)) == serial  # default: the cores available
    stale = out / "qwen3" / "qwen3_model_descriptor.py"
    stale.write_text(stale.read_text() + "# edited by hand\n")
    failed = run_cli(capfd, "check", "--out", str(out), "--jobs", "1")
    assert failed[0] != 0
    assert run_cli(capfd, "check", "--out", str(out), "--jobs", "2") == failed


@pytest.mark.parametrize("how", ["inference error", "unknown type"])
def test_a_failure_in_the_middle_reads_the_same(how, monkeypatch, tmp_path, capfd):
    import generator.infer as infer_module

    real = infer_module.infer

    def fake(model_type):
        if model_type == "qwen2":
            raise InferenceError("the layer stack", "no ModuleList", ["probe: nothing"])
        return real(model_type)

    monkeypatch.setattr(infer_module, "infer", fake)
    types = ["llama", "qwen2", "qwen3"] if how == "inference error" else ["llama", "lama", "qwen3"]
    out = tmp_path / "never"
    results = [
        run_cli(capfd, "generate", *types, "--out", str(out), "--jobs", j) for j in ("1", "2")
    ]
    assert results[0] == results[1]
    code, _, err = results[0]
    if how == "inference error":
        assert code == 1
        assert err.splitlines()[:2] == ["[1/3] llama: inferring", "[2/3] qwen2: inferring"]
    else:  # every argument is resolved before any inference starts
        assert code == 2
        assert err.startswith("puzzle-gen: unknown model type 'lama'")
        assert "inferring" not in err
    assert "[3/3]" not in err and "Traceback" not in err
    assert not out.exists()


def test_jobs_must_be_a_positive_number(capfd):
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["check", "--jobs", bad])
        assert exit_info.value.code == 2
        assert "--jobs" in capfd.readouterr().err
