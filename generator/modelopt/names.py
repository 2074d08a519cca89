"""Targets, layouts and the names a generated module registers and imports.

A descriptor is rendered for one *target*, the package its import lines name (``puzzletron``:
this project's runtime; ``modelopt``: Model Optimizer's ``modelopt.torch.puzzletron``), in one
*layout* (``package``: absolute imports; ``modelopt-tree``: the files of a pull request to Model
Optimizer, with relative imports; implies the ``modelopt`` target).

Registration names (the rule): a descriptor and its converter register under the model type,
unless Model Optimizer already registers that name (``MODELOPT_REGISTERED``; its factories raise
on a second class under a taken name), in which case they register as ``<model_type>_generated``,
and the package and class names follow (``llama_generated``,
``LlamaGeneratedModelDescriptor``), so that Model Optimizer's own model and ours import side by
side. The default target registers in our own factory and keeps the model type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import PuzzleGenError
from ..spec import DescriptorSpec, is_identifier

PUZZLETRON = "puzzletron"
MODELOPT = "modelopt"
TARGETS = (PUZZLETRON, MODELOPT)
PACKAGE = "package"
MODELOPT_TREE = "modelopt-tree"
LAYOUTS = (PACKAGE, MODELOPT_TREE)

RUNTIME = "puzzletron_runtime"
MODELOPT_ROOT = "modelopt.torch.puzzletron"

# Names nvidia-modelopt 0.47 registers in ModelDescriptorFactory and ConverterFactory (a test in
# the Model Optimizer environment compares this with the installed factories).
MODELOPT_REGISTERED = frozenset(
    {
        "gpt_oss",
        "llama",
        "mistral_small",
        "nemotron_h",
        "nemotron_h_v2",
        "qwen2",
        "qwen3",
        "qwen3_vl",
    }
)
TAKEN_SUFFIX = "_generated"

# our runtime's submodule -> (Model Optimizer absolute module, relative from models/<name>/).
# puzzletron_runtime.buffers has no counterpart: the modelopt target writes the rebuild inline.
_MODULES = {
    "block_config": (f"{MODELOPT_ROOT}.block_config", "....block_config"),
    "model_descriptor": (f"{MODELOPT_ROOT}.anymodel.model_descriptor", "...model_descriptor"),
    "puzzformer.no_op": (f"{MODELOPT_ROOT}.anymodel.puzzformer.no_op", "...puzzformer.no_op"),
    "utils.dummy_modules": (f"{MODELOPT_ROOT}.utils.dummy_modules", "....utils.dummy_modules"),
    "converter": (f"{MODELOPT_ROOT}.anymodel.converter", "...converter"),
    "pruning.ffn_intermediate_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.ffn_intermediate_pruning_mixin",
        "....pruning.ffn_intermediate_pruning_mixin",
    ),
    "pruning.kv_heads_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.kv_heads_pruning_mixin",
        "....pruning.kv_heads_pruning_mixin",
    ),
    "pruning.expert_removal_pruning_mixin": (
        f"{MODELOPT_ROOT}.pruning.expert_removal_pruning_mixin",
        "....pruning.expert_removal_pruning_mixin",
    ),
}

# pruning_mixins() keys: Model Optimizer's own descriptors use "kv_heads" and
# "experts_removal"; FFN width pruning has no key there yet, so we name it after its mixin.
FFN_MIXIN_KEY = "ffn_intermediate"
KV_MIXIN_KEY = "kv_heads"
EXPERTS_MIXIN_KEY = "experts_removal"


def check_target(target: str, layout: str) -> str:
    """The effective target: modelopt-tree implies modelopt; refuse a contradiction."""
    if target not in TARGETS:
        raise PuzzleGenError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise PuzzleGenError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == MODELOPT_TREE and target != MODELOPT:
        raise PuzzleGenError(
            "--layout modelopt-tree writes Model Optimizer files: use --target modelopt"
        )
    return target


def module_for(submodule: str, target: str, layout: str = PACKAGE) -> str:
    """The module a generated file imports for our runtime's `submodule` under `target`."""
    if target == PUZZLETRON:
        if submodule.startswith("pruning.") or submodule == "converter":
            raise PuzzleGenError(f"{RUNTIME} has no {submodule} module")
        return f"{RUNTIME}.{submodule}"
    if submodule not in _MODULES:
        raise PuzzleGenError(
            f"Model Optimizer has no counterpart of {RUNTIME}.{submodule}: a Model Optimizer "
            "descriptor cannot import it"
        )
    absolute, relative = _MODULES[submodule]
    return relative if layout == MODELOPT_TREE else absolute


def registration_name(model_type: str, target: str) -> str:
    if target == MODELOPT and model_type in MODELOPT_REGISTERED:
        return model_type + TAKEN_SUFFIX
    return model_type


@dataclass(frozen=True)
class Names:
    registration: str
    package: str
    descriptor_class: str
    converter_class: str

    @property
    def prefix(self) -> str:
        return self.descriptor_class[: -len("ModelDescriptor")]


def names_for(spec: DescriptorSpec, target: str) -> Names:
    model_type, package, cls = spec.model_type, spec.package, spec.class_name
    registration = registration_name(model_type, target)
    if not cls.endswith("ModelDescriptor"):
        raise PuzzleGenError(f"descriptor class {cls!r} does not end in ModelDescriptor")
    if registration != model_type:
        package = f"{package}{TAKEN_SUFFIX}"
        cls = cls[: -len("ModelDescriptor")] + "GeneratedModelDescriptor"
    prefix = cls[: -len("ModelDescriptor")]
    result = Names(registration, package, cls, f"{prefix}Converter")
    for ident in (result.package, result.descriptor_class, result.converter_class):
        if not is_identifier(ident):
            raise PuzzleGenError(f"refusing to render the name {ident!r}")
    return result


def target_spec(spec: DescriptorSpec, target: str) -> DescriptorSpec:
    """The spec with the package and class names of `target` (see the registration rule)."""
    n = names_for(spec, target)
    return dataclasses.replace(spec, package=n.package, class_name=n.descriptor_class)


def command(spec: DescriptorSpec, out: str | None, target: str, layout: str) -> str:
    """The command line that regenerates a file of `target` / `layout` (its header says it)."""
    from ..render import spec_command

    base = spec_command(spec, None)
    out_flag = spec_command(spec, out)[len(base) :]  # " --out DIR", quoted and checked
    flags = f" --target {target}" if target != PUZZLETRON else ""
    flags += f" --layout {layout}" if layout != PACKAGE else ""
    return base + flags + out_flag
