"""Coverage: what puzzle-gen says about every causal-LM model type of the pinned transformers.

The facts live in `generated/coverage.json` (one status and reason per model type, sorted, so a
re-run writes the same bytes); `COVERAGE.md` is rendered from it and from the descriptor table.
`generate --all` records which types generate (and, for the others, the fact that could not be
inferred, or why the type is out of scope); `verify --all` records which generated types pass
every check of the oracle. `puzzle-gen check` fails when COVERAGE.md no longer matches the JSON,
or when a generated type has no verification result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

COVERAGE_JSON = "coverage.json"

VERIFIED = "verified"
FAILING = "failing"
UNVERIFIED = "unverified"  # generated, not verified since
NOT_GENERATED = "not generated"
OUT_OF_SCOPE = "out of scope"
STATUSES = (VERIFIED, FAILING, UNVERIFIED, NOT_GENERATED, OUT_OF_SCOPE)
GENERATED_STATUSES = (VERIFIED, FAILING, UNVERIFIED)


@dataclass(frozen=True)
class Row:
    model_type: str
    status: str
    reason: str = ""  # the failing check and how, the fact not inferred, or why out of scope
    family: str = ""  # dense | MoE | hybrid | multimodal (see `family`), "" when unknown
    failed_checks: tuple[str, ...] = ()  # every check a failing type fails, in order

    @property
    def verified_or_failing(self) -> bool:
        """Whether a verification result is recorded."""
        return self.status in (VERIFIED, FAILING)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.model_type}: unknown coverage status {self.status!r}")


def out_of_scope(model_type: str, config: Any) -> str | None:
    """Why a model type's causal-LM class is not a decoder-only stack, from transformers' own
    facts about it; None when it is in scope."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "the decoder half of an encoder-decoder model (its layers cross-attend)"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "an encoder (transformers maps it to a masked LM); it decodes only as is_decoder"
    fields = config.to_dict() if config is not None else {}
    if any(name.startswith("cross_attention") for name in fields):  # TrOCR: sized for an encoder
        return "a decoder built to cross-attend to an encoder (used inside an encoder-decoder)"
    # a config that declares the decoder flag and leaves it off (BertGeneration), when its model
    # then attends both ways; GPT-NeoX declares it too, but its attention is causal regardless
    if getattr(config, "is_decoder", None) is False and _attends_to_later_tokens(config):
        return (
            "an encoder: with is_decoder off (its default) its logits at a position depend on "
            "later tokens; it decodes only as is_decoder"
        )
    return None


def out_of_scope_by_running(config: Any) -> str | None:
    """Why a type is not a stack of one decoder block per layer, from one forward of a tiny
    model of its config class; None when the run shows nothing of the kind, or fails.

    Asked only of the types inference could not describe (`generate --all`): a generated type
    is checked layer by layer by `verify` instead, and a run costs more than reading a config.
    A layer module that runs more than once in one forward is recurrent depth (HRM runs its
    layer stacks in cycles: the config's layer count counts applications, not layers), which
    block configs, one per layer, cannot describe.
    """
    try:
        model, ids = _tiny_model(config)
    except Exception:
        return None
    import torch

    calls: dict[int, int] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                handles.append(
                    layer.register_forward_pre_hook(
                        lambda m, _a: calls.__setitem__(id(m), calls.get(id(m), 0) + 1)
                    )
                )
    from .probe import quiet_transformers

    try:
        with torch.no_grad(), quiet_transformers():
            model(input_ids=ids)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    repeated = [n for n in calls.values() if n > 1]
    if not repeated:
        return None
    return (
        f"recurrent depth: its layers run several times per forward (a tiny model's "
        f"{len(calls)} layer modules make {sum(calls.values())} layer calls), so there is no "
        "stack of one decoder block per layer for block configs to describe"
    )


