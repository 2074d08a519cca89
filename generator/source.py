"""Stage 1: resolve a model type to its config class, causal-LM class and modeling source file."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, CheckpointInputError
from .errors import PuzzleGenError, UnknownModelType


@dataclass(frozen=True)
class ModelSource:
    model_type: str
    config_cls: type
    causal_lm_cls: type
    modeling_module: str  # dotted module that defines the causal-LM class
    modeling_file: Path  # absolute path of that module's source
    transformers_root: Path  # the installed transformers package, for relative evidence paths
    # -- set when the source is a local checkpoint directory (see resolve_target) -------------
    config: Any = None  # the checkpoint's config instance; None: the model type's defaults
    checkpoint: Checkpoint | None = None
    custom_code: "CustomCode | None" = None  # the checkpoint's own modeling files (auto_map)
    trust_remote_code: bool = False  # custom code was imported (only with --trust-remote-code)
    argument: str | None = None  # what the user typed (regenerate commands repeat it)

    def relpath(self, path: str | Path) -> str:
        """A path relative to the transformers package (stable across machines)."""
        p = Path(path)
        try:
            return f"transformers/{p.resolve().relative_to(self.transformers_root).as_posix()}"
        except ValueError:
            return p.name


Target = ModelSource  # what resolve_target returns: a model type or a checkpoint directory


# Image-text-to-text model types outside transformers' causal-LM mapping that are covered too,
# resolved through its image-text-to-text mapping; one line each, with the reason.
IMAGE_TEXT_TYPES = {
    "qwen3_vl": "Model Optimizer ships a hand-written descriptor for it",
    "qwen3_vl_moe": "Model Optimizer ships a hand-written descriptor for it",
}


def known_model_types() -> list[str]:
    """Every model type that transformers maps to a causal-LM class, and IMAGE_TEXT_TYPES."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(IMAGE_TEXT_TYPES))


def closest_model_types(model_type: str, n: int = 5) -> list[str]:
    """Known model types closest to `model_type`, compared case-insensitively (exact
    case-insensitive matches first)."""
    known = known_model_types()
    lowered = {k.lower(): k for k in known}
    wanted = model_type.lower().replace("-", "_")
    exact = [lowered[w] for w in (model_type.lower(), wanted) if w in lowered]
    close = difflib.get_close_matches(wanted, list(lowered), n=n, cutoff=0.5)
    return list(dict.fromkeys(exact + [lowered[c] for c in close]))[:n]


def _transformers_class(name: str) -> type:
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError as exc:  # pragma: no cover - depends on optional backends
        raise PuzzleGenError(f"transformers does not export {name}: {exc}") from None


def causal_lm_config_class(config_cls: type, causal_lm_cls: type) -> type:
    """The config class `causal_lm_cls` is built from. Some vision-language types map to a
    text-only causal LM whose config class is the text sub-config of the type's own config
    (qwen3_5 -> Qwen3_5ForCausalLM(Qwen3_5TextConfig), llama4, emu3, ...: transformers'
    "VLM compatibility" entries); AutoModelForCausalLM.from_config builds those from
    `config.get_text_config()`. The same rule here, so that every config made from this source
    (default, tiny, a checkpoint's) is one the class is built from."""
    text_cls = (getattr(config_cls, "sub_configs", None) or {}).get("text_config")
    if text_cls is not None and getattr(causal_lm_cls, "config_class", None) == text_cls:
        return text_cls
    return config_cls


