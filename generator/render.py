"""Stage 6: DescriptorSpec -> Jinja (StrictUndefined) -> black -> files, written atomically.

Templates read only the spec; this module adds the few derived views a template cannot compute
cleanly (sorted import lines) and the filters that keep every string from a config or modeling
source safe: `pyrepr` (repr of validated scalars) and
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
from .spec import DescriptorSpec, is_dotted_path, is_identifier

BLACK_MODE = black.Mode(line_length=100, target_versions={black.TargetVersion.PY311})
RUNTIME = "puzzletron_runtime"
_LOCATION = re.compile(r"(?:[\w.-]+/)*([\w.-]+\.py):(\d+)\Z")
_REGEX_ALT = re.compile(r"[A-Za-z0-9_\\.+]+\Z")


def _templates_dir() -> Path:
    # a source checkout first: an editable install elsewhere (another worktree) must not supply
    # the templates of this checkout's generator
    checkout = Path(__file__).resolve().parent.parent / "templates"
    if (checkout / "descriptor.py.j2").is_file() and (checkout / "__init__.py").is_file():
        return checkout
    try:
        from importlib.resources import files

        path = Path(str(files("generator.templates")))
        if (path / "descriptor.py.j2").is_file():
            return path
    except (ImportError, TypeError):
        pass
    return checkout


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
        code=lambda s: f"`{s}`",
    )
    return env


def _sort_names(names) -> list[str]:
    def key(n: str):
        rank = 0 if n.isupper() else 1 if n[:1].isupper() else 2
        return rank, n.lower()

    return sorted(set(names), key=key)


def _import_lines(spec: DescriptorSpec) -> list[str]:
    third: dict[str, set[str]] = {"torch": {"nn"}}
    for ref in spec.decoder_layer_classes:
        third.setdefault(ref.module, set()).add(ref.name)
    no_op = {r.replacement for sb in (spec.attention, spec.ffn) for r in sb.replacements}
    if any(r.tuple_size for sb in (spec.attention, spec.ffn) for r in sb.replacements):
        no_op.add("return_tuple_of_size")
    first: dict[str, set[str]] = {
        f"{RUNTIME}.block_config": {"BlockConfig"},
        f"{RUNTIME}.model_descriptor": {"ModelDescriptor", "ModelDescriptorFactory"},
    }
    if no_op:
        first[f"{RUNTIME}.puzzformer.no_op"] = no_op
    if spec.dummy_block.returns_tuple or spec.dummy_block.attributes:
        first[f"{RUNTIME}.utils.dummy_modules"] = {"DummyBlock"}
    if spec.rebuilt_buffers:
        first[f"{RUNTIME}.buffers"] = {"rebuild_buffers"}
    for module, names in list(third.items()) + list(first.items()):
        if not is_dotted_path(module) or not all(is_identifier(n) for n in names):
            raise PuzzleGenError(f"refusing to import {sorted(names)} from {module!r}")
    lines = ["import re", "from typing import Any", ""]
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


def render_descriptor(spec: DescriptorSpec, out: str | None = None) -> str:
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
    for v in spec.config_variants:
        if not is_dotted_path(v.module) or (v.flag is not None and not is_identifier(v.flag)):
            raise PuzzleGenError(f"refusing to render the config variant {v.module!r}")
        if v.group not in ("", "attention", "ffn", "embeddings", "lm_head"):
            raise PuzzleGenError(f"unknown weight group {v.group!r}")
    for b in spec.rebuilt_buffers:
        names = (*b.buffers, b.init_class)
        if (b.module and not is_dotted_path(b.module, allow_digits=True)) or not all(
            is_identifier(n) for n in names
        ):
            raise PuzzleGenError(f"refusing to render the buffers {b.module!r}: {names!r}")
    layer_types = [c.name for c in spec.decoder_layer_classes]
    source = (
        _env()
        .get_template("descriptor.py.j2")
        .render(
            **_header(
                command_for(spec.model_type, out), spec.modeling_module, spec.transformers_version
            ),
            spec=spec,
            imports=_import_lines(spec),
            subblocks=[
                _SubblockView("Attention", "attn_no_op_post_init", spec.attention),
                _SubblockView("FFN", "mlp_no_op_post_init", spec.ffn),
            ],
            overrides=[*spec.attention.overrides, *spec.ffn.overrides],
            variant_names=[
                v.module for v in spec.config_variants if v.group in ("attention", "ffn")
            ],
            layer_type=layer_types[0] if len(layer_types) == 1 else "nn.Module",
            top_groups=[
                ("embeddings", spec.predicates.embeddings),
                ("lm_head", spec.predicates.lm_head),
            ],
            layer_groups=[("attention", spec.predicates.attention), ("ffn", spec.predicates.ffn)],
        )
    )
    return _format(source, f"descriptor of {spec.model_type}")


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
) -> str:
    done = {e.model_type for e in entries}
    return (
        _env()
        .get_template("COVERAGE.md.j2")
        .render(
            **_header(_refresh_command(out), None, transformers_version),
            entries=sorted(entries, key=lambda e: e.model_type),
            known=known,
            missing=[t for t in known if t not in done],
        )
    )


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
