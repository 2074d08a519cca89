"""Stage 6: DescriptorSpec -> Jinja (StrictUndefined) -> black -> files, written atomically.

Templates read only the spec; this module adds the few derived views a template cannot compute
cleanly (sorted import lines, expressions for rebuilt buffer modules) and the filters that keep
every string from a config or modeling source safe: `pyrepr` (repr of validated scalars) and
`location` (file:line only).
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import black
import jinja2

from . import __version__
from .errors import PuzzleGenError
from .spec import BufferModule, DescriptorSpec, is_dotted_path, is_identifier

BLACK_MODE = black.Mode(line_length=100, target_versions={black.TargetVersion.PY311})
RUNTIME = "puzzletron_runtime"
_LOCATION = re.compile(r"(?:[\w.-]+/)*([\w.-]+\.py):(\d+)\Z")
_REGEX_ALT = re.compile(r"[A-Za-z0-9_\\.+]+\Z")


def _templates_dir() -> Path:
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates" / "converter.py.j2").is_file():
        return checkout / "templates"  # this source checkout's own (another one may be installed)
    try:
        from importlib.resources import files

        path = Path(str(files("generator.templates")))
        if (path / "descriptor.py.j2").is_file():
            return path
    except (ImportError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "templates"  # a source checkout


def _pyrepr(value: object) -> str:
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        ast.literal_eval(text)  # a literal, nothing else
        return text
    raise PuzzleGenError(f"refusing to render a {type(value).__name__} as a literal")


def _location(where: str) -> str:
    match = _LOCATION.match(where or "")
    if not match:
        raise PuzzleGenError(f"not a source location: {where!r}")
    return f"{match.group(1)}:{match.group(2)}"


def _docline(text: str) -> str:
    """One line of free text made safe inside a triple-quoted docstring."""
    text = " ".join(str(text).split()).rstrip(".")
    return "".join(c for c in text if c.isprintable()).replace("\\", "/").replace('"', "'")


def _owner_expr(b: BufferModule) -> str:
    if b.owner and not is_dotted_path(b.owner):
        raise PuzzleGenError(f"cannot address module {b.owner!r} by attributes")
    return f"model.{b.owner}" if b.owner else "model"


def _buffer_path(b: BufferModule) -> str:
    return f"{b.owner}.{b.attr}" if b.owner else b.attr


def _buffer_args(b: BufferModule) -> str:
    owner = _owner_expr(b)
    parts = []
    for a in b.args:
        if a.kind == "owner_config":
            expr = f"{owner}.config" + (f".{a.path}" if a.path else "")
        elif a.kind == "owner_attr":
            expr = f"{owner}.{a.path}"
        elif a.kind == "literal":
            expr = _pyrepr(a.literal)
        else:
            raise PuzzleGenError(f"unknown buffer argument kind {a.kind!r}")
        if a.path and not is_dotted_path(a.path):
            raise PuzzleGenError(f"bad attribute path {a.path!r}")
        if a.keyword is not None and not is_identifier(a.keyword):
            raise PuzzleGenError(f"bad keyword {a.keyword!r}")
        parts.append(f"{a.keyword}={expr}" if a.keyword else expr)
    return ", ".join(parts)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(
        pyrepr=_pyrepr,
        location=_location,
        owner_expr=_owner_expr,
        buffer_path=_buffer_path,
        buffer_args=_buffer_args,
        code=lambda s: f"`{s}`",
        docline=_docline,
    )
    return env


def _sort_names(names) -> list[str]:
    def key(n: str):
        rank = 0 if n.isupper() else 1 if n[:1].isupper() else 2
        return rank, n.lower()

    return sorted(set(names), key=key)


def _runtime_module(submodule: str) -> str:
    return f"{RUNTIME}.{submodule}"


def _import_lines(
    spec: DescriptorSpec, module_for=_runtime_module, extra_first=None, stdlib=()
) -> list[str]:
    """Sorted import lines; `module_for` names the module of one of our runtime's submodules
    (another target's, see generator/modelopt.py), `extra_first` adds names from them."""
    third: dict[str, set[str]] = {"torch": {"nn"}}
    for ref in spec.decoder_layer_classes:
        third.setdefault(ref.module, set()).add(ref.name)
    for b in spec.buffer_modules:
        third.setdefault(b.cls.module, set()).add(b.cls.name)
    no_op = {r.replacement for sb in (spec.attention, spec.ffn) for r in sb.replacements}
    if any(r.tuple_size for sb in (spec.attention, spec.ffn) for r in sb.replacements):
        no_op.add("return_tuple_of_size")
    first: dict[str, set[str]] = {
        module_for("block_config"): {"BlockConfig"},
        module_for("model_descriptor"): {"ModelDescriptor", "ModelDescriptorFactory"},
    }
    if no_op:
        first[module_for("puzzformer.no_op")] = no_op
    if spec.dummy_block.returns_tuple or spec.dummy_block.attributes:
        first[module_for("utils.dummy_modules")] = {"DummyBlock"}
    for submodule, names in (extra_first or {}).items():
        first.setdefault(module_for(submodule), set()).update(names)
    for module, names in list(third.items()) + list(first.items()):
        if not is_dotted_path(module.lstrip(".")) or not all(is_identifier(n) for n in names):
            raise PuzzleGenError(f"refusing to import {sorted(names)} from {module!r}")
    lines = ["import re", *stdlib, "from typing import Any", ""]
    for group in (third, first):
        for module in sorted(group):
            lines.append(f"from {module} import {', '.join(_sort_names(group[module]))}")
        lines.append("")
    return lines[:-1]


@dataclass(frozen=True)
class _SubblockView:
    title: str
    method: str
    spec: object


def command_for(model_type: str, out: str | None) -> str:
    return f"puzzle-gen generate {model_type}" + (f" --out {out}" if out else "")


def _format(source: str, name: str) -> str:
    try:
        return black.format_str(source, mode=BLACK_MODE)
    except Exception as exc:  # a template bug: show what failed
        raise PuzzleGenError(f"black cannot format the rendered {name}: {exc}") from None


def _header(command: str, source_module: str | None, transformers_version: str) -> dict:
    return dict(
        generator_version=__version__,
        transformers_version=transformers_version,
        source_module=source_module,
        command=command,
    )


def render_descriptor(
    spec: DescriptorSpec,
    out: str | None = None,
    *,
    module_for=_runtime_module,
    registration_name: str | None = None,
    pruning=None,
    command: str | None = None,
) -> str:
    """The descriptor module. The defaults render for our runtime; generator/modelopt.py passes
    Model Optimizer's modules, its registration name and pruning layer descriptors."""
    for alt in (
        *spec.predicates.embeddings,
        *spec.predicates.lm_head,
        spec.predicates.layer_prefix,
        *spec.predicates.attention,
        *spec.predicates.ffn,
    ):
        if not _REGEX_ALT.match(alt):
            raise PuzzleGenError(f"refusing to render the regex alternative {alt!r}")
    for path in (spec.layer_stack, spec.input_embedding, spec.output_embedding):
        if not is_dotted_path(path, allow_digits=True):
            raise PuzzleGenError(f"refusing to render the module path {path!r}")
    if not is_identifier(spec.class_name):
        raise PuzzleGenError(f"refusing to render the class name {spec.class_name!r}")
    layer_types = [c.name for c in spec.decoder_layer_classes]
    exports = [spec.class_name]
    extra_first: dict[str, set[str]] = {}
    stdlib: tuple[str, ...] = ()
    if pruning is not None and (pruning.ffn or pruning.kv_heads):
        stdlib = ("from dataclasses import dataclass, field",)
        if pruning.ffn:
            exports.append(f"{spec.class_name[:-len('ModelDescriptor')]}FFNIntermediateLayerDescriptor")
            extra_first["pruning.ffn_intermediate_pruning_mixin"] = {
                "FFNIntermediateLayerDescriptor",
                "FFNIntermediatePruningMixIn",
            }
        if pruning.kv_heads:
            exports.append(f"{spec.class_name[:-len('ModelDescriptor')]}KVHeadsLayerDescriptor")
            extra_first["pruning.kv_heads_pruning_mixin"] = {
                "KVHeadsLayerDescriptor",
                "KVHeadsPruningMixIn",
            }
    source = (
        _env()
        .get_template("descriptor.py.j2")
        .render(
            **_header(
                command or command_for(spec.model_type, out),
                spec.modeling_module,
                spec.transformers_version,
            ),
            spec=spec,
            registration_name=registration_name or spec.model_type,
            exports=exports,
            pruning=pruning,
            ffn_mixin_key="ffn_intermediate",
            kv_mixin_key="kv_heads",
            prefix=spec.class_name[: -len("ModelDescriptor")],
            imports=_import_lines(spec, module_for, extra_first, stdlib),
            subblocks=[
                _SubblockView("Attention", "attn_no_op_post_init", spec.attention),
                _SubblockView("FFN", "mlp_no_op_post_init", spec.ffn),
            ],
            overrides=[*spec.attention.overrides, *spec.ffn.overrides],
            layer_type=layer_types[0] if len(layer_types) == 1 else "nn.Module",
            top_groups=[
                ("embeddings", spec.predicates.embeddings),
                ("lm_head", spec.predicates.lm_head),
            ],
            layer_groups=[("attention", spec.predicates.attention), ("ffn", spec.predicates.ffn)],
        )
    )
    return _format(source, f"descriptor of {spec.model_type}")


def render_converter(
    spec: DescriptorSpec,
    out: str | None = None,
    *,
    module_for=_runtime_module,
    registration_name: str | None = None,
    converter_class: str | None = None,
    command: str | None = None,
) -> str:
    """The converter module: `create_block_configs_from_main_config(config)`, one block config
    per layer. For our runtime a plain class; for Model Optimizer (a `module_for` that names its
    `converter` module) a registered `Converter` subclass."""
    from .modelopt import block_config_tree, converter_fields

    fields = converter_fields(spec)
    tree = block_config_tree(fields)
    if not is_identifier(spec.num_layers_field) or (
        spec.text_config_attr and not is_identifier(spec.text_config_attr)
    ):
        raise PuzzleGenError("refusing to render the layer-count or text-config attribute")
    classes = {"BlockConfig", "AttentionConfig", "FFNConfig"}
    if "moe" in tree.get("ffn", {}):
        classes.add("MoEConfig")
    converter_module = None if module_for is _runtime_module else module_for("converter")
    first = {module_for("block_config"): classes}
    if converter_module:
        first[converter_module] = {"Converter", "ConverterFactory"}
    lines = ["from typing import Any", "", "from transformers import PretrainedConfig", ""]
    for module in sorted(first):
        if not is_dotted_path(module.lstrip(".")):
            raise PuzzleGenError(f"refusing to import from {module!r}")
        lines.append(f"from {module} import {', '.join(_sort_names(first[module]))}")
    name = converter_class or spec.class_name[: -len("ModelDescriptor")] + "Converter"
    if not is_identifier(name):
        raise PuzzleGenError(f"refusing to render the class name {name!r}")
    source = (
        _env()
        .get_template("converter.py.j2")
        .render(
            **_header(
                command or command_for(spec.model_type, out),
                spec.modeling_module,
                spec.transformers_version,
            ),
            spec=spec,
            fields=fields,
            tree=tree,
            imports=lines,
            converter_base=converter_module is not None,
            converter_class=name,
            registration_name=registration_name or spec.model_type,
        )
    )
    return _format(source, f"converter of {spec.model_type}")


def converter_module(spec: DescriptorSpec) -> str:
    return f"{spec.package}_converter"


def descriptor_module(spec: DescriptorSpec) -> str:
    return f"{spec.package}_model_descriptor"


def render_package_init(spec: DescriptorSpec, out: str | None = None) -> str:
    source = (
        _env()
        .get_template("package_init.py.j2")
        .render(
            **_header(
                command_for(spec.model_type, out), spec.modeling_module, spec.transformers_version
            ),
            spec=spec,
            module=descriptor_module(spec),
        )
    )
    return _format(source, f"package of {spec.model_type}")


@dataclass(frozen=True)
class ManifestEntry:
    model_type: str
    package: str
    class_name: str


def render_generated_init(
    entries: list[ManifestEntry], transformers_version: str, out: str | None = None
) -> str:
    for e in entries:
        if not (is_identifier(e.package) and is_identifier(e.class_name)):
            raise PuzzleGenError(f"bad manifest entry {e}")
    source = (
        _env()
        .get_template("generated_init.py.j2")
        .render(
            **_header(_refresh_command(out), None, transformers_version),
            entries=sorted(entries, key=lambda e: e.model_type),
        )
    )
    return _format(source, "generated package")


def render_coverage(
    entries: list[ManifestEntry],
    known: list[str],
    transformers_version: str,
    out: str | None = None,
    rows: dict | None = None,
) -> str:
    """COVERAGE.md: one row per known model type, from the coverage facts (`rows`, by model
    type; see generator/coverage.py). A generated type without a row is "unverified"; any
    other type without one is "not generated"."""
    from . import coverage

    rows = dict(rows or {})
    descriptors = {e.model_type: f"{e.package}.{e.class_name}" for e in entries}
    table = []
    for t in sorted(set(known) | set(descriptors)):  # a checkpoint's own type may be unknown
        row = rows.get(t)
        if row is None:
            row = (
                coverage.Row(t, coverage.UNVERIFIED)
                if t in descriptors
                else coverage.Row(t, coverage.NOT_GENERATED, "not tried: run generate --all")
            )
        table.append(row)
    out_of_scope = [r for r in table if r.status == coverage.OUT_OF_SCOPE]
    in_scope = [r.model_type for r in table if r.status != coverage.OUT_OF_SCOPE]
    return (
        _env()
        .get_template("COVERAGE.md.j2")
        .render(
            **_header(_coverage_command(out), None, transformers_version),
            rows=table,
            known=known,
            descriptors=descriptors,
            counts=coverage.summary({r.model_type: r for r in table}, in_scope),
            in_scope=len(in_scope),
            out_of_scope=len(out_of_scope),
        )
    )


def _coverage_command(out: str | None) -> str:
    flag = f" --out {out}" if out else ""
    return f"puzzle-gen generate --all{flag} && puzzle-gen verify --all{flag}"


def _refresh_command(out: str | None) -> str:
    return (
        "puzzle-gen generate MODEL_TYPE..."
        + (f" --out {out}" if out else "")
        + " (any model type refreshes this file)"
    )


def read_manifest(init_path: Path) -> list[ManifestEntry]:
    """The `_DESCRIPTORS` table of an existing generated/__init__.py, read without importing it."""
    if not init_path.is_file():
        return []
    try:
        tree = ast.parse(init_path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_DESCRIPTORS" for t in node.targets
            ):
                table = ast.literal_eval(node.value)
                return [ManifestEntry(k, v[0], v[1]) for k, v in table.items()]
    except (SyntaxError, ValueError, IndexError, TypeError) as exc:
        raise PuzzleGenError(f"cannot read the descriptor table of {init_path}: {exc}") from None
    raise PuzzleGenError(
        f"{init_path} has no _DESCRIPTORS table; is this a puzzle-gen output directory?"
    )


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
