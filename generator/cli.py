"""The `puzzle-gen` command line.

    puzzle-gen generate MODEL_TYPE|PATH... | --all [--out DIR] [--diff] [--jobs N] [--trust-remote-code]
                        [--target puzzletron|modelopt] [--layout package|modelopt-tree]
    puzzle-gen check [--out DIR] [--jobs N]
    puzzle-gen inspect MODEL_TYPE|PATH [--json] [--trust-remote-code]
    puzzle-gen verify MODEL_TYPE... [--out DIR]

PATH is a local checkpoint directory (config.json and safetensors files); its own code
(config.json's auto_map) is parsed, and imported only with --trust-remote-code.
User errors are one line on stderr with exit code 1 (2 for an unknown model type or bad usage,
130 for Ctrl-C), never a traceback; nothing is written unless every requested target succeeds,
and the files already in the output directory stay byte-identical on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import signal
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import PuzzleGenError, UsageError

DEFAULT_OUT = "generated"


def _progress(message: str) -> None:
    _stop_if_interrupted()
    print(message, file=sys.stderr, flush=True)


# Ctrl-C raises KeyboardInterrupt wherever the interpreter is, and one raised inside a __del__
# or a weakref callback (a temporary directory or a tensor being freed) is printed and dropped:
# the work would go on and write its files. The handler also records it, and every progress
# line and every write checks the record first.
_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _stop_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sticky_interrupts():
    """Install `_on_sigint` while the CLI runs, where Ctrl-C has Python's default handler (not
    where the caller chose to ignore it, or off the main thread)."""
    global _interrupted
    _interrupted = False
    installed = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if installed:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _out_arg(out: str) -> str | None:
    """The --out value recorded in regenerate commands (None for the default)."""
    return None if Path(out) == Path(DEFAULT_OUT) else out


def plan(
    model_types: list,
    out: str,
    keep_existing: bool = True,
    keep_going: bool = False,
    jobs: int | None = 1,
    target: str = "puzzletron",
    layout: str = "package",
) -> dict[Path, str]:
    """Every file `generate` would write for `model_types` (names, or checkpoint targets from
    `source.resolve_target`) under `out`, rendered in memory.

    With `keep_going`, a model type that cannot be generated is recorded in coverage.json (the
    fact that could not be inferred, or why it is out of scope) instead of stopping the rest.
    With `jobs` other than 1 (None: every available core) model types are inferred in worker
    processes; files, their order and the progress printed are the same as with jobs=1.
    Another `target` / `layout` than the default (Model Optimizer's files) is planned by
    generator/modelopt/ and never touches the descriptor table or coverage."""
    import transformers

    from . import coverage, render
    from .source import known_model_types

    out_dir = Path(out)
    out_flag = _out_arg(out)
    if (target, layout) != ("puzzletron", "package"):
        from .modelopt import plan_target

        return plan_target(model_types, out, out_flag, target, layout, _progress)
    files: dict[Path, str] = {}
    entries = (
        {e.model_type: e for e in render.read_manifest(out_dir / "__init__.py")}
        if keep_existing
        else {}
    )
    rows = coverage.load(out_dir)
    for planned in _plan_each(model_types, out_flag, jobs, keep_going):
        if isinstance(planned, coverage.Row):  # not generated, or out of scope
            rows[planned.model_type] = planned
            continue
        model_type = planned.model_type
        pkg = out_dir / planned.package
        module = pkg / planned.module_file
        files[module] = planned.descriptor
        files[pkg / "__init__.py"] = planned.package_init
        for name, text in planned.extra_files:
            files[pkg / name] = text
        entries[model_type] = render.ManifestEntry(model_type, planned.package, planned.class_name)
        previous = rows.get(model_type)
        if _read(module) != files[module] or previous is None or not previous.verified_or_failing:
            previous = coverage.Row(model_type, coverage.UNVERIFIED)
        rows[model_type] = dataclasses.replace(previous, family=planned.family)
    manifest = list(entries.values())
    version = transformers.__version__
    generated_types = {e.model_type for e in manifest}
    for t, row in list(rows.items()):
        if t not in generated_types and row.status in coverage.GENERATED_STATUSES:
            del rows[t]  # no longer in the table: nothing of it is left to verify
    files[out_dir / "__init__.py"] = render.render_generated_init(manifest, version, out_flag)
    files[out_dir / coverage.COVERAGE_JSON] = coverage.dumps(rows, version)
    files[out_dir / "COVERAGE.md"] = render.render_coverage(
        manifest, known_model_types(), version, out_flag, rows
    )
    return files


@dataclass(frozen=True)
class _Planned:
    """The rendered files of one model type (what a worker sends back)."""

    model_type: str
    package: str
    class_name: str
    module_file: str
    descriptor: str
    package_init: str
    family: str
    extra_files: tuple[tuple[str, str], ...] = ()  # (file name, text): the converter


def _plan_one(target, out_flag: str | None, keep_going: bool = False):
    """The files of one model type or checkpoint target; with `keep_going`, a coverage.Row
    saying why it is not generated instead of an error."""
    from . import coverage, render
    from .errors import PuzzleGenError
    from .infer import infer
    from .source import resolve

    config = target.config if not isinstance(target, str) else None
    if config is None:
        config = _default_config(resolve(target if isinstance(target, str) else target.model_type))
    try:
        fam = coverage.family(config)
    except Exception:  # a config that does not describe its layers the usual way
        fam = ""
    try:
        if keep_going:
            reason = coverage.out_of_scope(target, config)
            if reason is not None:
                return coverage.Row(target, coverage.OUT_OF_SCOPE, reason, fam)
        spec = infer(target)
    except Exception as exc:  # with --all, one type's failure never stops the others
        if not keep_going:
            raise
        reason = str(exc) if isinstance(exc, PuzzleGenError) else f"internal error: {exc!r}"
        scope = coverage.out_of_scope_by_running(config) if config is not None else None
        if scope is not None:  # a run shows why no descriptor can describe it
            _progress(f"    out of scope: {scope}")
            return coverage.Row(target, coverage.OUT_OF_SCOPE, scope, fam)
        _progress(f"    not generated: {reason}")
        return coverage.Row(target, coverage.NOT_GENERATED, coverage.first_line(reason), fam)
    from .modelopt import package_extras

    return _Planned(
        spec.model_type,
        spec.package,
        spec.class_name,
        f"{render.descriptor_module(spec)}.py",
        render.render_descriptor(spec, out_flag),
        render.render_package_init(spec, out_flag),
        fam,
        package_extras(spec, out_flag, _progress),
    )


def _plan_in_worker(args: tuple):
    import torch

    torch.set_num_threads(1)  # one process per core already; no thread pool after fork
    return _plan_one(*args)


def _plan_each(targets: list, out_flag: str | None, jobs: int | None, keep_going: bool) -> list:
    """_plan_one for each target, in order; the first failure (in order) is raised after the
    progress lines of the targets before it, as a serial run does. Checkpoint targets (which
    may carry imported custom code) are always planned in this process."""
    total = len(targets)
    from .parallel import default_jobs, run_ordered

    jobs = default_jobs() if jobs is None else jobs
    if jobs == 1 or total <= 1 or not all(isinstance(t, str) for t in targets):
        planned = []
        for i, target in enumerate(targets, 1):
            _progress(f"[{i}/{total}] {_label(target)}: inferring")
            planned.append(_plan_one(target, out_flag, keep_going))
        return planned

    _warm_up()

    def done(index, outcome):
        _progress(f"[{index + 1}/{total}] {targets[index]}: inferring")
        outcome.replay()
        outcome.get()  # raises the first failure in order and stops the map

    outcomes = run_ordered(
        _plan_in_worker, [(t, out_flag, keep_going) for t in targets], jobs=jobs, on_done=done
    )
    return [o.value for o in outcomes]


def _warm_up() -> None:
    """Import what every worker needs once, here, so that forked workers start with it."""
    import transformers.modeling_utils  # noqa: F401  (the bulk of the import time)

    from . import infer, render  # noqa: F401


def _label(target) -> str:
    return getattr(target, "argument", None) or getattr(target, "model_type", target)


def _targets(args_list: list[str], trust_remote_code: bool = False) -> list:
    """Model types and checkpoint directories, resolved (and so validated) before any inference:
    a checkpoint becomes a source carrying its config; a model type stays a name."""
    from .source import resolve_target

    out, seen = [], {}
    for arg in _dedupe(args_list):
        target = resolve_target(arg, trust_remote_code)
        if target.model_type in seen:
            raise PuzzleGenError(
                f"{seen[target.model_type]} and {arg} are both of model type "
                f"{target.model_type!r} and would write the same descriptor; generate them "
                "into different --out directories"
            )
        seen[target.model_type] = arg
        out.append(target if target.checkpoint is not None else target.model_type)
    return out


def _default_config(source):
    from .probe import quiet_transformers
    from .tiny import default_config

    try:
        with quiet_transformers():
            return default_config(source.config_cls)
    except Exception:  # inference reports a config that does not build, with its reason
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _diff(path: Path, new: str) -> str:
    old = _read(path) or ""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )


def cmd_generate(args) -> int:
    from .render import check_output_dir, write_files

    from .source import known_model_types

    if args.all == bool(args.model_types):
        raise UsageError("generate: give model types, or --all (not both)")
    target, layout = args.target, args.layout
    if args.all and (target, layout) != ("puzzletron", "package"):
        raise UsageError("generate: --all writes the default target only; name the model types")
    if not args.diff:
        check_output_dir(Path(args.out))
    if args.all:
        files = plan(known_model_types(), args.out, keep_going=True, jobs=args.jobs)
    else:
        files = plan(
            _targets(args.model_types, args.trust_remote_code),
            args.out,
            jobs=args.jobs,
            target=target,
            layout=layout,
        )
    changed = {p: t for p, t in files.items() if _read(p) != t}
    # a file of a type's package that the generator writes no more (a converter that can no
    # longer be inferred) goes with the write; in the trees the modelopt target writes (a Model
    # Optimizer checkout, say) only such a file that puzzle-gen wrote
    gone = _unplanned(files)
    if (target, layout) != ("puzzletron", "package"):
        gone = [p for p in gone if _written_by_us(p)]
    if args.diff:
        for path, text in changed.items():
            sys.stdout.write(_diff(path, text))
        if not changed:
            _progress("no changes")
        return 0
    _stop_if_interrupted()
    write_files(changed)
    for path in gone:
        path.unlink()
        _progress(f"removed {path}: no longer generated")
    _progress(
        f"wrote {len(changed)} file(s) under {args.out}; {len(files) - len(changed)} already up to date"
    )
    return 0


def _written_by_us(path: Path) -> bool:
    """Whether `path` carries the generated-file line of templates/_header.j2 near its top (a
    licence header may have been put above it)."""
    try:
        head = path.read_text(errors="replace").splitlines()[:30]
    except OSError:
        return False
    return any(line.startswith("# Generated by puzzle-gen: do not edit.") for line in head)


def _unplanned(files: dict) -> list[Path]:
    """Python files in the type packages `files` writes to that `files` does not hold."""
    planned = {Path(p) for p in files}
    dirs = {p.parent for p in planned if p.name.endswith("_model_descriptor.py")}
    return sorted(p for d in dirs for p in d.glob("*.py") if p not in planned)


def cmd_check(args) -> int:
    from .render import read_manifest

    out_dir = Path(args.out)
    manifest = read_manifest(out_dir / "__init__.py")
    if not manifest:
        raise PuzzleGenError(f"{out_dir}/__init__.py lists no generated descriptors")
    files = plan(
        _check_targets(out_dir, manifest, args.trust_remote_code),
        args.out,
        keep_existing=False,
        jobs=args.jobs,
    )
    stale = [p for p, text in files.items() if _read(p) != text]
    known = {p.parent for p in files}
    strays = sorted(p for p in out_dir.glob("*/*_model_descriptor.py") if p.parent not in known)
    strays += _unplanned(files)
    for p in stale:
        print(f"out of date: {p}", file=sys.stderr)
    for p in strays:
        print(f"not generated any more: {p}", file=sys.stderr)
    if stale or strays:
        print(
            f"puzzle-gen check: {len(stale) + len(strays)} file(s) differ; run "
            f"`puzzle-gen generate {' '.join(e.model_type for e in manifest)}`",
            file=sys.stderr,
        )
        return 1
    _progress(f"puzzle-gen check: {len(files)} file(s) up to date")
    return 0


def _check_targets(out_dir: Path, manifest, trust_remote_code: bool = False) -> list:
    """What regenerates each table entry: its model type, or the checkpoint directory that its
    descriptor's `# Regenerate:` line names. A file in the output directory never decides on its
    own that code gets imported: an entry made with --trust-remote-code needs the flag here too."""
    from .render import regenerate_target

    targets = []
    for e in sorted(manifest, key=lambda e: e.model_type):
        path = out_dir / e.package / f"{e.package}_model_descriptor.py"
        found = regenerate_target(path)
        if found is not None and found[0] != e.model_type:
            if found[1] and not trust_remote_code:
                raise PuzzleGenError(
                    f"{path} was generated with --trust-remote-code from {found[0]}; pass "
                    "--trust-remote-code to check it (its code is imported to regenerate it)"
                )
            targets.extend(_targets([found[0]], found[1]))
        else:
            targets.append(e.model_type)
    return targets


def cmd_inspect(args) -> int:
    from .errors import InferenceError
    from .infer import infer

    (target,) = _targets([args.model_type], args.trust_remote_code)
    try:
        spec = infer(target)
    except InferenceError as exc:
        if getattr(target, "static", None) is None:
            raise
        return _inspect_parsed_only(target, exc, args.json)
    if args.json:
        print(spec.to_json())
        return 0
    print(format_spec(spec))
    return 0


def _inspect_parsed_only(target, exc, as_json: bool) -> int:
    """`inspect PATH` of custom code without --trust-remote-code whose static build cannot
    describe it: what the parse and the safetensors headers show, and the fact that stopped it."""
    import json

    from .checkpoint import show
    from .probe import probe_headers
    from .source import find_list_construction

    ckpt, custom = target.checkpoint, target.custom_code
    headers = probe_headers(ckpt)
    stack_attr = headers.layer_stack.rpartition(".")[2]
    static = find_list_construction(custom, stack_attr)
    classes = {k: f"{p.name} {c}" for k, (p, c) in custom.classes.items()}
    if as_json:
        report = {
            "model_type": ckpt.model_type,
            "custom_code": "parsed, not imported",
            "files": [p.name for p in custom.files],
            "classes": classes,
            "headers": headers.to_dict(),
            "layer_stack_in_code": [{"where": w, "class": c, "element": e} for w, c, e in static],
        }
        print(json.dumps(report, indent=2))
    else:
        lines = [
            f"{ckpt.model_type}: the checkpoint's own code, parsed with libcst and not imported",
            *(f"  {k}: {v}" for k, v in classes.items()),
            f"from the safetensors headers ({headers.tensor_count} tensors; no tensor data read):",
            f"  layer stack      {headers.layer_stack} "
            f"({headers.num_layers} layers = config.json {headers.num_layers_field})",
        ]
        for where, cls, element in static:
            lines.append(
                f"                     <- {where} {cls}.__init__ builds self.{stack_attr}"
                + (f" of {element}" if element else "")
            )
        lines.append(f"  layer children   {', '.join(map(show, headers.layer_children()))}")
        for name, shape in headers.layer_tensors.items():
            lines.append(f"    {show(f'{headers.layer_stack}.0.{name}')}  {list(shape)}")
        lines.append("  outside the layers")
        for name, shape in headers.outside.items():
            lines.append(f"    {show(name)}  {list(shape)}")
        print("\n".join(lines))
    print(
        f"puzzle-gen: {_one_line(exc)}; the report above is what the parse and the headers show "
        "(--trust-remote-code imports the code to probe it)",
        file=sys.stderr,
    )
    return exc.exit_code


def format_spec(spec) -> str:
    """A readable table of every fact and where it came from."""
    lines = [
        f"{spec.model_type}: {spec.causal_lm_class.name} -> {spec.class_name}",
        f"source: {spec.modeling_module} (transformers {spec.transformers_version})",
    ]
    if spec.source_argument:
        lines.append(f"checkpoint: {spec.source_argument}; code from {spec.code_origin}")
    lines.append("")
    width = max(len(f.name) for f in spec.facts)
    for fact in spec.facts:
        lines.append(f"{fact.name.ljust(width)}  {fact.value}")
        for ev in fact.evidence:
            wrapped = textwrap.wrap(ev, 96, break_long_words=False) or [""]
            lines.append(f"{'':{width}}    <- {wrapped[0]}")
            lines.extend(f"{'':{width}}       {w}" for w in wrapped[1:])
    lines.append("")
    lines.append("weight groups (regex alternatives; i is the layer index):")
    p = spec.predicates
    rows = [
        ("embeddings", " | ".join(p.embeddings)),
        ("lm_head", " | ".join(p.lm_head)),
        ("block_i_attention", f"{p.layer_prefix_regex()}\\.i\\.({' | '.join(p.attention)})"),
        ("block_i_ffn", f"{p.layer_prefix_regex()}\\.i\\.({' | '.join(p.ffn)})"),
    ]
    lines.extend(f"  {name:<17}  {value}" for name, value in rows)
    return "\n".join(lines)


def _print_check(check) -> None:
    mark = "ok  " if check.ok else "FAIL"
    print(f"  {mark} {check.name}: {check.detail}", flush=True)
    if check.reference:
        print(f"       against: {check.reference}", flush=True)


def cmd_verify(args) -> int:
    from .verify import verify_model_type

    if args.all == bool(args.model_types):
        raise UsageError("verify: give model types, or --all (not both)")
    if args.all:
        return _verify_all(Path(args.out), args.jobs)
    if args.record:
        return _verify_all(Path(args.out), args.jobs, only=_dedupe(args.model_types))
    failed = 0
    for target in _targets(args.model_types, args.trust_remote_code):
        if not isinstance(target, str):
            failed += _verify_checkpoint(target, Path(args.out))
            continue
        model_type = target
        _progress(
            f"{model_type}: checking the descriptor against transformers' own model, built "
            "unpatched from the same tiny config with the same weights"
        )
        checks = verify_model_type(model_type, Path(args.out), on_check=_print_check)
        if len(checks) == 1 and not checks[0].ok:  # the reference itself did not build
            _print_check(checks[0])
        failed += sum(not c.ok for c in checks)
    if failed:
        print(f"puzzle-gen verify: {failed} check(s) failed", file=sys.stderr)
        return 1
    return 0


def _verify_checkpoint(target, out: Path) -> int:
    """verify PATH: the descriptor against the checkpoint's own tensors and weights."""
    from .verify_checkpoint import verify_checkpoint

    if getattr(target, "static", None) is not None:
        raise PuzzleGenError(
            f"{target.argument}: verify compares the descriptor with the model transformers "
            "builds from the checkpoint's own code, which is only parsed without "
            "--trust-remote-code; pass it to import the code (generate did not need it)"
        )

    _progress(f"{target.argument}: verifying the descriptor against the checkpoint")
    checks = verify_checkpoint(target, out)
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return sum(not ok for _, ok, _ in checks)


def _verify_all(out_dir: Path, jobs: int | None, only: list[str] | None = None) -> int:
    """Verify every generated type, or with `only` those generated types (in worker processes),
    print a table, record the results in coverage.json and COVERAGE.md; the rows of the other
    types stay as they were recorded."""
    import transformers

    from . import coverage, render
    from .source import known_model_types
    from .verify.batch import verify_many

    manifest = render.read_manifest(out_dir / "__init__.py")
    if not manifest:
        raise PuzzleGenError(f"{out_dir}/__init__.py lists no generated descriptors")
    types = sorted(e.model_type for e in manifest)
    if only is not None:
        unknown = sorted(set(only) - set(types))
        if unknown:
            raise UsageError(
                f"verify --record: not generated in {out_dir}: {', '.join(unknown)} "
                "(generate them first)"
            )
        types = sorted(only)
    results = verify_many(types, out_dir, jobs, progress=_progress)
    rows = coverage.load(out_dir)
    width = max(map(len, types))
    print(f"{'model type':<{width}}  checks  result")
    for t in types:
        checks = results[t]
        bad = [c for c in checks if not c.ok]
        passed = len(checks) - len(bad)
        verdict = (
            "verified"
            if not bad
            else f"FAIL {bad[0].name}: {coverage.first_line(bad[0].detail, 100)}"
        )
        print(f"{t:<{width}}  {passed}/{len(checks):<4}  {verdict}")
        family = rows[t].family if t in rows else ""
        rows[t] = (
            coverage.Row(t, coverage.VERIFIED, family=family)
            if not bad
            else coverage.Row(
                t,
                coverage.FAILING,
                coverage.first_line(f"{bad[0].name}: {bad[0].detail}"),
                family,
                tuple(c.name for c in bad),
            )
        )

    version = transformers.__version__
    flag = _out_arg(str(out_dir))
    _stop_if_interrupted()
    render.write_atomic(out_dir / coverage.COVERAGE_JSON, coverage.dumps(rows, version))
    render.write_atomic(
        out_dir / "COVERAGE.md",
        render.render_coverage(manifest, known_model_types(), version, flag, rows),
    )
    failing = [t for t in types if any(not c.ok for c in results[t])]
    print(f"{len(types) - len(failing)} of {len(types)} generated types verified")
    if failing:
        print(f"puzzle-gen verify: {len(failing)} type(s) fail a check", file=sys.stderr)
        return 1
    return 0


def _jobs(value: str) -> int:
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return jobs


def _jobs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help="model types inferred in parallel worker processes (default: the cores available); "
        "the output is the same for every N",
    )


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"puzzle-gen: error: {message}", file=sys.stderr)
        raise SystemExit(2)


