"""Verification of a generated descriptor against an independent oracle.

"Verified" means right, not self-consistent: every check compares what the descriptor builds
with transformers' own model, built unpatched from the same tiny config with the same weights
(see oracle.py for how the reference facts are observed, checks.py for the checks). One
implementation serves `puzzle-gen verify` and the test suite.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import PuzzleGenError
from ..probe import quiet_transformers
from ..source import resolve
from ..tiny import tiny_config
from .checks import CHECKS, CheckDef, Subject
from .models import (
    VerificationError,
    build,
    layer_io,
    reference_model,
    sample_input,
    save_sharded,
)
from .oracle import SIZE_FIELDS, WIDTH_FIELDS, Reference

__all__ = [
    "CHECKS",
    "Check",
    "Reference",
    "Subject",
    "VerificationError",
    "build",
    "layer_io",
    "load_descriptor",
    "load_generated_package",
    "make_subject",
    "reference_model",
    "run_check",
    "sample_input",
    "save_sharded",
    "verification_config",
    "verify_descriptor",
    "verify_model_type",
]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    reference: str = ""  # what the check compared against


def verification_config(config_cls: type, **extra: Any) -> Any:
    """The tiny config checks run on. A block-config size the config leaves to a default
    (GPT-2's `n_inner=None`: 4 x hidden) is made concrete, so that a block config can repeat it."""
    with quiet_transformers():
        config = tiny_config(config_cls, **extra)
    text = config.get_text_config()
    present = text.to_dict()
    for fields in (*SIZE_FIELDS.values(), WIDTH_FIELDS):
        for name in fields:
            if name in present and present[name] is None and name not in extra:
                width = 2 * int(getattr(text, "hidden_size", 64) or 64)
                config = copy.deepcopy(config)
                setattr(config.get_text_config(), name, width)
                break
    return config


def make_subject(descriptor: type, config_cls: type, **config_fields: Any) -> Subject:
    """What the checks run on; `config_fields` change the tiny config (e.g. fewer experts).
    A config class that refuses tied embeddings (DBRX's validates them away) has no tied
    variant: no checkpoint of that type can tie, and the checks say they skipped it."""
    config = verification_config(config_cls, **config_fields)
    try:
        tied = verification_config(config_cls, tie_word_embeddings=True, **config_fields)
        refused = ""
    except Exception as exc:
        tied = None
        refused = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1].strip()}"
    return Subject(
        descriptor=descriptor,
        config_cls=config_cls,
        config=config,
        tied_config=tied,
        tied_refused=refused,
    )


def run_check(subject: Subject, check: CheckDef) -> Check:
    try:
        detail = check.fn(subject)
        return Check(check.name, True, detail, check.reference)
    except VerificationError as exc:
        return Check(check.name, False, str(exc), check.reference)
    except Exception as exc:  # a crash is a failed check, reported with its type
        return Check(check.name, False, f"{type(exc).__name__}: {exc}", check.reference)


def verify_descriptor(
    descriptor: type, config_cls: type, on_check: Callable[[Check], None] | None = None
) -> list[Check]:
    """Run every check; a failed check is a report line, not an exception."""
    try:
        subject = make_subject(descriptor, config_cls)
        subject.reference  # noqa: B018 - build it once, here, so a failure is reported once
    except Exception as exc:
        return [Check("reference model", False, f"{type(exc).__name__}: {exc}", "")]
    results = []
    for check in CHECKS:
        result = run_check(subject, check)
        results.append(result)
        if on_check is not None:
            on_check(result)
    return results


def load_generated_package(out: Path):
    """Import the generated package at `out` (the committed one, or any --out directory).

    The installed `generated` package is returned as it is; any other directory is imported
    afresh under a name of its own (derived from its path), with no module cached from an
    earlier import of it, so two directories, or one rewritten between calls, never mix."""
    out = out.resolve()
    init = out / "__init__.py"
    if not init.is_file():
        raise PuzzleGenError(f"{out} is not a generated package (no __init__.py)")
    installed = importlib.util.find_spec("generated")
    if installed is not None and installed.origin and Path(installed.origin).resolve() == init:
        return importlib.import_module("generated")
    name = "puzzle_gen_out_" + hashlib.sha1(str(out).encode()).hexdigest()[:12]
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(out)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_descriptor(model_type: str, out: Path):
    """The descriptor class of `model_type` in the generated package at `out`. A package other
    than the installed `generated` registers nothing in the factory (its names would clash with
    the installed descriptors of the same model types)."""
    from puzzletron_runtime import ModelDescriptorFactory

    package = load_generated_package(out)
    installed = sys.modules.get("generated")
    scoped = installed is not package
    try:
        with ModelDescriptorFactory.scratch() if scoped else contextlib.nullcontext():
            return package.get_descriptor(model_type)
    except KeyError as exc:
        raise PuzzleGenError(
            str(exc.args[0]) + f" (run `puzzle-gen generate {model_type}`)"
        ) from None


def verify_model_type(
    model_type: str, out: Path, on_check: Callable[[Check], None] | None = None
) -> list[Check]:
    descriptor = load_descriptor(model_type, out)
    return verify_descriptor(descriptor, resolve(model_type).config_cls, on_check)
