"""A registry of descriptors by name (the model type), and a resolver from configs to them."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .base import ModelDescriptor

__all__ = ["ModelDescriptorFactory"]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ModelDescriptorFactory:
    """Maps names (model types) to descriptor classes."""

    _registry: dict[str, type[ModelDescriptor]] = {}

    @classmethod
    def register(cls, **named: type[ModelDescriptor]) -> None:
        """Register descriptors: `register(llama=LlamaModelDescriptor)`.

        Registering the same class again (or a reloaded copy of it) is a no-op; a different
        class under a taken name raises KeyError naming both.
        """
        for name, descriptor in named.items():
            if not (isinstance(descriptor, type) and issubclass(descriptor, ModelDescriptor)):
                raise TypeError(f"{name}: {descriptor!r} is not a ModelDescriptor subclass")
            current = cls._registry.get(name)
            if current is not None and _qualified(current) != _qualified(descriptor):
                raise KeyError(
                    f"descriptor name {name!r} is taken by {_qualified(current)}; "
                    f"cannot register {_qualified(descriptor)}"
                )
            cls._registry[name] = descriptor

    @classmethod
    def register_decorator(cls, name: str) -> Callable[[type], type]:
        """Class decorator form of `register(name=...)`."""

        def decorate(descriptor: type) -> type:
            cls.register(**{name: descriptor})
            return descriptor

        return decorate

    @classmethod
    def get(cls, name_or_class: str | type[ModelDescriptor]) -> type[ModelDescriptor]:
        """The descriptor registered under a name, or the given descriptor class itself."""
        if isinstance(name_or_class, type):
            if issubclass(name_or_class, ModelDescriptor):
                return name_or_class
            raise TypeError(f"{name_or_class!r} is not a ModelDescriptor subclass")
        try:
            return cls._registry[name_or_class]
        except KeyError:
            raise KeyError(
                f"no descriptor registered as {name_or_class!r}; known: {cls._known()}"
            ) from None

    @classmethod
    @contextmanager
    def scratch(cls) -> Iterator[None]:
        """A registry that starts empty and is dropped on leaving the block, the previous one
        restored: for importing a descriptor from a scratch directory whose name an installed
        descriptor already holds (the class itself stays usable: `get` and `deci_x_patcher`
        accept classes)."""
        saved = dict(cls._registry)
        cls._registry.clear()
        try:
            yield
        finally:
            cls._registry.clear()
            cls._registry.update(saved)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)

    @classmethod
    def resolve(cls, config_or_checkpoint: Any) -> type[ModelDescriptor]:
        """The descriptor for a transformers config, or for a checkpoint directory (its
        config.json is read as JSON; nothing is downloaded), by model_type."""
        if isinstance(config_or_checkpoint, (str, os.PathLike)):
            path = Path(config_or_checkpoint)
            config_file = path / "config.json" if path.is_dir() else path
            try:
                model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
            except (OSError, ValueError) as exc:
                raise KeyError(f"cannot read a model_type from {config_file}: {exc}") from None
        else:
            model_type = getattr(config_or_checkpoint, "model_type", None)
        if model_type not in cls._registry:
            raise KeyError(f"no descriptor for model_type {model_type!r}; known: {cls._known()}")
        return cls._registry[model_type]

    @classmethod
    def _known(cls) -> str:
        return ", ".join(cls.names()) or "none registered"
