"""The ModelDescriptor API and its registry."""

from .base import ModelDescriptor
from .model_descriptor_factory import ModelDescriptorFactory

__all__ = ["ModelDescriptor", "ModelDescriptorFactory"]
