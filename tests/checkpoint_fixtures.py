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


# -- a llama-like model under another name, as a checkpoint's own code ----------------------------
PORTED_AUTO_MAP = {
    "AutoConfig": "configuration_mini.MiniConfig",
    "AutoModelForCausalLM": "modeling_mini.MiniForCausalLM",
}


def _port(text: str) -> str:
    """transformers' Llama source as a checkpoint would ship it: absolute imports of the library,
    every Llama name renamed Mini."""
    import re

    text = re.sub(r"from \.\.\.(\w)", r"from transformers.\1", text)
    text = text.replace("from .configuration_llama import", "from .configuration_mini import")
    return text.replace("LLaMA", "Mini").replace("Llama", "Mini").replace("llama", "mini")


def _with_marker(text: str, marker: Path, name: str) -> str:
    lines = text.splitlines(keepends=True)
    first_code = next(i for i, line in enumerate(lines) if line.strip() and line[0] != "#")
    touch = (
        "from pathlib import Path as _MarkerPath\n\n"
        f"_MarkerPath({str(marker)!r}, {name!r}).touch()\n\n"
    )
    return "".join(lines[:first_code] + [touch] + lines[first_code:])


def save_ported(directory: Path, marker: Path, edit=None, **overrides) -> Path:
    """A `mini` checkpoint whose code is transformers' modeling_llama.py and
    configuration_llama.py renamed (self-contained: it subclasses only transformers' base
    classes), with config.json's auto_map naming them. Importing either file touches a file in
    `marker`. `edit(modeling_source) -> modeling_source` changes the model's code."""
    import transformers

    root = Path(transformers.__file__).parent / "models" / "llama"
    save_llama(directory, **overrides)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="mini", architectures=["MiniForCausalLM"], auto_map=PORTED_AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    configuration = _port((root / "configuration_llama.py").read_text())
    modeling = _port((root / "modeling_llama.py").read_text())
    if edit is not None:
        edited = edit(modeling)
        assert edited != modeling, "the edit changed nothing"
        modeling = edited
    (directory / "configuration_mini.py").write_text(
        _with_marker(configuration, marker, "configuration_imported")
    )
    (directory / "modeling_mini.py").write_text(_with_marker(modeling, marker, "modeling_imported"))
    return directory


# -- any of transformers' model types, as a checkpoint's own code ---------------------------------
def save_ported_type(directory: Path, marker: Path, model_type: str) -> Path:
    """A tiny checkpoint of `model_type` (a MoE such as mixtral) whose code is transformers'
    modeling and configuration files copied in, imports made absolute, the type renamed
    `ported_<type>` so transformers does not know it (as scripts/static_sweep.py ports them).
    Tensors are saved under the module's own names (transformers renames only types it knows).
    Importing either file touches a file in `marker`."""
    import inspect
    import re

    import torch
    from safetensors.torch import save_file

    from generator.probe import quiet_transformers
    from generator.source import resolve
    from generator.tiny import tiny_config

    source = resolve(model_type)
    with quiet_transformers():
        config = tiny_config(source.config_cls)
        torch.manual_seed(0)
        model = source.causal_lm_cls(config)
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
    tensors = model.state_dict()
    for target in getattr(model, "all_tied_weights_keys", {}) or {}:
        tensors.pop(target, None)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config_file = Path(inspect.getsourcefile(source.config_cls))

    def port(text: str) -> str:
        text = re.sub(r"from \.\.\.(\w)", r"from transformers.\1", text)
        text = text.replace("from ... import", "from transformers import")
        text = re.sub(r"from \.\.(\w)", r"from transformers.models.\1", text)
        text = text.replace("from .. import", "from transformers.models import")
        text = text.replace(f"from .{config_file.stem} import", "from .configuration_ported import")
        return text.replace(f'model_type = "{model_type}"', f'model_type = "ported_{model_type}"')

    for name, text in (
        ("configuration_ported", config_file.read_text()),
        ("modeling_ported", source.modeling_file.read_text()),
    ):
        (directory / f"{name}.py").write_text(
            _with_marker(port(text), marker, name.replace("_ported", "_imported"))
        )
    data = json.loads((directory / "config.json").read_text())
    data.update(
        model_type=f"ported_{model_type}",
        auto_map={
            "AutoConfig": f"configuration_ported.{source.config_cls.__name__}",
            "AutoModelForCausalLM": f"modeling_ported.{source.causal_lm_cls.__name__}",
        },
    )
    (directory / "config.json").write_text(json.dumps(data, indent=2))
    return directory
