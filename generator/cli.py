"""The `puzzle-gen` command line.

    puzzle-gen generate MODEL_TYPE... [--out DIR] [--diff] [--jobs N]
    puzzle-gen check [--out DIR] [--jobs N]
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
from dataclasses import dataclass
from pathlib import Path

from .errors import PuzzleGenError

DEFAULT_OUT = "generated"


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _out_arg(out: str) -> str | None:
    """The --out value recorded in regenerate commands (None for the default)."""
    return None if Path(out) == Path(DEFAULT_OUT) else out


def plan(
    model_types: list[str], out: str, keep_existing: bool = True, jobs: int | None = 1
) -> dict[Path, str]:
    """Every file `generate` would write for `model_types` under `out`, rendered in memory.

    With `jobs` other than 1 (None: every available core) model types are inferred in worker
    processes; files, their order and the progress printed are the same as with jobs=1.
    """
    import transformers

    from . import render
    from .source import known_model_types

    out_dir = Path(out)
    out_flag = _out_arg(out)
    files: dict[Path, str] = {}
    entries = (
        {e.model_type: e for e in render.read_manifest(out_dir / "__init__.py")}
        if keep_existing
        else {}
    )
    for model_type, planned in zip(model_types, _plan_each(model_types, out_flag, jobs)):
        pkg = out_dir / planned.package
        files[pkg / planned.module_file] = planned.descriptor
        files[pkg / "__init__.py"] = planned.package_init
        entries[model_type] = render.ManifestEntry(model_type, planned.package, planned.class_name)
    manifest = list(entries.values())
    version = transformers.__version__
    files[out_dir / "__init__.py"] = render.render_generated_init(manifest, version, out_flag)
    files[out_dir / "COVERAGE.md"] = render.render_coverage(
        manifest, known_model_types(), version, out_flag
    )
    return files


@dataclass(frozen=True)
class _Planned:
    """The rendered files of one model type (what a worker sends back)."""

    package: str
    class_name: str
    module_file: str
    descriptor: str
    package_init: str


def _plan_one(model_type: str, out_flag: str | None) -> _Planned:
    from . import render
    from .infer import infer

    spec = infer(model_type)
    return _Planned(
        spec.package,
        spec.class_name,
        f"{render.descriptor_module(spec)}.py",
        render.render_descriptor(spec, out_flag),
        render.render_package_init(spec, out_flag),
    )


def _plan_in_worker(args: tuple[str, str | None]) -> _Planned:
    import torch

    torch.set_num_threads(1)  # one process per core already; no thread pool after fork
    return _plan_one(*args)


def _plan_each(model_types: list[str], out_flag: str | None, jobs: int | None) -> list[_Planned]:
    """_plan_one for each model type, in order; the first failure (in order) is raised after
    the progress lines of the model types before it, as a serial run does."""
    total = len(model_types)
    from .parallel import default_jobs, run_ordered

    jobs = default_jobs() if jobs is None else jobs
    if jobs == 1 or total <= 1:
        planned = []
        for i, model_type in enumerate(model_types, 1):
            _progress(f"[{i}/{total}] {model_type}: inferring")
            planned.append(_plan_one(model_type, out_flag))
        return planned

    _warm_up()

    def done(index, outcome):
        _progress(f"[{index + 1}/{total}] {model_types[index]}: inferring")
        outcome.replay()
        outcome.get()  # raises the first failure in order and stops the map

    outcomes = run_ordered(
        _plan_in_worker, [(t, out_flag) for t in model_types], jobs=jobs, on_done=done
    )
    return [o.value for o in outcomes]


def _warm_up() -> None:
    """Import what every worker needs once, here, so that forked workers start with it."""
    import transformers.modeling_utils  # noqa: F401  (the bulk of the import time)

    from . import infer, render  # noqa: F401


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

    files = plan(_dedupe(args.model_types), args.out, jobs=args.jobs)
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
    files = plan(
        sorted(e.model_type for e in manifest), args.out, keep_existing=False, jobs=args.jobs
    )
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


def cmd_verify(args) -> int:
    from .verify import verify_model_type

    failed = 0
    for model_type in _dedupe(args.model_types):
        _progress(f"{model_type}: verifying a tiny model built through the descriptor")
        report = verify_model_type(model_type, Path(args.out))
        for check in report:
            mark = "ok  " if check.ok else "FAIL"
            print(f"  {mark} {check.name}: {check.detail}")
        failed += sum(not c.ok for c in report)
    if failed:
        print(f"puzzle-gen verify: {failed} check(s) failed", file=sys.stderr)
        return 1
    return 0


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"puzzle-gen: error: {message}", file=sys.stderr)
        raise SystemExit(2)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="puzzle-gen",
        description="Generate and verify Puzzletron ModelDescriptors for Hugging Face decoder models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="infer and write descriptors")
    g.add_argument("model_types", nargs="+", metavar="MODEL_TYPE", help="e.g. llama qwen3")
    g.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    g.add_argument("--diff", action="store_true", help="print a unified diff instead of writing")
    _jobs_arg(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("check", help="fail (exit 1) when a generated file is out of date")
    c.add_argument(
        "--out", default=DEFAULT_OUT, help="output package directory (default: %(default)s)"
    )
    _jobs_arg(c)
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("inspect", help="print the inferred spec and its evidence")
    i.add_argument("model_type", metavar="MODEL_TYPE")
    i.add_argument("--json", action="store_true", help="print the spec as JSON")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser(
        "verify", help="build tiny models through generated descriptors and check them"
    )
    v.add_argument("model_types", nargs="+", metavar="MODEL_TYPE")
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
