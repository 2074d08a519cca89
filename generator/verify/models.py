"""Building, running and saving the tiny models that verification compares.

Two kinds of model take part in every check: the *reference*, transformers' own causal LM built
unpatched from a config, and the *candidate*, the same config built through the descriptor's
`deci_x_patcher`. Everything here is shared by `puzzle-gen verify` and the tests.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from puzzletron_runtime.puzzformer.patcher import set_config_field

from ..probe import quiet_transformers


class VerificationError(AssertionError):
    """A check found the descriptor wrong; the message names the layer and module."""


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise VerificationError(message)


def reference_model(config: Any, device: str = "cpu", seed: int = 0) -> nn.Module:
    """transformers' own causal LM for `config`, built without any patching."""
    from puzzletron_runtime.loading import from_config

    torch.manual_seed(seed)
    with quiet_transformers(), torch.device(device):
        model = from_config(config)
    return model.eval()


def build(descriptor, config, block_configs=None, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The causal LM of `config` built through the descriptor's patcher."""
    from puzzletron_runtime import deci_x_patcher
    from puzzletron_runtime.loading import from_config

    torch.manual_seed(seed)
    with quiet_transformers(), torch.device(device), deci_x_patcher(descriptor, block_configs):
        model = from_config(config)
    return model.eval()


def layer_change_fails(
    model_cls: type, config: Any, stack_path: str, index: int, changes: dict[str, Any]
) -> str | None:
    """Build `model_cls(config)` on the CPU with `changes` to the config of layer `index` alone
    (the way Puzzletron's patcher builds a heterogeneous model, with a stand-in descriptor that
    knows nothing of the model but those changes) and run it: None when it builds and runs,
    else why not. transformers' own weight init may read the whole model's config (Nemotron-H
    sizes a Mamba mixer's A_log by the model's mamba_num_heads), and so may the model itself
    (Falcon-H1 computes one `mup_vector` from the model's Mamba sizes and gives it to every
    layer): such a field cannot differ per layer. A forward that fails just as well with the
    whole model changed is no per-layer failure (a size the model never runs with at all,
    which the round trip leaves alone), so it does not count."""
    from puzzletron_runtime import deci_x_patcher
    from puzzletron_runtime.block_config import BlockConfig
    from puzzletron_runtime.model_descriptor import ModelDescriptor

    with quiet_transformers(), torch.device("meta"):
        stack = model_cls(config).get_submodule(stack_path)
    classes = list(dict.fromkeys(type(layer) for layer in stack))
    own = {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 1}}
    blocks = [BlockConfig.from_dict(own) for _ in range(len(stack))]
    changed = blocks[index]

    class OneLayer(ModelDescriptor):
        decoder_layer_cls = staticmethod(lambda: classes)
        block_config_to_layer_overrides = staticmethod(
            lambda block: dict(changes) if block is changed else {}
        )
        init_rotary_embedding = staticmethod(lambda model, runtime: None)
        input_embedding_name = staticmethod(lambda: "")
        output_embedding_name = staticmethod(lambda: "")
        final_norm_name = staticmethod(lambda: None)
        layer_block_name = staticmethod(lambda i: f"{stack_path}.{i}")
        layer_name_predicates = staticmethod(lambda n: {})

    try:
        with quiet_transformers(), deci_x_patcher(OneLayer, blocks):
            model = model_cls(config)
    except TypeError as exc:
        if "layer index" in str(exc):
            return None  # layers built without their index: no per-layer build to try
        return f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    failure = _forward_fails(model.eval(), config)
    if failure is None:
        return None
    whole = copy.deepcopy(config)
    for field, value in changes.items():
        set_config_field(whole.get_text_config(), field, value)
    try:
        with quiet_transformers():
            runs_whole = _forward_fails(model_cls(whole).eval(), whole) is None
    except Exception:
        runs_whole = False
    return f"it builds, but its forward fails: {failure}" if runs_whole else None


def _forward_fails(model: nn.Module, config: Any) -> str | None:
    try:
        with quiet_transformers():
            logits(model, sample_input(config))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def sample_input(config, length: int = 12) -> torch.Tensor:
    """Token ids of batch 3: with a batch of 2, `a, _ = zeros_tensor` would unpack a tensor
    along the batch and hide a no-op stand-in that forgot to return a tuple."""
    vocab = int(config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (3, length), generator=g)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden states inside a module's output (a tensor, or the first of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def call_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The tensor a module was called on: the first positional tensor, else `hidden_states`,
    else the first tensor keyword argument."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def replace_call_input(args: tuple, kwargs: dict, old: torch.Tensor, new: torch.Tensor):
    """(args, kwargs) of a call with its hidden-states input `old` replaced by `new`."""
    args = tuple(new if a is old else a for a in args)
    kwargs = {k: (new if v is old else v) for k, v in kwargs.items()}
    return args, kwargs


def replace_first(output: Any, tensor: torch.Tensor) -> Any:
    """`output` with its hidden states replaced by `tensor`, keeping the tuple shape."""
    if isinstance(output, torch.Tensor):
        return tensor
    return type(output)([tensor, *output[1:]]) if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def hooks(*handles) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _LayerDone(Exception):
    """Raised by a hook once the layer a forward was run for has returned."""


def run_through(model: nn.Module, layer: nn.Module, input_ids: torch.Tensor) -> None:
    """A forward of `model` that stops as soon as `layer` has returned: what the hooks inside
    the layer (or before it) see is what a full forward shows them, and the layers after it,
    the final norm and the head are not run. The oracle asks thousands of such questions of
    one layer; on hybrid stacks with slow reference kernels the rest of the model was most of
    the time. A layer that never returns (the forward ends first) is a full forward."""

    def stop(_m, _a, _o):
        raise _LayerDone

    with torch.no_grad(), hooks(layer.register_forward_hook(stop)):
        try:
            model(input_ids=input_ids)
        except _LayerDone:
            pass


def layer_io(
    model: nn.Module, layer: nn.Module, input_ids: torch.Tensor, *patches, whole: bool = False
):
    """(input, output) hidden states of `layer` in a forward of `model`, which stops there
    (`run_through`) unless `whole` (the forward runs to the logits: what comes after the layer
    must run too). `patches` are context managers (more hooks) active during the forward."""
    seen: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        seen.setdefault("in", call_input(args, kwargs))

    def post(_m, _args, _kwargs, output):
        seen["out"] = first_tensor(output)

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            hooks(
                layer.register_forward_pre_hook(pre, with_kwargs=True),
                layer.register_forward_hook(post, with_kwargs=True),
            )
        )
        for p in patches:
            stack.enter_context(p)
        if whole:
            logits(model, input_ids)
        else:
            run_through(model, layer, input_ids)
    return seen["in"], seen["out"]


def replace_layer_input(layer: nn.Module, hidden: torch.Tensor):
    """A hook that feeds `hidden` to `layer` instead of what the model computed before it."""

    def pre(_m, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hooks(layer.register_forward_pre_hook(pre, with_kwargs=True))


def save_sharded(model: nn.Module, directory: Path) -> list[Path]:
    """transformers' own save_pretrained into at least two safetensors shards."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    shard_kb = max(1, total // 1024 // 4)
    with quiet_transformers():
        model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    shards = sorted(directory.glob("*.safetensors"))
    expect(len(shards) >= 2, f"expected a sharded checkpoint, got {len(shards)} file(s)")
    return shards


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def under(names, prefix: str) -> set[str]:
    """The names below module `prefix`."""
    return {n for n in names if n.startswith(prefix + ".")}