def resolve(model_type: str) -> ModelSource:
    """Find the classes and modeling file for `model_type`; unknown types raise UnknownModelType."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    mapping = (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if model_type in IMAGE_TEXT_TYPES
        else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if model_type not in mapping:
        raise UnknownModelType(model_type, closest_model_types(model_type))
    causal_lm_cls = _transformers_class(mapping[model_type])
    config_cls = causal_lm_config_class(
        _transformers_class(CONFIG_MAPPING_NAMES[model_type]), causal_lm_cls
    )
    module = importlib.import_module(causal_lm_cls.__module__)
    return ModelSource(
        model_type=model_type,
        config_cls=config_cls,
        causal_lm_cls=causal_lm_cls,
        modeling_module=causal_lm_cls.__module__,
        modeling_file=Path(inspect.getsourcefile(module)).resolve(),
        transformers_root=Path(transformers.__file__).resolve().parent,
    )


# -- checkpoint directories ---------------------------------------------------------------------
_AUTO_KEYS = ("AutoConfig", "AutoModelForCausalLM")
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_SAFE_MODEL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class CustomCode:
    """The checkpoint's own code as named by config.json's auto_map, parsed but not run."""

    classes: dict  # auto_map key -> (file Path, class name)
    files: tuple[Path, ...]  # every parsed .py file (the named ones and their relative imports)


class CustomCodeNotTrusted(PuzzleGenError):
    """A checkpoint whose model type only its own code defines, without --trust-remote-code:
    the code was parsed (and so checked), never imported. `inspect` still reports what the
    parse and the safetensors headers show."""

    def __init__(self, checkpoint: Checkpoint, custom: CustomCode):
        super().__init__(
            f"{checkpoint.directory}: model type {checkpoint.model_type!r} comes with its own code "
            f"({', '.join(p.name for p in custom.files)}), which was parsed but not run; "
            "pass --trust-remote-code to import it for the probe"
        )
        self.checkpoint = checkpoint
        self.custom = custom


def find_list_construction(custom: CustomCode, attr: str) -> list[tuple[str, str, str | None]]:
    """Static evidence for a layer stack in the checkpoint's own code: every
    `self.<attr> = [nn.]ModuleList(...)` in a class's __init__, as (file:line, class, element
    class when the list is built by a comprehension of one class)."""
    import libcst as cst
    from libcst.metadata import MetadataWrapper, PositionProvider

    found = []
    for path in custom.files:
        wrapper = MetadataWrapper(_parse_py(path))
        positions = wrapper.resolve(PositionProvider)
        for cls in wrapper.module.body:
            if not isinstance(cls, cst.ClassDef):
                continue
            for stmt in cls.body.body:
                if not (isinstance(stmt, cst.FunctionDef) and stmt.name.value == "__init__"):
                    continue
                for node in _walk(stmt):
                    if not (isinstance(node, cst.Assign) and len(node.targets) == 1):
                        continue
                    target, value = node.targets[0].target, node.value
                    if not (
                        isinstance(target, cst.Attribute)
                        and isinstance(target.value, cst.Name)
                        and target.value.value == "self"
                        and target.attr.value == attr
                        and isinstance(value, cst.Call)
                    ):
                        continue
                    callee = value.func
                    name = (
                        callee.attr.value
                        if isinstance(callee, cst.Attribute)
                        else getattr(callee, "value", None)
                    )
                    if name != "ModuleList":
                        continue
                    element = None
                    arg = value.args[0].value if value.args else None
                    if isinstance(arg, cst.ListComp) and isinstance(arg.elt, cst.Call):
                        f = arg.elt.func
                        element = (
                            f.attr.value
                            if isinstance(f, cst.Attribute)
                            else getattr(f, "value", None)
                        )
                    line = positions[node].start.line
                    found.append((f"{path.name}:{line}", cls.name.value, element))
    return found


def _walk(node):
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(list(current.children)))


def looks_like_path(arg: str) -> bool:
    return "/" in arg or "\\" in arg or arg.startswith((".", "~"))


def resolve_target(arg: str, trust_remote_code: bool = False) -> ModelSource:
    """A model type (`llama`) or a local checkpoint directory, resolved to its source.

    A known model type wins over a directory of the same name unless the argument is spelled as
    a path (`./llama`). A checkpoint's config.json decides the model type and the config (its
    sizes, layer count, tied embeddings); its auto_map files are parsed with libcst and imported
    only with `trust_remote_code`.
    """
    if not looks_like_path(arg) and arg in known_model_types():
        return resolve(arg)
    path = Path(arg).expanduser()
    if not path.exists():
        if looks_like_path(arg):
            raise PuzzleGenError(f"{arg}: no such checkpoint directory")
        raise UnknownModelType(
            arg, closest_model_types(arg), "; nor is it a checkpoint directory here"
        )
    if not path.is_dir():
        raise PuzzleGenError(f"{arg}: not a directory (expected a checkpoint directory)")
    return resolve_checkpoint(path, arg, trust_remote_code)


def resolve_checkpoint(directory: Path, arg: str, trust_remote_code: bool) -> ModelSource:
    ckpt = Checkpoint(directory)
    data = ckpt.config_dict
    model_type = data["model_type"]
    custom = parse_custom_code(ckpt)
    if custom is not None and trust_remote_code:
        return _import_custom(ckpt, custom, arg)
    if model_type in known_model_types():
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        source = resolve(model_type)
        config = _builtin_config(ckpt, _transformers_class(CONFIG_MAPPING_NAMES[model_type]))
        if not isinstance(config, source.config_cls):  # the class is built from the text config
            config = config.get_text_config()
        return _with(source, config=config, checkpoint=ckpt, custom_code=custom, argument=arg)
    if custom is not None:
        raise CustomCodeNotTrusted(ckpt, custom)
    raise UnknownModelType(
        model_type, closest_model_types(model_type), f" (in {ckpt.directory / 'config.json'})"
    )


def _with(source: ModelSource, **changes) -> ModelSource:
    import dataclasses

    return dataclasses.replace(source, **changes)


def _builtin_config(ckpt: Checkpoint, config_cls: type):
    from .probe import quiet_transformers

    data = {k: v for k, v in ckpt.config_dict.items() if k != "auto_map"}
    try:
        with quiet_transformers():
            return config_cls.from_dict(data)
    except Exception as exc:
        raise CheckpointInputError(
            f"{ckpt.directory / 'config.json'}: does not make a {config_cls.__name__}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def parse_custom_code(ckpt: Checkpoint) -> CustomCode | None:
    """Check the files config.json's auto_map names: present, valid Python (parsed with libcst,
    never imported), defining the named classes. None when the checkpoint has no own code."""
    import libcst as cst

    config_path = ckpt.directory / "config.json"
    auto_map = ckpt.config_dict.get("auto_map")
    if auto_map is None:
        return None
    if not isinstance(auto_map, dict):
        raise CheckpointInputError(f'{config_path}: "auto_map" is not an object')
    named = {}
    for key in _AUTO_KEYS:
        ref = auto_map.get(key)
        if ref is None:
            continue
        if not isinstance(ref, str):
            raise CheckpointInputError(f"{config_path}: auto_map.{key} is not a string: {ref!r}")
        if "--" in ref:
            raise CheckpointInputError(
                f"{config_path}: auto_map.{key} = {ref!r} refers to code in another repository; "
                "only code inside the checkpoint directory is read (nothing is downloaded)"
            )
        module, _, cls_name = ref.rpartition(".")
        if not module or not _MODULE_PATH.match(ref):
            raise CheckpointInputError(
                f"{config_path}: auto_map.{key} = {ref!r} is not `module.ClassName`"
            )
        named[key] = (ckpt.directory / (module.replace(".", "/") + ".py"), cls_name)
    if "AutoModelForCausalLM" not in named:
        return None
    files: list[Path] = []
    pending = [p for p, _ in named.values()]
    while pending:
        path = pending.pop()
        if path in files:
            continue
        if not path.is_file():
            raise CheckpointInputError(
                f"{config_path}: auto_map names {path.relative_to(ckpt.directory)}, "
                f"which is not in {ckpt.directory}"
            )
        module = _parse_py(path)
        files.append(path)
        pending.extend(_relative_imports(module, path, ckpt.directory))
    for key, (path, cls_name) in named.items():
        module = _parse_py(path)
        defined = {s.name.value for s in module.body if isinstance(s, cst.ClassDef)}
        if cls_name not in defined:
            raise CheckpointInputError(
                f"{path}: auto_map.{key} names class {cls_name}, which the file does not define"
            )
    return CustomCode(named, tuple(sorted(files)))


def _parse_py(path: Path):
    import libcst as cst

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointInputError(f"{path}: cannot read: {' '.join(str(exc).split())}") from None
    try:
        return cst.parse_module(text)
    except cst.ParserSyntaxError as exc:
        raise CheckpointInputError(
            f"{path}:{exc.raw_line}:{exc.raw_column}: syntax error in custom code: "
            f"{' '.join(exc.message.split())}"
        ) from None


def _relative_imports(module, path: Path, root: Path) -> list[Path]:
    """Files of the checkpoint that `from .x import y` statements in `module` name."""
    import libcst as cst

    out = []
    for stmt in module.body:
        if not isinstance(stmt, cst.SimpleStatementLine):
            continue
        for small in stmt.body:
            if isinstance(small, cst.ImportFrom) and small.relative and small.module is not None:
                if len(small.relative) != 1:
                    continue
                name = cst.Module(body=[]).code_for_node(small.module)
                candidate = path.parent / (name.replace(".", "/") + ".py")
                if candidate.resolve().is_relative_to(root.resolve()):
                    out.append(candidate)
    return out


def _import_custom(ckpt: Checkpoint, custom: CustomCode, arg: str) -> ModelSource:
    """With --trust-remote-code: import the checkpoint's own config and causal-LM classes the
    way transformers does (local files only)."""
    import transformers
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from .probe import quiet_transformers

    model_type = ckpt.model_type
    if not _SAFE_MODEL_TYPE.match(model_type):
        raise CheckpointInputError(
            f"{ckpt.directory / 'config.json'}: model_type {model_type!r} is not a plain name"
        )
    ref = ckpt.config_dict["auto_map"]["AutoModelForCausalLM"]
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(
                str(ckpt.directory), trust_remote_code=True, local_files_only=True
            )
            causal_lm_cls = get_class_from_dynamic_module(
                ref, str(ckpt.directory), local_files_only=True
            )
    except Exception as exc:
        raise PuzzleGenError(
            f"{ckpt.directory}: importing its own code fails: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())}"
        ) from None
    module = importlib.import_module(causal_lm_cls.__module__)
    return ModelSource(
        model_type=model_type,
        config_cls=type(config),
        causal_lm_cls=causal_lm_cls,
        modeling_module=causal_lm_cls.__module__,
        modeling_file=Path(inspect.getsourcefile(module)).resolve(),
        transformers_root=Path(transformers.__file__).resolve().parent,
        config=config,
        checkpoint=ckpt,
        custom_code=custom,
        trust_remote_code=True,
        argument=arg,
    )