def _tiny_model(config: Any):
    """A tiny causal LM of `config`'s class (generator.tiny) and token ids for it."""
    import torch

    from puzzletron_runtime.loading import from_config

    from .probe import quiet_transformers
    from .tiny import VOCAB, tiny_config

    with quiet_transformers():
        torch.manual_seed(0)
        model = from_config(tiny_config(type(config))).eval()
    ids = torch.randint(3, VOCAB - 3, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, ids


def _attends_to_later_tokens(config: Any) -> bool:
    """Whether changing the last token of the input changes the logits at earlier positions of
    a tiny model: by more than 1e-5 of the change at the last position. Rounding (a mixture of
    experts batching tokens differently) moves earlier logits by under 1e-6 of it in every
    causal type; a tiny encoder's near-uniform attention moves them by about 3e-3 of it."""
    import torch

    from .probe import quiet_transformers

    try:
        model, ids = _tiny_model(config)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % (int(ids.max()) + 1) + 3
        with torch.no_grad(), quiet_transformers():
            a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    except Exception:
        return False
    earlier = (a[:, :-1] - b[:, :-1]).abs().max().item()
    last = (a[:, -1] - b[:, -1]).abs().max().item()
    return last > 0 and earlier > 1e-5 * last


FAMILIES = ("dense", "MoE", "hybrid", "multimodal")

# config field names that declare a mixer other than attention (Mamba, SSM, convolutions, ...)
_NON_ATTENTION_FIELD_WORDS = ("mamba", "ssm", "conv_kernel", "block_types", "attn_layer")
# sub-configs of another modality (GIT's vision_config, Moshi's audio_encoder_config)
_OTHER_MODALITIES = ("vision", "audio", "image", "speech")
# attention head counts: a config with none has no attention at all (RWKV)
_HEAD_COUNT_FIELDS = (
    "num_attention_heads",
    "n_head",
    "num_heads",
    "n_heads",
    "decoder_attention_heads",
    "attention_heads",
    "num_attention_heads_per_layer",
)
# recurrent families that name themselves in their model type (xLSTM keeps a num_heads field)
_RECURRENT_TYPES = ("lstm", "rwkv")
# config fields that hold an expert count
_EXPERT_FIELDS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
)


def family(config: Any) -> str:
    """Which kind of stack a default config describes, for reporting coverage by family:
    multimodal (a nested text config, or a sub-config of another modality), hybrid (a layer
    type that is linear attention or not attention at all, fields of a Mamba / SSM /
    convolution mixer, or no attention heads at all), MoE (expert fields), else dense. "" when
    the config does not build."""
    if config is None:
        return ""
    try:
        text = config.get_text_config()
    except Exception:
        return ""
    if text is not config or any(
        name.endswith("_config") and any(m in name for m in _OTHER_MODALITIES)
        for name in config.to_dict()
    ):
        return "multimodal"
    fields = text.to_dict()
    layer_types = [t for t in fields.get("layer_types") or [] if isinstance(t, str)]
    recurrent = not any(name in fields for name in _HEAD_COUNT_FIELDS) or any(
        word in str(fields.get("model_type", "")) for word in _RECURRENT_TYPES
    )
    if (
        recurrent
        or any("linear" in t or "attention" not in t for t in layer_types)
        or any(word in name for name in fields for word in _NON_ATTENTION_FIELD_WORDS)
    ):
        return "hybrid"
    if _has_experts(fields):
        return "MoE"
    return "dense"


def _has_experts(fields: dict) -> bool:
    """An expert count above one, or any set expert / MoE field (a default of one expert, as
    in HunYuan-MoE, or of None, as in dots1, still makes a mixture-of-experts family), also in
    nested sub-configs (DBRX's ffn_config)."""
    for name, value in fields.items():
        if not isinstance(name, str):  # id2label and other int-keyed tables
            continue
        if isinstance(value, dict):
            if _has_experts(value):
                return True
            continue
        if name in _EXPERT_FIELDS and isinstance(value, int) and value > 1:
            return True
        lowered = name.lower()
        if ("moe" in lowered or "expert" in lowered) and value not in (None, False, 0, [], ""):
            return True
    return False


def load(out_dir: Path) -> dict[str, Row]:
    path = out_dir / COVERAGE_JSON
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        t: Row(
            t,
            r["status"],
            r.get("reason", ""),
            r.get("family", ""),
            tuple(r.get("failed_checks", ())),
        )
        for t, r in data["types"].items()
    }


def dumps(rows: dict[str, Row], transformers_version: str) -> str:
    data = {
        "transformers_version": transformers_version,
        "types": {
            t: {k: v for k, v in asdict(rows[t]).items() if k != "model_type" and v != ()}
            for t in sorted(rows)
        },
    }
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def merge(old: dict[str, Row], new: Iterable[Row]) -> dict[str, Row]:
    rows = dict(old)
    for row in new:
        rows[row.model_type] = row
    return rows


def by_family(rows: Iterable[Row]) -> list[tuple[str, int, int]]:
    """(family, verified, in scope) for each family with in-scope types."""
    out = []
    rows = [r for r in rows if r.status != OUT_OF_SCOPE]
    for fam in (*FAMILIES, ""):
        members = [r for r in rows if r.family == fam]
        if members:
            verified = sum(r.status == VERIFIED for r in members)
            out.append((fam or "unknown (not tried, or no default config)", verified, len(members)))
    return out


def summary(rows: dict[str, Row], in_scope_of: Iterable[str]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for t in in_scope_of:
        row = rows.get(t)
        counts[row.status if row else NOT_GENERATED] += 1
    return counts


def first_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
