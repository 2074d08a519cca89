"""The `puzzle-gen` command line.

    puzzle-gen generate MODEL_TYPE... [--out DIR] [--diff]
    puzzle-gen check [--out DIR]
    puzzle-gen inspect MODEL_TYPE [--json]
    puzzle-gen verify MODEL_TYPE... [--out DIR]

User errors are one line on stderr with exit code 1 (2 for an unknown model type or bad usage),
never a traceback; nothing is written unless every requested model type succeeds.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path

from .errors import PuzzleGenError, UsageError

DEFAULT_OUT = "generated"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _out_arg(out: str) -> str | None:
    """The --out value recorded in regenerate commands (None for the default)."""
    return None if Path(out) == Path(DEFAULT_OUT) else out


def plan(
    model_types: list[str],
    out: str,
    keep_existing: bool = True,
    keep_going: bool = False,
    target: str = "puzzletron",
    layout: str = "package",
) -> dict[Path, str]:
    """Every file `generate` would write for `model_types` under `out`, rendered in memory.

    With `keep_going`, a model type that cannot be generated is recorded in coverage.json (the
    fact that could not be inferred, or why it is out of scope) instead of stopping the rest."""
    import transformers

    from . import coverage, render
    from .errors import PuzzleGenError, UsageError
    from .infer import infer
    from .source import known_model_types, resolve

    out_dir = Path(out)
    out_flag = _out_arg(out)
    if (target, layout) != ("puzzletron", "package"):  # Model Optimizer files: generator/modelopt.py
        from .modelopt import plan_target

        return plan_target(model_types, out, out_flag, target, layout, _progress)
    files: dict[Path, str] = {}
    entries = (
        {e.model_type: e for e in render.read_manifest(out_dir / "__init__.py")}
        if keep_existing
        else {}
    )
    rows = coverage.load(out_dir)
    for i, model_type in enumerate(model_types, 1):
        _progress(f"[{i}/{len(model_types)}] {model_type}: inferring")
        try:
            if keep_going:
                reason = coverage.out_of_scope(model_type, _default_config(resolve(model_type)))
                if reason is not None:
                    rows[model_type] = coverage.Row(model_type, coverage.OUT_OF_SCOPE, reason)
                    continue
            spec = infer(model_type)
        except PuzzleGenError as exc:
            if not keep_going:
                raise
            _progress(f"    not generated: {exc}")
            rows[model_type] = coverage.Row(
                model_type, coverage.NOT_GENERATED, coverage.first_line(exc)
            )
            continue
        pkg = out_dir / spec.package
        module = pkg / f"{render.descriptor_module(spec)}.py"
        files[module] = render.render_descriptor(spec, out_flag)
        try:
            files[pkg / f"{render.converter_module(spec)}.py"] = render.render_converter(
                spec, out_flag
            )
        except PuzzleGenError as exc:
            _progress(f"    {exc}")
        files[pkg / "__init__.py"] = render.render_package_init(spec, out_flag)
        entries[model_type] = render.ManifestEntry(model_type, spec.package, spec.class_name)
        previous = rows.get(model_type)
        if _read(module) != files[module] or previous is None or not previous.verified_or_failing:
            rows[model_type] = coverage.Row(model_type, coverage.UNVERIFIED)
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


def _default_config(source):
    from .probe import quiet_transformers

    try:
        with quiet_transformers():
            return source.config_cls()
    except Exception:  # inference reports a config that does not build, with its reason
        return None


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _diff(path: Path, new: str) -> str:
    old = _read(path) or ""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )


def cmd_generate(args) -> int:
    from .render import write_atomic

    from .source import known_model_types

    if args.all == bool(args.model_types):
        raise UsageError("generate: give model types, or --all (not both)")
    target, layout = getattr(args, "target", "puzzletron"), getattr(args, "layout", "package")
    if args.all and (target, layout) != ("puzzletron", "package"):
        raise UsageError("generate: --all writes the default target only; name the model types")
    if args.all:
        files = plan(known_model_types(), args.out, keep_going=True)
    else:
        files = plan(_dedupe(args.model_types), args.out, target=target, layout=layout)
    changed = {p: t for p, t in files.items() if _read(p) != t}
    if args.diff:
        for path, text in changed.items():
            sys.stdout.write(_diff(path, text))
        if not changed:
            _progress("no changes")
        return 0
    for path, text in changed.items():
        write_atomic(path, text)
    _progress(
        f"wrote {len(changed)} file(s) under {args.out}; {len(files) - len(changed)} already up to date"
    )
    return 0


def cmd_check(args) -> int:
    from .render import read_manifest

    out_dir = Path(args.out)
    manifest = read_manifest(out_dir / "__init__.py")
    if not manifest:
        raise PuzzleGenError(f"{out_dir}/__init__.py lists no generated descriptors")
    files = plan(sorted(e.model_type for e in manifest), args.out, keep_existing=False)
    stale = [p for p, text in files.items() if _read(p) != text]
    known = {p.parent for p in files}
    strays = sorted(p for p in out_dir.glob("*/*_model_descriptor.py") if p.parent not in known)
    for p in stale:
        print(f"out of date: {p}", file=sys.stderr)
    for p in strays:
        print(f"not in the descriptor table: {p}", file=sys.stderr)
    if stale or strays:
        print(
            f"puzzle-gen check: {len(stale) + len(strays)} file(s) differ; run "
            f"`puzzle-gen generate {' '.join(e.model_type for e in manifest)}`",
            file=sys.stderr,
        )
        return 1
    _progress(f"puzzle-gen check: {len(files)} file(s) up to date")
    return 0


def cmd_inspect(args) -> int:
    from .infer import infer

    spec = infer(args.model_type)
    if args.json:
        print(spec.to_json())
        return 0
    print(format_spec(spec))
    return 0


def format_spec(spec) -> str:
    """A readable table of every fact and where it came from."""
    lines = [
        f"{spec.model_type}: {spec.causal_lm_class.name} -> {spec.class_name}",
        f"source: {spec.modeling_module} (transformers {spec.transformers_version})",
        "",
    ]
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
        ("block_i_attention", f"{p.layer_prefix}\\.i\\.({' | '.join(p.attention)})"),
        ("block_i_ffn", f"{p.layer_prefix}\\.i\\.({' | '.join(p.ffn)})"),
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
    failed = 0
    for model_type in _dedupe(args.model_types):
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


def _verify_all(out_dir: Path, jobs: int | None) -> int:
    """Verify every generated type (in worker processes), print a table, record the results in
    coverage.json and COVERAGE.md."""
    import transformers

    from . import coverage, render
    from .source import known_model_types
    from .verify.batch import verify_many

    manifest = render.read_manifest(out_dir / "__init__.py")
    if not manifest:
        raise PuzzleGenError(f"{out_dir}/__init__.py lists no generated descriptors")
    types = sorted(e.model_type for e in manifest)
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
        rows[t] = (
            coverage.Row(t, coverage.VERIFIED)
            if not bad
            else coverage.Row(
                t, coverage.FAILING, coverage.first_line(f"{bad[0].name}: {bad[0].detail}")
            )
        )
    version = transformers.__version__
    flag = _out_arg(str(out_dir))
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"puzzle-gen: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="puzzle-gen",
        description="Generate and verify Puzzletron ModelDescriptors for Hugging Face decoder models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="infer and write descriptors")
    g.add_argument("model_types", nargs="*", metavar="MODEL_TYPE", help="e.g. llama qwen3")
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
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("inspect", help="print the inferred spec and its evidence")
    i.add_argument("model_type", metavar="MODEL_TYPE")
    i.add_argument("--json", action="store_true", help="print the spec as JSON")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser(
        "verify", help="build tiny models through generated descriptors and check them"
    )
    v.add_argument("model_types", nargs="*", metavar="MODEL_TYPE")
    v.add_argument(
        "--all",
        action="store_true",
        help="verify every generated type and record the results in coverage.json / COVERAGE.md",
    )
    v.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="worker processes for --all (default: the cores available)",
    )
    v.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PuzzleGenError as exc:
        print(f"puzzle-gen: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("puzzle-gen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
