"""puzzletron_runtime: the ModelDescriptor API that generated descriptors import.

Mirrors the layout and names of Model Optimizer's `modelopt.torch.puzzletron.anymodel`
(model_descriptor, puzzformer/no_op, puzzformer/patcher, block_config), so a descriptor written
against this package becomes a Model Optimizer descriptor by changing only its import lines.
Depends on torch, transformers and safetensors only.
"""

from .block_config import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    MambaConfig,
    MoEConfig,
    maybe_cast_block_configs,
)
from .buffers import rebuild_buffers
from .loading import CheckpointError, Runtime, load_model
from .model_descriptor import ModelDescriptor, ModelDescriptorFactory
from .pipeline import StageModule, load_stage, pipeline_stage, stage_blocks
from .puzzformer import MatchingZeros, Same, deci_x_patcher, return_tuple_of_size
from .utils.dummy_modules import DummyBlock

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "CheckpointError",
    "DummyBlock",
    "FFNConfig",
    "MatchingZeros",
    "MambaConfig",
    "MoEConfig",
    "ModelDescriptor",
    "ModelDescriptorFactory",
    "Runtime",
    "Same",
    "StageModule",
    "deci_x_patcher",
    "load_model",
    "load_stage",
    "rebuild_buffers",
    "maybe_cast_block_configs",
    "pipeline_stage",
    "return_tuple_of_size",
    "stage_blocks",
]
