"""Measure the static path (a checkpoint's own code parsed, never imported) on transformers' own
model types, ported to checkpoint-local code: each type's modeling and configuration files are
copied into a tiny checkpoint as its own code (relative imports made absolute, the model type
renamed so transformers does not know it), then described twice: by a static build of the parsed
code (no flag) and with the code imported (--trust-remote-code). Prints per type whether the
static path generates, and whether it infers exactly what the import infers.

    python scripts/static_sweep.py [--jobs N] [MODEL_TYPE...]

Without model types: every type coverage.json records as verified. Each type runs in
subprocesses with a time limit.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PORT = r"""
import inspect, json, re, sys
from pathlib import Path
import torch
from generator.source import resolve
from generator.tiny import tiny_config
from generator.probe import quiet_transformers

model_type, directory = sys.argv[1], Path(sys.argv[2])
source = resolve(model_type)
from safetensors.torch import save_file
with quiet_transformers():
    config = tiny_config(source.config_cls)
    torch.manual_seed(0)
    model = source.causal_lm_cls(config)
    # the module's own names (transformers renames tensors on save only for the types it knows),
    # without the tied copies, as save_pretrained writes them
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    tensors = model.state_dict()
    for target in getattr(model, "all_tied_weights_keys", {}) or {}:
        tensors.pop(target, None)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
config_file = Path(inspect.getsourcefile(source.config_cls))
stem = config_file.stem

def port(text):
    text = re.sub(r"from \.\.\.(\w)", r"from transformers.\1", text)
    text = text.replace("from ... import", "from transformers import")
    text = re.sub(r"from \.\.(\w)", r"from transformers.models.\1", text)
    text = text.replace("from .. import", "from transformers.models import")
    text = text.replace(f"from .{stem} import", "from .configuration_ported import")
    return text.replace(f'model_type = "{model_type}"', f'model_type = "ported_{model_type}"')

(directory / "configuration_ported.py").write_text(port(config_file.read_text()))
(directory / "modeling_ported.py").write_text(port(source.modeling_file.read_text()))
data = json.loads((directory / "config.json").read_text())
data.update(model_type=f"ported_{model_type}", auto_map={
    "AutoConfig": f"configuration_ported.{source.config_cls.__name__}",
    "AutoModelForCausalLM": f"modeling_ported.{source.causal_lm_cls.__name__}",
})
(directory / "config.json").write_text(json.dumps(data, indent=2))
"""


def run(args, env, timeout):
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None


def last_line(proc) -> str:
    if proc is None:
        return "timed out"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1][:240] if lines else f"exit {proc.returncode}"


def sweep_one(model_type: str, timeout: int) -> tuple[str, str, str]:
    from generator.spec import DescriptorSpec
    from generator.static_probe import rendered_facts

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_MODULES_CACHE": str(Path(tmp) / "hf_modules")}
        ckpt = Path(tmp) / "ported"
        port = run(["-c", PORT, model_type, str(ckpt)], env, timeout)
        if port is None or port.returncode:
            return model_type, "not ported", last_line(port)
        inspect = ["-m", "generator.cli", "inspect", str(ckpt), "--json"]
        imported = run(inspect + ["--trust-remote-code"], env, timeout)
        if imported is None or imported.returncode:
            return model_type, "import fails", last_line(imported)
        static = run(inspect, env, timeout)
        if static is None or static.returncode:
            return model_type, "static: not generated", last_line(static)
        a = rendered_facts(DescriptorSpec.from_json(static.stdout))
        b = rendered_facts(DescriptorSpec.from_json(imported.stdout))
        if a == b:
            return model_type, "static: same facts", ""
        differ = [k for k in a if a[k] != b[k]]
        if os.environ.get("STATIC_SWEEP_DETAIL"):
            for k in differ:
                print(f"{model_type} {k}\n  static:   {a[k]}\n  imported: {b[k]}", file=sys.stderr)
        return (
            model_type,
            "static: other facts",
            f"{', '.join(differ)}: {a[differ[0]]} vs {b[differ[0]]}"[:240],
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_types", nargs="*")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args()
    types = args.model_types or sorted(
        t
        for t, row in json.loads((REPO / "generated" / "coverage.json").read_text())[
            "types"
        ].items()
        if row.get("status") == "verified"
    )
    outcomes = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for model_type, outcome, detail in pool.map(lambda t: sweep_one(t, args.timeout), types):
            outcomes[outcome] += 1
            print(f"{model_type:24} {outcome:22} {detail}", flush=True)
    print()
    for outcome, n in outcomes.most_common():
        print(f"{n:4}  {outcome}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
