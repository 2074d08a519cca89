"""The descriptor for Model Optimizer (its import lines, what our runtime has and Model
Optimizer does not written inline, the pruning layer descriptors), and the plan of every file one
`generate --target/--layout` writes."""

from __future__ import annotations

from dataclasses import dataclass

from ..descriptor_view import no_op_names
from ..errors import PuzzleGenError
from ..spec import DescriptorSpec, is_identifier
from .converter import converter_module, render_converter
from .kind_reads import no_op_stand_ins
from .names import (
    EXPERTS_MIXIN_KEY,
    FFN_MIXIN_KEY,
    KV_MIXIN_KEY,
    MODELOPT,
    MODELOPT_TREE,
    check_target,
    command,
    module_for,
    names_for,
    target_spec,
)
from .pruning import infer_pruning
from .pruning_layers import Pruning, check_pruning_names


def _docline(text: str) -> str:
    """One line of free text made safe inside a triple-quoted docstring."""
    text = " ".join(str(text).split()).rstrip(".")
    return "".join(c for c in text if c.isprintable()).replace("\\", "/").replace('"', "'")


@dataclass(frozen=True)
class ModeloptView:
    """What templates/modelopt_descriptor.py.j2 reads (the `modelopt` template variable)."""

    prefix: str  # the descriptor class name without ModelDescriptor
    exports: tuple[str, ...]  # the layer descriptor classes, for __all__
    pruning: Pruning
    ffn_mixin_key: str
    kv_mixin_key: str
    experts_mixin_key: str
    pruning_notes: tuple[str, ...]  # docstring lines: why a mixin is missing
    ffn_evidence: str
    kv_evidence: str
    experts_evidence: str
    dummy_returns_tuple: bool
    dummy_attributes: tuple[str, ...]
    rebuild_buffers: bool  # write _rebuild_buffers into the module
    pass_residual: bool  # write PassResidual into the module
    projected_zeros: bool  # write ProjectedZeros into the module
    list_of_size: bool  # write return_list_of_size into the module
    tuple_carrying: bool  # write return_tuple_carrying into the module
    move_to_sole_subblock: bool  # write _move_to_sole_subblock into the module
    group_by_layer_kind: bool  # write _split_roles and _group_by_layer_kind into the module


