"""Rules for sizes a converter needs that a config does not hold as a number (a None the
modeling code fills in, a width no field sets alone, the heads of a key/value cache, a Mamba size
no per-layer override sets), each an expression over the text config, confirmed on tiny and
default-size builds of the type."""

from __future__ import annotations

from typing import Any

from puzzletron_runtime.puzzformer.patcher import set_config_field

from ..errors import PuzzleGenError
from ..spec import DescriptorSpec, is_identifier
from .kind_reads import kind_holds, kind_weight_modules

# config fields that name a KV-head count (a candidate where the layer reads one the override
# inference did not confirm)
KV_FIELDS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")


class SizeProbe:
    """Tiny and default-size builds of one model type, for rules a converter applies to a
    config that does not hold a size as a number. Every rule is an expression over the text
    config, evaluated here on both configs against what the model builds, on a layer of the
    kind it is for."""

    def __init__(self, spec: DescriptorSpec):
        from ..probe import quiet_transformers
        from ..source import resolve
        from ..tiny import default_config, tiny_config

        self.spec = spec
        self.stack = spec.layer_stack
        self.source = resolve(spec.model_type)
        self._tiny_config = tiny_config
        with quiet_transformers():
            self.tiny = tiny_config(self.source.config_cls)
            self.default = default_config(self.source.config_cls)

    def config(self, **changes):
        """The tiny config with `changes` to its text config (as the override probes set
        them)."""
        from ..probe import quiet_transformers

        with quiet_transformers():
            config = self._tiny_config(self.source.config_cls)
        text = config.get_text_config()
        for field, value in changes.items():
            set_config_field(text, field, value)
        return config

    def model(self, config, device="meta"):
        from ..probe import build_model

        return build_model(self.source.causal_lm_cls, config, device)

    def shapes(self, config) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.model(config).state_dict().items()}

    def layer_of(self, kind, config) -> int:
        """The first layer of `kind` in the model `config` builds (by the kind's selector)."""
        stack = self.model(config).get_submodule(self.stack)
        for i, layer in enumerate(stack):
            if kind_holds(self.spec, kind, layer):
                return i
        built = f" (configs with {kind.built_by} do)" if kind.built_by else ""
        raise PuzzleGenError(f"the tiny config builds no layer of this kind{built}: not measured")

    def subblock_dims(self, kind, which: str, config) -> set[int]:
        """Every dimension of the `which` tensors of the first layer of `kind`, except the
        hidden size."""
        hidden = config.get_text_config().hidden_size
        layer = f"{self.stack}.{self.layer_of(kind, config)}"
        modules = kind_weight_modules(kind, which)
        prefixes = tuple(f"{layer}.{m}." for m in modules)
        dims = {
            d for k, shape in self.shapes(config).items() if k.startswith(prefixes) for d in shape
        }
        return dims - {hidden}

    @staticmethod
    def evaluate(expr: str, config) -> Any:
        return eval(compile(expr, "<converter>", "eval"), {}, {"text_config": config})  # noqa: S307

    def ffn_width_rule(self, kind, field: str | None) -> tuple[str, str]:
        """The FFN width of a config whose `field` is None (the width a None builds), or of a
        model with no width field at all (a multiple of the hidden size, possibly a field)."""
        tiny = self.tiny.get_text_config()
        hidden = tiny.hidden_size
        if field is not None:
            base = self.shapes(self.tiny)
            widths = [
                c
                for c in sorted(self.subblock_dims(kind, "ffn", self.tiny))
                if self.shapes(self.config(**{field: c})) == base
            ]
            if len(widths) != 1 or widths[0] % hidden:
                raise PuzzleGenError(
                    f"config.{field}=None builds no single multiple of hidden_size"
                )
            ratio = widths[0] // hidden
            expr = (
                f"text_config.{field} if text_config.{field} is not None "
                f"else {ratio} * text_config.hidden_size"
            )
            note = (
                f"config.{field}, or {ratio} x hidden_size where it is None (the width a None "
                "builds, measured on tiny and default-size models)"
            )
        else:
            dims = sorted(d for d in self.subblock_dims(kind, "ffn", self.tiny) if d % hidden == 0)
            if not dims:
                raise PuzzleGenError("no FFN dimension is a multiple of hidden_size")
            ratio = dims[0] // hidden
            expr, note = f"{ratio} * text_config.hidden_size", (
                f"{ratio} x hidden_size: no config field sets the FFN width alone (measured on "
                "tiny and default-size models)"
            )
            for name, value in sorted(vars(tiny).items()):
                if value != ratio or isinstance(value, bool) or not is_identifier(name):
                    continue
                try:
                    changed = self.config(**{name: ratio + 1})
                    if (ratio + 1) * hidden in self.subblock_dims(kind, "ffn", changed):
                        expr = f"text_config.{name} * text_config.hidden_size"
                        note = f"config.{name} x hidden_size, as the modeling code builds it (measured)"
                        break
                except Exception:
                    continue
        for config in (self.tiny, self.default):
            width = self.evaluate(expr, config.get_text_config())
            if field is not None:  # the width a None builds: the same shapes as that width
                same = self.shapes(config) == self.shapes(self._with(config, field, width))
            else:
                same = width in self.subblock_dims(kind, "ffn", config)
            if not same:
                raise PuzzleGenError(f"{expr} is not the FFN width of the model")
        return expr, note

    def _with(self, config, field: str, value: int):
        import copy

        changed = copy.deepcopy(config)
        set_config_field(changed.get_text_config(), field, value)
        return changed

    def kv_heads_rule(self, kind) -> tuple[str, str]:
        """The heads of the key/value cache a forward fills in a layer of `kind`, where no
        override sets them: all the attention heads (multi-head attention), a KV-head field the
        layer reads without an override, or one (multi-query, or a latent cache); the first
        candidate that equals the cache's heads on the tiny config and on configs with another
        head count and another value of each KV-head field."""
        text = self.tiny.get_text_config()
        heads = type(text).attribute_map.get("num_attention_heads", "num_attention_heads")
        present = [f for f in KV_FIELDS if isinstance(getattr(text, f, None), int)]
        count = text.num_attention_heads
        variants = [(heads, h) for h in (count // 2, count * 2)]
        for f in present:
            variants += [(f, v) for v in (getattr(text, f) // 2, getattr(text, f) * 2)]
        measured = [(text, self._cache_heads(kind, self.tiny))]
        for f, value in variants:
            if value < 1 or text.hidden_size % value:
                continue
            try:
                config = self.config(**{f: value})
                measured.append((config.get_text_config(), self._cache_heads(kind, config)))
            except Exception:  # a combination the config refuses
                continue
        if len({(c.num_attention_heads, kv) for c, kv in measured}) < 2:
            raise PuzzleGenError("no second configuration to confirm a KV-heads rule on")
        candidates = [
            ("text_config.num_attention_heads", "config.num_attention_heads: every attention "
             "head has its own keys and values"),
            *((f"text_config.{f}", f"config.{f}, which the layer reads without an override")
              for f in present),
            ("1", "1: one head at any head count (multi-query or latent attention)"),
        ]  # fmt: skip
        for expr, note in candidates:
            if all(self.evaluate(expr, c) == kv for c, kv in measured):
                n = len(measured)
                return expr, f"{note} (the key/value cache of tiny forwards, {n} configs)"
        found = ", ".join(f"{kv} at {c.num_attention_heads} heads" for c, kv in measured)
        raise PuzzleGenError(f"cache heads {found}: no rule")

    def _cache_heads(self, kind, config) -> int:
        import torch

        index = self.layer_of(kind, config)
        torch.manual_seed(0)
        model = self.model(config, "cpu")
        vocab = config.get_text_config().vocab_size
        with torch.no_grad():
            out = model(input_ids=torch.arange(6).unsqueeze(0) % vocab, use_cache=True)
        layer = out.past_key_values.layers[index]
        keys = getattr(layer, "keys", None)
        if not torch.is_tensor(keys):
            filled = sorted(
                n
                for n, v in vars(layer).items()
                if n.endswith("_states") and (torch.is_tensor(v) or (isinstance(v, dict) and v))
            )
            held = f"{', '.join(filled)}, no keys" if filled else "no keys"
            raise PuzzleGenError(
                f"its layers keep no key/value cache (a tiny forward fills a "
                f"{type(layer).__name__} with {held}), so they have no KV heads, and none of "
                "the Mamba-form fields (state, heads, head width, groups) sizes their token "
                "mixer; a block config describes a token mixer by one or the other"
            )
        return int(keys.shape[1])

    def mamba_rule(self, kind, size: str) -> tuple[str, str]:
        """A Mamba size no per-layer override sets: see mamba_rules.mamba_rule."""
        from .mamba_rules import mamba_rule

        return mamba_rule(self, kind, size)
