"""Targets, layouts, converters and pruning layer descriptors for NVIDIA Model Optimizer.

A descriptor is rendered for one *target*, the package its import lines name:

- ``puzzletron``: this project's runtime (``puzzletron_runtime``), what ``generated/`` holds;
- ``modelopt``: Model Optimizer's own API (``modelopt.torch.puzzletron``), the same descriptor
  with other import lines, plus what Model Optimizer has and our runtime does not (a ``Converter``
  base class and ``ConverterFactory`` registration, pruning layer descriptors and
  ``pruning_mixins()``), and what our runtime has and Model Optimizer does not, written into the
  generated module itself (the buffer rebuild, a dummy block returning a tuple): a Model
  Optimizer descriptor imports only Model Optimizer, transformers and torch.

and in one *layout* (``package``, the default, or ``modelopt-tree``, the files of a pull request
to Model Optimizer).

The package holds one fact per module:

- ``names``: targets, layouts, the modules a generated file imports, the registration rule;
- ``kind_reads``: what is read of a spec's layer kinds beyond their plain fields;
- ``converter`` (with ``size_probe``, its rules for sizes a config does not hold as numbers):
  ``create_block_configs_from_main_config``;
- ``pruning`` (with ``traced``: FFN and KV heads; ``experts``: expert removal;
  ``pruning_layers``: the records): the pruning layer descriptors;
- ``descriptor``: the Model Optimizer descriptor and the plan of the files of one target/layout.
"""

from .converter import (
    ConverterField,
    KindBlock,
    converter_module,
    kind_blocks,
    package_extras,
    render_converter,
)
from .descriptor import ModeloptView, descriptor_target, plan_target
from .kind_reads import (
    first_layer_of,
    kind_condition,
    kind_cores,
    kind_holds,
    kind_override,
    kind_overrides,
    kind_weight_modules,
)
from .names import (
    LAYOUTS,
    MODELOPT,
    MODELOPT_REGISTERED,
    MODELOPT_TREE,
    PACKAGE,
    PUZZLETRON,
    TAKEN_SUFFIX,
    TARGETS,
    Names,
    check_target,
    command,
    module_for,
    names_for,
    registration_name,
    target_spec,
)
from .pruning import infer_pruning
from .pruning_layers import ExpertsLayer, FFNLayer, KVHeadsLayer, Pruning, check_pruning_names
from .size_probe import SizeProbe
from .traced import tiny_model

__all__ = [
    "LAYOUTS", "MODELOPT", "MODELOPT_REGISTERED", "MODELOPT_TREE", "PACKAGE", "PUZZLETRON",
    "TAKEN_SUFFIX", "TARGETS", "ConverterField", "ExpertsLayer", "FFNLayer", "KVHeadsLayer",
    "KindBlock", "ModeloptView", "Names", "Pruning", "SizeProbe", "check_pruning_names",
    "check_target", "command", "converter_module", "descriptor_target", "first_layer_of",
    "infer_pruning", "kind_blocks", "kind_condition", "kind_cores", "kind_holds", "kind_override",
    "kind_overrides", "kind_weight_modules", "module_for", "names_for", "package_extras",
    "plan_target", "registration_name", "render_converter", "target_spec", "tiny_model",
]  # fmt: skip