_TRUST_HELP = (
    "import a checkpoint's own modeling code (config.json auto_map) to probe it; without this "
    "flag that code is only parsed, never run"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="puzzle-gen",
        description="Generate and verify Puzzletron ModelDescriptors for Hugging Face decoder models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="infer and write descriptors")
    g.add_argument(
        "model_types",
        nargs="*",
        metavar="MODEL_TYPE|PATH",
        help="model types (llama qwen3) or local checkpoint directories",
    )
    g.add_argument(
        "--all",
        action="store_true",
        help="every causal-LM model type of the installed transformers; a type that cannot be "
        "generated is recorded in coverage.json with its reason and does not stop the others",
    )
    g.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    g.add_argument("--diff", action="store_true", help="print a unified diff instead of writing")
    g.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    _jobs_arg(g)
    g.add_argument(
        "--target",
        choices=["puzzletron", "modelopt"],
        default="puzzletron",
        help="the API the descriptor imports: this project's puzzletron_runtime (default) or "
        "NVIDIA Model Optimizer's modelopt.torch.puzzletron (adds a registered Converter, "
        "pruning layer descriptors and pruning_mixins())",
    )
    g.add_argument(
        "--layout",
        choices=["package", "modelopt-tree"],
        default="package",
        help="package: <out>/<type>/ with absolute imports (default); modelopt-tree: "
        "<out>/models/<name>/ as a Model Optimizer pull request adds it, relative imports "
        "(needs --target modelopt)",
    )
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("check", help="fail (exit 1) when a generated file is out of date")
    c.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    c.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow importing the code of checkpoints that were generated with this flag",
    )
    _jobs_arg(c)
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("inspect", help="print the inferred spec and its evidence")
    i.add_argument("model_type", metavar="MODEL_TYPE|PATH")
    i.add_argument("--json", action="store_true", help="print the spec as JSON")
    i.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser(
        "verify", help="build tiny models through generated descriptors and check them"
    )
    v.add_argument("model_types", nargs="*", metavar="MODEL_TYPE|PATH")
    v.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)
    v.add_argument(
        "--all",
        action="store_true",
        help="verify every generated type and record the results in coverage.json / COVERAGE.md",
    )
    v.add_argument(
        "--record",
        action="store_true",
        help="record the results of the given (generated) model types in coverage.json / "
        "COVERAGE.md, leaving the other types' rows as they were",
    )
    _jobs_arg(v)
    v.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    v.set_defaults(func=cmd_verify)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    try:
        with _sticky_interrupts():
            args = build_parser().parse_args(argv)
            return args.func(args)
    except PuzzleGenError as exc:
        print(f"puzzle-gen: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("puzzle-gen: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `puzzle-gen inspect ... | head`
        return 1
    except (
        Exception
    ) as exc:  # a bug, not a user error: still one line (PUZZLE_GEN_DEBUG=1 shows it)
        if os.environ.get("PUZZLE_GEN_DEBUG"):
            raise
        print(
            f"puzzle-gen: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(set PUZZLE_GEN_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
