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
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import black
import jinja2

from . import __version__
from .errors import PuzzleGenError
from .spec import (
    IMPORTED_ORIGIN,
    STATIC_ORIGIN,
    DescriptorSpec,
    SpecError,
    check_renderable,
    is_dotted_path,
    is_identifier,
)

BLACK_MODE = black.Mode(line_length=100, target_versions={black.TargetVersion.PY311})
RUNTIME = "puzzletron_runtime"
_LOCATION = re.compile(r"(?:[\w.-]+/)*([\w.-]+\.py):(\d+)\Z")
_REGEX_ALT = re.compile(r"[A-Za-z0-9_\\.+]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

from .descriptor_view import (  # noqa: E402  (the descriptor's views live beside the spec)
    Target,
    class_expr as _class_expr,
    import_lines as _import_lines,
    is_remote,
    layer_ranges,
    layer_type,
    no_op_views,
    override_groups,
    referenced_classes,
)


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


def _carried_literal(carried) -> str:
    """((index, keyword, position), ...) of the arguments a stand-in hands back, as a literal."""
    items = "".join(
        f"({_pyrepr(int(c.index))}, {_pyrepr(str(c.keyword))}, {_pyrepr(int(c.position))}), "
        for c in carried
    )
    return f"({items.rstrip(' ')})"


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
        carried_literal=_carried_literal,
        location=_location,
        code=lambda s: f"`{s}`",
        class_expr=_class_expr,
        ranges=layer_ranges,
    )
    return env


def command_for(model_type: str, out: str | None, trust_remote_code: bool = False) -> str:
    """The command that regenerates a file; every argument quoted for a shell and free of line
    breaks or control characters (it lands in a comment line)."""
    parts = ["puzzle-gen", "generate", model_type]
    if trust_remote_code:
        parts.append("--trust-remote-code")
    if out:
        parts += ["--out", out]
    for part in parts:
        if _CONTROL.search(part):
            raise PuzzleGenError(f"refusing to write the argument {part!r} into a comment")
    return " ".join(shlex.quote(p) for p in parts)


def spec_command(spec: DescriptorSpec, out: str | None) -> str:
    # a static build of parsed code regenerates without the flag; loading the model still
    # needs the code (requires_trust_remote_code), generating it did not
    return command_for(
        spec.source_argument or spec.model_type, out, spec.code_origin == IMPORTED_ORIGIN
    )


def regenerate_target(descriptor_file: Path) -> tuple[str, bool] | None:
    """(argument, trust_remote_code) of the `# Regenerate:` line of a generated file; None when
    the file or the line is missing."""
    try:
        lines = descriptor_file.read_text(encoding="utf-8").splitlines()[:5]
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        found = regenerate_target_from_line(line)
        if found is not None:
            return found
    return None


def regenerate_target_from_line(line: str) -> tuple[str, bool] | None:
    prefix = "# Regenerate: "
    if not line.startswith(prefix):
        return None
    try:
        words = shlex.split(line[len(prefix) :])
    except ValueError:
        return None
    if words[:2] != ["puzzle-gen", "generate"] or len(words) < 3:
        return None
    return words[2], "--trust-remote-code" in words[3:]


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


def _check(spec: DescriptorSpec) -> None:
    try:
        check_renderable(spec)
    except SpecError as exc:
        raise PuzzleGenError(str(exc)) from None


