"""load_model: build a (possibly heterogeneous, possibly partial) model and fill it from a
safetensors checkpoint, reading only the tensors this shard owns.

The model is built on the meta device through the descriptor's patcher; blocks another shard
owns become parameter-free dummies (and so do the input embedding without block 0, and the
final norm and LM head without the last block); then exactly the remaining tensors are read,
shape-checked and assigned, tied weights are re-tied and buffers that are not in the state dict
are rebuilt on the target device by the descriptor's `init_rotary_embedding` (generated
descriptors call `buffers.rebuild_buffers`, which serves every model through transformers' own
`_init_weights`). One code path for CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from torch import nn

from .model_descriptor.model_descriptor_factory import ModelDescriptorFactory
from .puzzformer.patcher import deci_x_patcher
from .utils.dummy_modules import DummyInputEmbedding, DummyOutputHead, carry_structure

__all__ = ["CheckpointError", "Runtime", "load_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class Runtime:
    """Where a loaded model lives; passed to ModelDescriptor.init_rotary_embedding."""

    device: torch.device
    dtype: torch.dtype


def load_model(
    descriptor: Any,
    checkpoint_dir: str | Path,
    owned_blocks: str | Iterable[int] = "all",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load the blocks `owned_blocks` ("all" or a set of layer indices) of the checkpoint.

    `descriptor` is a ModelDescriptor class or a name registered in ModelDescriptorFactory.
    Raises CheckpointError for a missing config.json or safetensors file, an index naming a
    missing shard, a tensor whose shape differs from the model's, and tensors the checkpoint
    lacks (naming every parameter or buffer left on the meta device). A checkpoint written by
    transformers' save_pretrained under legacy names (per-expert MoE tensors) is read through
    transformers' own conversion mapping.
    """
    descriptor = ModelDescriptorFactory.get(descriptor)
    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device(device)
    config = _read_config(descriptor, checkpoint_dir)
    num_layers = int(descriptor.get_language_model_config(config).num_hidden_layers)
    owned = _owned(owned_blocks, num_layers)
    weight_map = _weight_map(checkpoint_dir)

    model = _build_meta(descriptor, config)
    aliases = _tied_aliases(model)
    _replace_unowned(descriptor, model, owned, num_layers, device, dtype)

    wanted = model.state_dict(keep_vars=True)
    sources = {name: _source_name(name, aliases, weight_map) for name in wanted}
    renamed = {n for n, src in sources.items() if src is None}
    direct = {n: src for n, src in sources.items() if src is not None}
    if renamed:  # stored under other names (per-expert tensors of fused experts, say)
        direct.update(
            _load_converted(model, checkpoint_dir, weight_map, renamed, device, dtype, aliases)
        )
    tensors = _read(checkpoint_dir, weight_map, direct, wanted, device, dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    _retie(model, aliases)
    descriptor.init_rotary_embedding(model, Runtime(device, dtype))
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if still_meta:
        raise CheckpointError(
            f"{checkpoint_dir}: still on the meta device after loading: {', '.join(still_meta)}"
        )
    return model.eval()


# -- steps --------------------------------------------------------------------------------------
def _read_config(descriptor, checkpoint_dir: Path):
    from transformers import AutoConfig

    if not (checkpoint_dir / "config.json").is_file():
        raise CheckpointError(f"{checkpoint_dir}: no config.json")
    try:
        return AutoConfig.from_pretrained(
            str(checkpoint_dir),
            trust_remote_code=descriptor.requires_trust_remote_code(),
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: {exc}") from None


def _owned(owned_blocks, num_layers: int) -> set[int]:
    if isinstance(owned_blocks, str):
        if owned_blocks != "all":
            raise ValueError(
                f"owned_blocks must be 'all' or a set of layer indices, got {owned_blocks!r}"
            )
        return set(range(num_layers))
    owned = set(owned_blocks)
    bad = sorted(i for i in owned if not isinstance(i, int) or not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"owned_blocks {bad} are outside the {num_layers} layers of the model")
    return owned


def _weight_map(checkpoint_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = checkpoint_dir / INDEX_FILE
    single = checkpoint_dir / SINGLE_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        files = {f: checkpoint_dir / f for f in set(names.values())}
        for name, path in sorted(files.items()):
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {name}, which does not exist")
        return {tensor: files[f] for tensor, f in names.items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(
        f"{checkpoint_dir}: no safetensors checkpoint ({SINGLE_FILE} or {INDEX_FILE})"
    )


def from_config(config) -> nn.Module:
    """`config`'s generative model, built as transformers builds it from a config."""
    cls = auto_model_class(config)
    return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def auto_model_class(config):
    """What builds `config`'s generative model: the causal-LM auto class; for a
    vision-language type transformers maps only as image-text-to-text (Qwen3-VL), that one;
    for the text config of a type whose causal LM is built from it (Emu3), its class."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    # a text config of a multimodal type whose causal LM is built from it (Emu3's): the class
    # of that type, found among the types whose config lives in the same module
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        config_name = CONFIG_MAPPING_NAMES.get(model_type)
        owner = getattr(transformers, config_name, None) if config_name else None
        if owner is None or owner.__module__ != type(config).__module__:
            continue
        cls = getattr(transformers, name, None)
        if cls is not None and getattr(cls, "config_class", None) is type(config):
            return cls
    return AutoModelForCausalLM  # its error names the config


def _build_meta(descriptor, config) -> nn.Module:
    # the language model's config carries them in a nested (vision-language) config, as Model
    # Optimizer's set_block_configs puts them; the top level is read too
    block_configs = getattr(config, "block_configs", None)
    if block_configs is None:
        text = descriptor.get_language_model_config(config)
        block_configs = getattr(text, "block_configs", None)
    with torch.device("meta"), deci_x_patcher(descriptor, block_configs) as built:
        model = from_config(config)
    built.check_positions(model, descriptor.layer_block_name)
    return model


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same parameter object (tied weights)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id[id(param)].append(name)
    return {name: names for names in by_id.values() if len(names) > 1 for name in names}


def _replace_unowned(
    descriptor,
    model: nn.Module,
    owned: set[int],
    num_layers: int,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> None:
    for i in range(num_layers):
        if i not in owned:
            # the dummy carries the layer's shape without its weights: the model's own code
            # outside the loop may read into its layers (cache set-up, buffer initialisation)
            name = descriptor.layer_block_name(i)
            original = model.get_submodule(name)
            dummy = descriptor.create_dummy_block(original, i)
            model.set_submodule(name, carry_structure(dummy, original))
    if 0 not in owned and not descriptor.stages_need_token_ids():
        name = descriptor.input_embedding_name()
        weight = getattr(model.get_submodule(name), "weight", None)
        width = int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.dim() else None
        model.set_submodule(name, DummyInputEmbedding(width, dtype))
    last = num_layers - 1 in owned
    if not last:
        name = descriptor.output_embedding_name()
        model.set_submodule(name, _stand_in(model.get_submodule(name), device, dtype))
    norm_name = descriptor.final_norm_name()
    if norm_name is None or owned == set(range(num_layers)):
        return
    # A partial stage: the final norm runs here only on the side of the stack this stage owns.
    # Some models run it before layer 0 too (NanoChat norms the embeddings with it), so a stage
    # owning block 0 needs it there. A norm that holds no tensors costs no reads and is kept on
    # every stage; one that holds tensors is read only with the last block, and a stage owning
    # block 0 that the model asks to run it before layer 0 raises instead of skipping it.
    norm = model.get_submodule(norm_name)
    loaded = last or not any(True for _ in norm.parameters())
    if not loaded:
        norm = _stand_in(norm, device, dtype)
        model.set_submodule(norm_name, norm)
    phase = _StackPhase(model, descriptor, num_layers)
    runs = {_StackPhase.BEFORE} if 0 in owned else set()
    runs |= {_StackPhase.AFTER} if last else set()
    norm.register_forward_hook(
        _gate(phase, runs, loaded, norm_name), with_kwargs=True, always_call=False
    )


class _StackPhase:
    """Where the running forward pass is relative to the layer stack: before layer 0 starts,
    inside the stack, or after the last layer ended. Hooks on the model, the module that owns
    the stack, the first and the last layer keep it current (layers that another stage owns
    are dummies that still run)."""

    BEFORE, INSIDE, AFTER = "before layer 0", "inside the layer stack", "after the last layer"

    def __init__(self, model: nn.Module, descriptor, num_layers: int):
        self.current = self.BEFORE
        stack = descriptor.layer_block_name(0).rpartition(".")[0]
        owner = stack.rpartition(".")[0]
        for module in {id(m): m for m in (model, model.get_submodule(owner))}.values():
            module.register_forward_pre_hook(lambda *_: self._set(self.BEFORE))
        first = model.get_submodule(descriptor.layer_block_name(0))
        last = model.get_submodule(descriptor.layer_block_name(num_layers - 1))
        first.register_forward_pre_hook(lambda *_: self._set(self.INSIDE))
        last.register_forward_hook(lambda *_: self._set(self.AFTER))

    def _set(self, value: str) -> None:
        self.current = value


def _gate(phase: _StackPhase, runs: set[str], loaded: bool, name: str):
    """A forward hook: outside the stack, on the side this stage does not own, the module
    passes its input through (the other stage ran it); on the side it owns, it must have its
    weights."""
    from .puzzformer.no_op import find_hidden_states

    def hook(_module, args, kwargs, output):
        where = phase.current
        if where == _StackPhase.INSIDE:
            return None
        if where not in runs:
            return find_hidden_states(args, kwargs)
        if not loaded:
            raise RuntimeError(
                f"the model runs its final norm {name} {where}, on this stage's side of the "
                "stack, but its weights belong to the stage with the last block: this model "
                "cannot be split there"
            )
        return None

    return hook


def _stand_in(module: nn.Module, device, dtype) -> DummyOutputHead:
    """A pass-through for a final norm or head this stage does not own; it keeps an empty
    `weight` of the loading dtype when the original has one (Mamba reads lm_head.weight.dtype)."""
    if getattr(module, "weight", None) is not None:
        return DummyOutputHead(dtype, device)
    return DummyOutputHead()


def _source_name(
    name: str, aliases: dict[str, list[str]], weight_map: dict[str, Path]
) -> str | None:
    """The checkpoint tensor that fills `name`: itself, or a tied alias of it."""
    for candidate in [name, *aliases.get(name, [])]:
        if candidate in weight_map:
            return candidate
    return None


def _read(checkpoint_dir, weight_map, sources, wanted, device, dtype) -> dict[str, torch.Tensor]:
    """Read each needed checkpoint tensor once (tied names share it), shard file by shard file."""
    by_file: dict[Path, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, source in sources.items():
        by_file[weight_map[source]][source].append(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, needed in sorted(by_file.items()):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for source, names in needed.items():
                stored = tuple(f.get_slice(source).get_shape())
                for name in names:
                    expected = tuple(wanted[name].shape)
                    if stored != expected:
                        raise CheckpointError(
                            f"{path.name}: tensor {source} has shape {stored}, "
                            f"but the model's {name} has shape {expected}"
                        )
                tensor = f.get_tensor(source)
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                for name in names:
                    tensors[name] = tensor
    return tensors


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' loading loop shows a progress bar; a runtime step should not print."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_converted(
    model, checkpoint_dir, weight_map, needed: set[str], device, dtype, aliases=None
) -> None:
    """Fill the module tensors `needed` from checkpoint tensors stored under other names.

    transformers 5 writes some models' tensors under their legacy names (Mixtral's
    `block_sparse_moe.experts.N.w1.weight` for the module's fused `mlp.experts.gate_up_proj`)
    and converts them back when loading. Its own conversion machinery (the model's conversion
    mapping, `rename_source_key`, `convert_and_load_state_dict_in_model`) is used here too: only
    the checkpoint tensors that rename onto a needed tensor are read, and transformers renames,
    stacks and assigns them.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        convert_and_load_state_dict_in_model,
        rename_source_key,
    )
    from transformers.modeling_utils import LoadStateDictConfig

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    targets = {
        key: rename_source_key(key, renamings, converters, prefix, meta)
        for key in weight_map
        if key not in meta
    }
    stored = {key: target for key, (target, _) in targets.items() if target in needed}
    filled = set(stored.values())
    # a tied weight (Gemma 3's head) is filled by its alias and re-tied after loading; when the
    # alias itself is not loaded here (a stage without the embedding), the alias's tensor is
    # read for it directly if it is only renamed on disk
    via_alias: dict[str, str] = {}
    for name in sorted(needed - filled):
        for alias in (aliases or {}).get(name, []):
            plain = [k for k, (t, conv) in targets.items() if t == alias and conv is None]
            if alias in filled or plain:
                if alias not in filled:
                    via_alias[name] = plain[0]
                break
    unfilled = sorted(
        n
        for n in needed - filled
        if n not in via_alias and not any(a in filled for a in (aliases or {}).get(n, []))
    )
    if unfilled:
        raise CheckpointError(
            f"{checkpoint_dir}: the checkpoint lacks {len(unfilled)} tensor(s) the model needs "
            f"(under their own names or any name transformers converts to them): "
            + ", ".join(unfilled)
        )
    if not stored:
        return via_alias
    by_file: dict[Path, list[str]] = defaultdict(list)
    for key in stored:
        by_file[weight_map[key]].append(key)
    state: dict[str, torch.Tensor] = {}
    for path, keys in sorted(by_file.items()):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in sorted(keys):
                state[key] = f.get_tensor(key)
    config = LoadStateDictConfig(weight_mapping=mapping, dtype=dtype, device_map={"": str(device)})
    with _no_progress_bars():
        info, _ = convert_and_load_state_dict_in_model(model, state, config)
    bad = sorted(
        f"{name}: stored {tuple(a)}, model {tuple(b)}" for name, a, b in info.mismatched_keys
    )
    if bad:
        raise CheckpointError(
            f"{checkpoint_dir}: converted tensors differ in shape: {'; '.join(bad)}"
        )
    for name in sorted(needed & filled):  # cast as the directly read tensors are
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        value = getattr(owner, attr)
        if value.is_floating_point() and value.dtype != dtype:
            value.data = value.data.to(dtype)
    return via_alias


def _retie(model: nn.Module, aliases: dict[str, list[str]]) -> None:
    """Make names that were one parameter before loading one parameter again."""
    present = dict(model.named_parameters(remove_duplicate=False))
    done: set[str] = set()
    for name, names in aliases.items():
        if name in done:
            continue
        kept = [n for n in names if n in present]
        done.update(names)
        if len(kept) < 2:
            continue
        param = present[kept[0]]
        for other in kept[1:]:
            module_name, _, attr = other.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            setattr(owner, attr, param)
