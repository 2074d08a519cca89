"""End-to-end verification of a generated descriptor on tiny models built through it.

A descriptor is verified when a real model built through it behaves: its names resolve, its
weight groups partition every tensor, heterogeneous block configs change exactly the requested
shapes, a layer with both subblocks no-op is the identity, and a sharded checkpoint loads back
through the runtime with bit-identical logits. `puzzle-gen verify` runs these checks; the tests
in tests/test_generated_descriptors.py assert the same properties independently.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import PuzzleGenError
from .probe import quiet_transformers
from .source import resolve
from .tiny import tiny_config


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class VerificationError(AssertionError):
    pass


def load_generated_package(out: Path):
    """Import the generated package at `out` (the committed one, or any --out directory)."""
    out = out.resolve()
    init = out / "__init__.py"
    if not init.is_file():
        raise PuzzleGenError(f"{out} is not a generated package (no __init__.py)")
    existing = sys.modules.get(out.name)
    if existing is not None and Path(getattr(existing, "__file__", "")).resolve() == init:
        return existing
    name = out.name if out.name.isidentifier() else "puzzle_gen_out"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(out)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_descriptor(model_type: str, out: Path):
    package = load_generated_package(out)
    try:
        return package.get_descriptor(model_type)
    except KeyError as exc:
        raise PuzzleGenError(
            str(exc.args[0]) + f" (run `puzzle-gen generate {model_type}`)"
        ) from None


# -- building blocks (also used by the tests) ---------------------------------------------------
def build(descriptor, config, block_configs=None, device: str = "cpu", seed: int = 0) -> nn.Module:
    """The causal LM of `config` built through the descriptor's patcher."""
    from transformers import AutoModelForCausalLM

    from puzzletron_runtime import deci_x_patcher

    torch.manual_seed(seed)
    with quiet_transformers(), torch.device(device), deci_x_patcher(descriptor, block_configs):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def uniform_block_configs(descriptor, config) -> list[dict]:
    """One block config per layer, all alike, with the sizes the config has (or, for a size the
    config leaves to a default such as GPT-2's n_inner=None, a concrete stand-in)."""
    text = descriptor.get_language_model_config(config)
    kv_field = _override_field(descriptor, "attention")
    ffn_field = _override_field(descriptor, "ffn")
    kv = getattr(text, kv_field, None) if kv_field else None
    width = getattr(text, ffn_field, None) if ffn_field else None
    return [
        {
            "attention": {"no_op": False, "num_key_value_heads": kv if isinstance(kv, int) else 1},
            "ffn": {"no_op": False, "intermediate_size": width if isinstance(width, int) else 64},
        }
        for _ in range(int(text.num_hidden_layers))
    ]


def heterogeneous_block_configs(descriptor, config) -> tuple[list[dict], dict[int, str]]:
    """Uniform block configs except layer 1 (half the FFN width) and layer 2 (one KV head),
    for each size the descriptor maps onto the config. Returns the configs and {layer: the
    weight group whose shapes must change}."""
    configs = uniform_block_configs(descriptor, config)
    expected: dict[int, str] = {}
    if _override_field(descriptor, "ffn") is not None:
        width = configs[1]["ffn"]["intermediate_size"]
        if width > 1:
            configs[1]["ffn"]["intermediate_size"] = width // 2
            expected[1] = "ffn"
    if _override_field(descriptor, "attention") is not None:
        if configs[2]["attention"]["num_key_value_heads"] > 1:
            configs[2]["attention"]["num_key_value_heads"] = 1
            expected[2] = "attention"
    return configs, expected


def _probe_block_config():
    from puzzletron_runtime import BlockConfig

    return BlockConfig.from_dict(
        {
            "attention": {"no_op": False, "num_key_value_heads": 7},
            "ffn": {"no_op": False, "intermediate_size": 11},
        }
    )


def _override_field(descriptor, kind: str) -> str | None:
    """The config field the descriptor writes a block config's `kind` size to."""
    overrides = descriptor.block_config_to_layer_overrides(_probe_block_config())
    marker = 7 if kind == "attention" else 11
    for key, value in overrides.items():
        if value == marker:
            return key
    return None


