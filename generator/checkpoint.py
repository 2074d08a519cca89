"""A local checkpoint directory: config.json, safetensors headers, the shard index.

Only JSON is read: config.json, model.safetensors.index.json and the JSON header at the start of
each .safetensors file (an 8-byte little-endian length, then that many bytes of JSON). Tensor data
is never read. Every malformed input raises CheckpointInputError naming the file and the problem,
so the CLI can print it as one line.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import PuzzleGenError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# A header larger than this is not a real one (real ones are a few MB for the largest models).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors\Z")
_DTYPE = re.compile(r"[A-Z0-9_]+\Z")


class CheckpointInputError(PuzzleGenError):
    """A checkpoint file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: str  # the safetensors file (name within the checkpoint directory)


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, raising one-line errors for a missing, empty or invalid file."""
    if not path.exists():
        raise CheckpointInputError(f"{path}: no {what} there")
    if not path.is_file():
        raise CheckpointInputError(f"{path}: {what} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointInputError(f"{path}: cannot read {what}: {_oneline(exc)}") from None
    if not text.strip():
        raise CheckpointInputError(f"{path}: {what} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointInputError(
            f"{path}: {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def read_config_dict(directory: Path) -> dict[str, Any]:
    data = read_json(directory / CONFIG, "config.json")
    if not isinstance(data, dict):
        raise CheckpointInputError(
            f"{directory / CONFIG}: expected a JSON object, found {type(data).__name__}"
        )
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointInputError(f'{directory / CONFIG}: no "model_type" string')
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors file's JSON header (no tensor data)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointInputError(
                    f"{path}: truncated safetensors file ({size} bytes, no header length)"
                )
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointInputError(
                    f"{path}: corrupt safetensors header (declares {length} header bytes, "
                    f"the file has {size})"
                )
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointInputError(f"{path}: cannot read: {_oneline(exc)}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointInputError(
            f"{path}: corrupt safetensors header (not JSON: {_oneline(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointInputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - length
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_entry(path, name, entry, data_size)
    return out


def _tensor_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    def bad(why: str) -> CheckpointInputError:
        return CheckpointInputError(f"{path}: corrupt safetensors header: tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not _DTYPE.match(dtype):
        raise bad(f"has dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"has shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise bad(f"has data offsets {offsets!r} outside the {data_size} data bytes")
    return TensorInfo(dtype, tuple(shape), path.name)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory as found on disk (read lazily, JSON only)."""

    directory: Path

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        return read_config_dict(self.directory)

    @property
    def model_type(self) -> str:
        return self.config_dict["model_type"]

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor of the checkpoint: from the index and its shards, or model.safetensors."""
        index = self.directory / INDEX
        single = self.directory / SINGLE
        if index.exists():
            return self._sharded(index)
        if single.exists():
            return read_safetensors_header(single)
        raise CheckpointInputError(f"{self.directory}: neither {SINGLE} nor {INDEX} there")

    def _sharded(self, index: Path) -> dict[str, TensorInfo]:
        data = read_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointInputError(f'{index}: no "weight_map" object')
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not _SHARD_NAME.match(shard):
                raise CheckpointInputError(
                    f"{index}: tensor {name!r} maps to {shard!r}, not a shard file name"
                )
            if shard not in headers:
                path = self.directory / shard
                if not path.is_file():
                    raise CheckpointInputError(
                        f"{index}: names shard {shard}, which is not in {self.directory}"
                    )
                headers[shard] = read_safetensors_header(path)
            info = headers[shard].get(name)
            if info is None:
                raise CheckpointInputError(
                    f"{index}: tensor {name!r} is mapped to {shard}, whose header lacks it"
                )
            out[name] = info
        return out


_PLAIN = re.compile(r"[\w.\-/:\[\]]+\Z")


def show(name: str) -> str:
    """A tensor or file name as messages print it: as is when plain, else as a Python literal
    (so a name with a newline, quote or terminal escape cannot break the one-line report)."""
    return name if _PLAIN.match(name) and name.isascii() else repr(name)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- checks of an inferred descriptor against the checkpoint ------------------------------------
MAX_LISTED = 12


def check_checkpoint(ckpt: Checkpoint, preds, probe) -> None:
    """The checkpoint's real tensors against the descriptor and the config: layer count, the
    weight groups as an exact partition (reported tensor by tensor), and every tensor shape the
    config builds."""
    from .errors import InferenceError
    from .predicates import compile_groups

    tensors = ckpt.tensors
    num_layers = probe.num_layers
    layer_re = re.compile(rf"^{preds.layer_prefix_regex()}\.(\d+)\.")
    seen_layers = {int(m.group(1)) for n in tensors if (m := layer_re.match(n))}
    config_path = ckpt.directory / CONFIG
    if seen_layers and max(seen_layers) >= num_layers:
        raise CheckpointInputError(
            f"{config_path} says {num_layers} layers, but the checkpoint has tensors of layer "
            f"{max(seen_layers)}"
        )
    missing_layers = sorted(set(range(num_layers)) - seen_layers)
    if seen_layers and missing_layers:
        raise CheckpointInputError(
            f"{config_path} says {num_layers} layers, but the checkpoint has no tensors of "
            f"layer(s) {_listed([str(i) for i in missing_layers])}"
        )
    groups = compile_groups(preds, num_layers)
    problems = []
    # tensors outside the layers first (few, and telling), then layer by layer
    for name in sorted(tensors, key=lambda n: (bool(layer_re.match(n)), _layer_of(layer_re, n))):
        hits = [g for g, p in groups.items() if p.match(name)]
        if not hits:
            problems.append(f"{show(name)} in no group")
        elif len(hits) > 1:
            problems.append(f"{show(name)} in {' and '.join(hits)}")
    if problems:
        hint = (
            f" (transformers renames {probe.source.model_type} tensors between disk and module "
            "at load time, transformers/conversion_mapping.py: the names on disk differ from the "
            "module names the descriptor was built from)"
            if _renamed_on_load(probe.source.model_type)
            else ""
        )
        raise InferenceError(
            "layer_name_predicates",
            f"the groups do not partition the checkpoint's {len(tensors)} tensors "
            f"({len(problems)} wrong): {_listed(problems, sep='; ')}{hint}",
        )
    built = {k: tuple(v.shape) for k, v in probe.model.state_dict().items()}
    contradictions = [
        f"{show(name)} is {list(info.shape)} in {info.file}, the config builds {list(built[name])}"
        for name, info in tensors.items()
        if name in built and tuple(info.shape) != built[name]
    ]
    if contradictions:
        raise CheckpointInputError(
            f"{config_path} contradicts the tensors' shapes: {_listed(contradictions, sep='; ')}"
        )


def _layer_of(layer_re: re.Pattern, name: str) -> int:
    m = layer_re.match(name)
    return int(m.group(1)) if m else -1


def _renamed_on_load(model_type: str) -> bool:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        return bool(get_checkpoint_conversion_mapping(model_type))
    except Exception:  # an older or newer transformers without this helper
        return False


def _listed(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f"{sep}and {more} more" if more > 0 else "")


def origin_fields(source) -> dict[str, Any]:
    """DescriptorSpec fields that record where the code came from."""
    from .spec import IMPORTED_ORIGIN, STATIC_ORIGIN

    if source.trust_remote_code:
        origin = IMPORTED_ORIGIN
    elif getattr(source, "static", None) is not None:  # loading it still needs its code
        return dict(
            requires_trust_remote_code=True,
            code_origin=STATIC_ORIGIN,
            source_argument=source.argument,
        )
    elif source.custom_code is not None:
        origin = "transformers (the checkpoint's own code was parsed, not imported)"
    else:
        origin = "transformers"
    return dict(
        requires_trust_remote_code=bool(source.trust_remote_code),
        code_origin=origin,
        source_argument=source.argument,
    )
