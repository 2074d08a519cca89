"""Stage 1: resolve a model type to its config class, causal-LM class and modeling source file."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

from .errors import PuzzleGenError, UnknownModelType


@dataclass(frozen=True)
class ModelSource:
    model_type: str
    config_cls: type
    causal_lm_cls: type
    modeling_module: str  # dotted module that defines the causal-LM class
    modeling_file: Path  # absolute path of that module's source
    transformers_root: Path  # the installed transformers package, for relative evidence paths

    def relpath(self, path: str | Path) -> str:
        """A path relative to the transformers package (stable across machines)."""
        p = Path(path)
        try:
            return f"transformers/{p.resolve().relative_to(self.transformers_root).as_posix()}"
        except ValueError:
            return p.name


def known_model_types() -> list[str]:
    """Every model type that transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _transformers_class(name: str) -> type:
    import transformers

    try:
        return getattr(transformers, name)
    except AttributeError as exc:  # pragma: no cover - depends on optional backends
        raise PuzzleGenError(f"transformers does not export {name}: {exc}") from None


def resolve(model_type: str) -> ModelSource:
    """Find the classes and modeling file for `model_type`; unknown types raise UnknownModelType."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, known_model_types(), n=5, cutoff=0.5)
        raise UnknownModelType(model_type, close)
    config_cls = _transformers_class(CONFIG_MAPPING_NAMES[model_type])
    causal_lm_cls = _transformers_class(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    module = importlib.import_module(causal_lm_cls.__module__)
    return ModelSource(
        model_type=model_type,
        config_cls=config_cls,
        causal_lm_cls=causal_lm_cls,
        modeling_module=causal_lm_cls.__module__,
        modeling_file=Path(inspect.getsourcefile(module)).resolve(),
        transformers_root=Path(transformers.__file__).resolve().parent,
    )