def render_descriptor(
    spec: DescriptorSpec, out: str | None = None, target: Target = Target()
) -> str:
    """The descriptor module, for this project's runtime unless `target` says otherwise."""
    _check(spec)
    for alt in (
        *spec.predicates.embeddings,
        *spec.predicates.lm_head,
        *spec.predicates.encoders,
        spec.predicates.layer_prefix,
        *spec.predicates.disk_layer_prefixes,
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
    source = (
        _env()
        .get_template("descriptor.py.j2")
        .render(
            **_header(
                target.command or spec_command(spec, out),
                spec.modeling_module,
                spec.transformers_version,
            ),
            spec=spec,
            imports=_import_lines(spec, target),
            **{"registration_name": spec.model_type, "modelopt": None, **target.template_vars},
            no_ops=no_op_views(spec),
            override_groups=override_groups(spec),
            several_kinds=len(spec.kinds) > 1,
            variant_names=[
                v.module for v in spec.config_variants if v.group in ("attention", "ffn")
            ],
            layer_type=layer_type(spec),
            static=spec.code_origin == STATIC_ORIGIN,
            remote_classes=[c for c in referenced_classes(spec) if is_remote(c)],
            top_groups=[
                ("embeddings", spec.predicates.embeddings),
                ("lm_head", spec.predicates.lm_head),
            ]
            + ([("vision_encoding", spec.predicates.encoders)] if spec.predicates.encoders else []),
            layer_groups=[("attention", spec.predicates.attention), ("ffn", spec.predicates.ffn)],
        )
    )
    return _format(source, f"descriptor of {spec.model_type}")


def descriptor_module(spec: DescriptorSpec) -> str:
    return f"{spec.package}_model_descriptor"


def render_package_init(spec: DescriptorSpec, out: str | None = None) -> str:
    _check(spec)
    source = (
        _env()
        .get_template("package_init.py.j2")
        .render(
            **_header(spec_command(spec, out), spec.modeling_module, spec.transformers_version),
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
            families=coverage.by_family(table),
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
    """Write one file via a temp file in the same directory and a rename."""
    write_files({path: text})


def _strerror(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split()) or type(exc).__name__


def check_output_dir(out: Path) -> None:
    """Fail early, with one line, when `out` cannot be a writable output directory: it is a file,
    lies below a file, or its nearest existing ancestor takes no new entries."""
    if out.exists():
        if not out.is_dir():
            raise PuzzleGenError(f"output directory {out} is a file, not a directory")
        probe_dir = out
    else:
        probe_dir = out.parent
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise PuzzleGenError(f"cannot create output directory {out}: {probe_dir} is a file")
    try:  # os.access is not enough (root, read-only mounts, /proc): try a real entry
        os.rmdir(tempfile.mkdtemp(prefix=".puzzle-gen-", dir=probe_dir))
    except OSError as exc:
        what = "write into" if probe_dir == out else "create"
        raise PuzzleGenError(
            f"cannot {what} output directory {out}: {_strerror(exc)} ({probe_dir})"
        ) from None


def write_files(files: dict[Path, str]) -> None:
    """Write every file or none: render each into a temp file beside its target, then rename
    them all into place. On any failure (a full disk, a permission, Ctrl-C) the renames done so
    far are undone from hard-linked backups, temp files and new directories are removed, and
    every file that was there before is byte-identical to what it was."""
    created_dirs: list[Path] = []
    temps: dict[Path, str] = {}
    backups: dict[Path, str] = {}
    done: list[Path] = []
    try:
        for path in files:
            missing = []
            parent = path.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                d.mkdir()
                created_dirs.append(d)
        for path, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            if path.exists() or path.is_symlink():
                if path.is_dir():
                    raise IsADirectoryError(21, "Is a directory", str(path))
                backup = f"{tmp}.orig"
                os.link(path, backup, follow_symlinks=False)
                backups[path] = backup
        for path in files:
            os.replace(temps[path], path)
            del temps[path]
            done.append(path)
    except BaseException as exc:
        for path in reversed(done):
            if path in backups:
                os.replace(backups.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        for tmp in [*temps.values(), *backups.values()]:
            Path(tmp).unlink(missing_ok=True)
        for d in reversed(created_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            where = exc.filename or next(iter(files), "")
            raise PuzzleGenError(
                f"cannot write {where}: {_strerror(exc)}; nothing was written"
            ) from None
        raise
    for backup in backups.values():
        Path(backup).unlink(missing_ok=True)
