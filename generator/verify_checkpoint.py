"""`puzzle-gen verify PATH`: a generated descriptor against the checkpoint it was made from.

Independent of the descriptor: the checkpoint's real tensor names must fall into exactly one
group of the descriptor's own predicates (as compiled by the emitted module), and the model
loaded through the descriptor and the runtime must give the same logits as transformers'
`from_pretrained` on the same directory, unpatched. Nothing is downloaded (local files only).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .checkpoint import show
from .errors import PuzzleGenError


def _descriptor(model_type: str, out: Path):
    """The descriptor class for `model_type` in the generated package at `out`, imported from its
    file without registering it anywhere."""
    from puzzletron_runtime import ModelDescriptorFactory

    from .render import read_manifest

    entries = {e.model_type: e for e in read_manifest(out / "__init__.py")}
    entry = entries.get(model_type)
    if entry is None:
        raise PuzzleGenError(
            f"{out} has no descriptor for {model_type!r}; run `puzzle-gen generate` first"
        )
    path = out / entry.package / f"{entry.package}_model_descriptor.py"
    name = f"_puzzle_gen_verify_{entry.package}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.is_file():
        raise PuzzleGenError(f"{path}: not found")
    module = importlib.util.module_from_spec(spec)
    with ModelDescriptorFactory.scratch():  # a name an installed descriptor holds is no clash
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
    return getattr(module, entry.class_name)


def verify_checkpoint(target, out: Path) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) for the descriptor of `target` (from source.resolve_target) in `out`."""
    import torch

    from .probe import quiet_transformers

    ckpt = target.checkpoint
    descriptor = _descriptor(target.model_type, out)
    checks: list[tuple[str, bool, str]] = []
    text = target.config.get_text_config()
    num_layers = int(text.num_hidden_layers)
    names = list(ckpt.tensors)

    predicates = descriptor.layer_name_predicates(num_layers)
    wrong = []
    for name in names:
        hits = [g for g, p in predicates.items() if p.search(name)]
        if len(hits) != 1:
            wrong.append(f"{show(name)} in {' and '.join(hits) if hits else 'no group'}")
    checks.append(
        (
            "checkpoint partition",
            not wrong,
            (
                f"{len(names)} tensors, each in exactly one group"
                if not wrong
                else f"{len(wrong)} wrong: {'; '.join(wrong[:12])}"
            ),
        )
    )

    flag = descriptor.requires_trust_remote_code()
    checks.append(
        (
            "trust_remote_code",
            flag == bool(target.trust_remote_code),
            f"requires_trust_remote_code() is {flag}",
        )
    )

    from transformers import AutoModelForCausalLM

    from puzzletron_runtime import load_model

    try:
        with quiet_transformers():
            reference = AutoModelForCausalLM.from_pretrained(
                str(ckpt.directory),
                trust_remote_code=bool(target.trust_remote_code),
                local_files_only=True,
                dtype=torch.float32,
            ).eval()
            loaded = load_model(descriptor, ckpt.directory).eval()
        vocab = int(text.vocab_size)
        ids = (torch.arange(16) * 7 % vocab).unsqueeze(0)
        with torch.no_grad():
            a = reference(input_ids=ids).logits
            b = loaded(input_ids=ids).logits
        same = a.shape == b.shape and torch.equal(a, b)
        detail = (
            f"logits {list(a.shape)} identical to from_pretrained"
            if same
            else (
                f"max |difference| {float((a - b).abs().max()):.3g}"
                if a.shape == b.shape
                else f"shapes {list(a.shape)} vs {list(b.shape)}"
            )
        )
        checks.append(("load through the descriptor", same, detail))
    except Exception as exc:  # the check failed: say how, on one line
        checks.append(
            (
                "load through the descriptor",
                False,
                f"{type(exc).__name__}: {' '.join(str(exc).split())}",
            )
        )
    return checks