def weight_groups(descriptor, names, num_layers: int) -> dict[str, list[str]]:
    return descriptor.get_weight_groups(list(names), num_layers)


def partition_problems(descriptor, names, num_layers: int) -> list[str]:
    """Names in no group or in several groups (by the descriptor's own predicates)."""
    preds = descriptor.layer_name_predicates(num_layers)
    problems = []
    for name in names:
        hits = [g for g, p in preds.items() if p.match(name)]
        if len(hits) != 1:
            problems.append(f"{name} in {hits or 'no group'}")
    return problems


def save_sharded(model: nn.Module, directory: Path) -> list[Path]:
    """save_pretrained into at least two safetensors shards; returns the shard files."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    shard_kb = max(1, total // 1024 // 4)
    with quiet_transformers():
        model.save_pretrained(directory, max_shard_size=f"{shard_kb}KB")
    shards = sorted(directory.glob("*.safetensors"))
    if len(shards) < 2:
        raise VerificationError(f"expected a sharded checkpoint, got {len(shards)} file(s)")
    return shards


def sample_input(config, length: int = 12) -> torch.Tensor:
    """Token ids of batch 3: with a batch of 2, `a, _ = zeros_tensor` would unpack a tensor
    along the batch and hide a no-op stand-in that forgot to return a tuple."""
    vocab = int(config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (3, length), generator=g)


def layer_io(model: nn.Module, layer: nn.Module, input_ids: torch.Tensor):
    """(input hidden states, output hidden states) of `layer` during a forward of `model`."""
    seen = {}

    def pre(_m, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def post(_m, _args, _kwargs, output):
        seen["out"] = output[0] if isinstance(output, (tuple, list)) else output

    h1 = layer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layer.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["in"], seen["out"]


# -- the checks -----------------------------------------------------------------------------------
@dataclass
class _Verifier:
    descriptor: type
    config_cls: type
    checks: list[Check] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            self.checks.append(Check(name, True, detail))
        except Exception as exc:  # a failed check is a report line, not a crash
            self.checks.append(Check(name, False, f"{type(exc).__name__}: {exc}"))

    def tiny(self, **extra):
        with quiet_transformers():
            return tiny_config(self.config_cls, **extra)


def verify_descriptor(descriptor, config_cls) -> list[Check]:
    v = _Verifier(descriptor, config_cls)
    d = descriptor

    def names() -> str:
        config = v.tiny()
        model = build(d, config, device="meta")
        paths = {id(m): n for n, m in model.named_modules()}
        n = int(d.get_language_model_config(config).num_hidden_layers)
        _expect(
            paths[id(model.get_input_embeddings())] == d.input_embedding_name(), "input embedding"
        )
        _expect(
            paths[id(model.get_output_embeddings())] == d.output_embedding_name(),
            "output embedding",
        )
        if d.final_norm_name() is not None:
            model.get_submodule(d.final_norm_name())
        classes = d.decoder_layer_cls()
        classes = tuple(classes) if isinstance(classes, list) else (classes,)
        for i in range(n):
            _expect(
                isinstance(model.get_submodule(d.layer_block_name(i)), classes), f"layer {i} class"
            )
        return f"embeddings, final norm, LM head and {n} layers resolve"

    def partition() -> str:
        counted = []
        for label, config, device in (
            ("default", config_cls(), "meta"),
            ("tiny", v.tiny(), "meta"),
            ("tiny tied", v.tiny(tie_word_embeddings=True), "meta"),
        ):
            model = build(d, config, device=device)
            n = int(d.get_language_model_config(config).num_hidden_layers)
            keys = list(model.state_dict().keys())
            problems = partition_problems(d, keys, n)
            _expect(not problems, f"{label} model: {problems[:3]}")
            groups = weight_groups(d, keys, n)
            _expect(sum(map(len, groups.values())) == len(keys), f"{label}: grouping lost names")
            counted.append(f"{len(keys)} {label}")
        return "every tensor in exactly one group (" + ", ".join(counted) + ")"

    def heterogeneous() -> str:
        config = v.tiny()
        blocks, expected = heterogeneous_block_configs(d, config)
        _expect(expected, "the descriptor overrides no block-config size")
        uniform = build(d, config, uniform_block_configs(d, config), device="meta")
        base = {k: tuple(t.shape) for k, t in uniform.state_dict().items()}
        het = build(d, config, blocks, device="meta")
        shapes = {k: tuple(t.shape) for k, t in het.state_dict().items()}
        n = int(d.get_language_model_config(config).num_hidden_layers)
        groups = weight_groups(d, shapes, n)
        changed = {k for k in shapes if shapes[k] != base.get(k)}
        want = set()
        for layer, kind in expected.items():
            group = set(groups.get(f"block_{layer}_{kind}", []))
            hit = changed & group
            _expect(hit, f"block {layer} {kind}: no shape changed")
            want |= hit
        _expect(changed == want, f"unexpected shape changes: {sorted(changed - want)[:4]}")
        return (
            "; ".join(f"block {i} {k}" for i, k in sorted(expected.items()))
            + " changed, nothing else"
        )

    def no_op_identity() -> str:
        config = v.tiny()
        blocks, _ = heterogeneous_block_configs(d, config)
        blocks[1] = {"attention": {"no_op": True}, "ffn": {"no_op": True}}
        model = build(d, config, blocks)
        layer = model.get_submodule(d.layer_block_name(1))
        x, y = layer_io(model, layer, sample_input(config))
        _expect(torch.equal(x, y), "the layer changes its input")
        return "a layer with both subblocks no-op returns its input exactly"

    def single_no_ops() -> str:
        config = v.tiny()
        n = int(d.get_language_model_config(config).num_hidden_layers)
        for kind, other in (("attention", "ffn"), ("ffn", "attention")):
            blocks, _ = heterogeneous_block_configs(d, config)
            blocks[3][kind] = {"no_op": True}
            model = build(d, config, blocks)
            with torch.no_grad():
                logits = model(input_ids=sample_input(config)).logits
            _expect(torch.isfinite(logits).all(), f"{kind} no-op: non-finite logits")
            groups = weight_groups(d, model.state_dict().keys(), n)
            kept = len(groups.get(f"block_3_{kind}", []))
            _expect(kept < len(groups.get(f"block_0_{kind}", [])), f"{kind} no-op drops no weights")
            _expect(
                len(groups.get(f"block_3_{other}", [])) == len(groups.get(f"block_0_{other}", [])),
                f"{kind} no-op changes the {other} weights",
            )
        return "attention-only and FFN-only no-ops run and drop only their own weights"

    def round_trip() -> str:
        from puzzletron_runtime import load_model

        details = []
        for tied in (False, True):
            config = v.tiny(tie_word_embeddings=tied)
            blocks, _ = heterogeneous_block_configs(d, config)
            config.block_configs = blocks
            source = build(d, config)
            ids = sample_input(config)
            with torch.no_grad():
                want = source(input_ids=ids).logits
            with tempfile.TemporaryDirectory() as tmp:
                shards = save_sharded(source, Path(tmp))
                loaded = load_model(d, tmp, dtype=torch.float32)
                with torch.no_grad():
                    got = loaded(input_ids=ids).logits
            _expect(torch.equal(want, got), f"logits differ (tied={tied})")
            details.append(f"{len(shards)} shards{' tied' if tied else ''}")
        return "heterogeneous checkpoint loads with equal logits (" + ", ".join(details) + ")"

    v.run("names resolve", names)
    v.run("weight groups partition", partition)
    v.run("heterogeneous shapes", heterogeneous)
    v.run("no-op identity", no_op_identity)
    v.run("single no-ops", single_no_ops)
    v.run("sharded round trip", round_trip)
    return v.checks


def _expect(condition, message: str) -> None:
    if not condition:
        raise VerificationError(message)


def verify_model_type(model_type: str, out: Path) -> list[Check]:
    descriptor = load_descriptor(model_type, out)
    return verify_descriptor(descriptor, resolve(model_type).config_cls)
