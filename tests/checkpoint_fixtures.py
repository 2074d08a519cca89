"""Tiny checkpoint directories built in temp dirs: `save_pretrained` Llama checkpoints (single
file, sharded, sizes unlike the defaults) and a custom-code model whose files leave a marker file
when they are imported."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# Sizes unlike LlamaConfig()'s defaults (32 layers, 4096 wide): the checkpoint's config must win.
SMALL_LLAMA = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def save_llama(directory: Path, sharded: bool = False, **overrides) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, **overrides}))
    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "5GB")
    return directory


CONFIGURATION = """
from pathlib import Path

Path({marker!r}, "configuration_imported").touch()

from transformers import LlamaConfig


class ToyConfig(LlamaConfig):
    model_type = "toy_lm"
"""

MODELING = """
from pathlib import Path

Path({marker!r}, "modeling_imported").touch()

from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_toy import ToyConfig


class ToyDecoderLayer(LlamaDecoderLayer):
    pass


class ToyModel(LlamaModel):
    config_class = ToyConfig

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ToyDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
"""

AUTO_MAP = {
    "AutoConfig": "configuration_toy.ToyConfig",
    "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM",
}


def save_custom(directory: Path, marker: Path) -> Path:
    """A `toy_lm` checkpoint whose code lives in the directory (config.json auto_map). Importing
    configuration_toy.py or modeling_toy.py touches a file in `marker`."""
    save_llama(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="toy_lm", architectures=["ToyForCausalLM"], auto_map=AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "configuration_toy.py").write_text(
        textwrap.dedent(CONFIGURATION).format(marker=str(marker))
    )
    (directory / "modeling_toy.py").write_text(textwrap.dedent(MODELING).format(marker=str(marker)))
    return directory