def descriptor_target(spec: DescriptorSpec, layout: str, pruning: Pruning, command_line: str):
    """The render.Target of a Model Optimizer descriptor: its import lines (Model Optimizer,
    transformers and torch only), what our runtime has and Model Optimizer does not written
    inline (the buffer rebuild, PassResidual, return_list_of_size, return_tuple_carrying, the move of a layer's tensors to its sole
    subblock), and the pruning layer descriptors."""
    from ..render import Target

    check_pruning_names(pruning)
    nested = [o.config_field for o in spec.overrides if "." in o.config_field]
    if nested:
        # Model Optimizer's patcher applies overrides with `config.update(overrides)`, which
        # sets an attribute named "attn_config.kv_n_heads": the layer would silently keep the
        # sub-config's value. Our runtime's patcher sets the sub-config's field.
        raise PuzzleGenError(
            f"{spec.model_type}: no Model Optimizer descriptor: its overrides set sub-config "
            f"fields ({', '.join(nested)}), which Model Optimizer's deci_x_patcher "
            "(config.update) cannot set"
        )
    names = names_for(spec, MODELOPT)
    # every dummy block carries the layer's weightless structure (the template's _carry_structure)
    first: dict[str, frozenset[str]] = {"utils.dummy_modules": frozenset({"DummyBlock"})}
    exports = []
    if pruning.ffn:
        exports.append(f"{names.prefix}FFNIntermediateLayerDescriptor")
        first["pruning.ffn_intermediate_pruning_mixin"] = frozenset(
            {"FFNIntermediateLayerDescriptor", "FFNIntermediatePruningMixIn"}
        )
    if pruning.kv_heads:
        exports.append(f"{names.prefix}KVHeadsLayerDescriptor")
        first["pruning.kv_heads_pruning_mixin"] = frozenset(
            {"KVHeadsLayerDescriptor", "KVHeadsPruningMixIn"}
        )
    if pruning.experts:
        exports.append(f"{names.prefix}ExpertRemovalLayerDescriptor")
        first["pruning.expert_removal_pruning_mixin"] = frozenset(
            {"ExpertRemovalLayerDescriptor", "ExpertRemovalPruningMixIn"}
        )
    notes = []
    if pruning.ffn_reason:
        notes.append(f"No FFN-intermediate pruning: {_docline(pruning.ffn_reason)}.")
    if pruning.kv_reason:
        notes.append(f"No KV-heads pruning: {_docline(pruning.kv_reason)}.")
    if pruning.experts_reason:
        notes.append(f"No expert removal: {_docline(pruning.experts_reason)}.")
    returns_tuple, attributes = spec.dummy_block.returns_tuple, spec.dummy_block.attributes
    for a in attributes:
        if not is_identifier(a):
            raise PuzzleGenError(f"refusing to render the layer attribute {a!r}")
    has_rebuild = bool(spec.rebuilt_buffers)
    pass_residual = "PassResidual" in no_op_stand_ins(spec)
    view = ModeloptView(
        prefix=names.prefix,
        exports=tuple(exports),
        pruning=pruning,
        ffn_mixin_key=FFN_MIXIN_KEY,
        kv_mixin_key=KV_MIXIN_KEY,
        experts_mixin_key=EXPERTS_MIXIN_KEY,
        pruning_notes=tuple(notes),
        ffn_evidence=_docline("; ".join(pruning.ffn.evidence)) if pruning.ffn else "",
        kv_evidence=_docline("; ".join(pruning.kv_heads.evidence)) if pruning.kv_heads else "",
        experts_evidence=(_docline("; ".join(pruning.experts.evidence)) if pruning.experts else ""),
        dummy_returns_tuple=returns_tuple,
        dummy_attributes=attributes,
        rebuild_buffers=has_rebuild,
        pass_residual=pass_residual,
        projected_zeros="ProjectedZeros" in no_op_stand_ins(spec),
        list_of_size="return_list_of_size" in no_op_names(spec),
        tuple_carrying="return_tuple_carrying" in no_op_names(spec),
        move_to_sole_subblock=bool(spec.predicates.followers),
        group_by_layer_kind=bool(spec.predicates.by_kind),
    )
    return Target(
        module_for=lambda sub: module_for(sub, MODELOPT, layout),
        third_party={"transformers": frozenset({"PreTrainedModel"})} if has_rebuild else {},
        first_party=first,
        stdlib=("from dataclasses import dataclass, field",) if exports else (),
        command=command_line,
        inline=frozenset(
            {
                "rebuild_buffers",
                "PassResidual",
                "ProjectedZeros",
                "return_list_of_size",
                "return_tuple_carrying",
                "move_to_sole_subblock",
                "group_by_layer_kind",
            }
        ),
        template_vars={"registration_name": names.registration, "modelopt": view},
    )


# -- planning the files of one target / layout -------------------------------------------------


def plan_target(
    targets: list, out: str, out_flag: str | None, target: str, layout: str, progress
) -> dict:
    """Every file `generate --target/--layout` writes, rendered in memory. Nothing here touches
    generated/'s table or coverage: those describe the default target."""
    from pathlib import Path

    from .. import render
    from ..infer import infer

    target = check_target(target, layout)
    out_dir = Path(out) / "models" if layout == MODELOPT_TREE else Path(out)
    files: dict[Path, str] = {}
    for i, argument in enumerate(targets, 1):
        label = getattr(argument, "argument", None) or getattr(argument, "model_type", argument)
        progress(f"[{i}/{len(targets)}] {label}: inferring")
        spec = infer(argument)
        names = names_for(spec, target)
        tspec = target_spec(spec, target)
        cmd = command(spec, out_flag, target, layout)
        model_type = spec.model_type
        if target == MODELOPT:
            progress(f"    {model_type}: tracing a tiny model for pruning layer descriptors")
            descriptor_as = descriptor_target(spec, layout, infer_pruning(spec), cmd)
        else:
            descriptor_as = render.Target(command=cmd)
        pkg = out_dir / names.package
        files[pkg / f"{render.descriptor_module(tspec)}.py"] = render.render_descriptor(
            tspec, out_flag, descriptor_as
        )
        converter = None
        try:
            text = render_converter(spec, target=target, layout=layout, command_line=cmd)
            converter = converter_module(spec, target)
            files[pkg / f"{converter}.py"] = text
        except PuzzleGenError as exc:
            progress(f"    {exc}")
        modeling_module, version = spec.modeling_module, spec.transformers_version
        files[pkg / "__init__.py"] = render._format(
            render._env()
            .get_template("modelopt_init.py.j2")
            .render(
                **render._header(cmd, modeling_module, version),
                model_type=model_type,
                registration_name=names.registration,
                module=render.descriptor_module(tspec),
                converter=converter,
            ),
            f"package of {model_type}",
        )
        if layout == MODELOPT_TREE:
            progress(
                f"    {model_type}: add `from .{names.package} import *` to "
                "modelopt/torch/puzzletron/anymodel/models/__init__.py"
            )
    return files
