"""The prefix renames between the names save_pretrained writes and the module names a model
loads them into.

transformers 5 renames some tensors on save (a vision-language model's
`model.language_model.layers.0...` is written `language_model.model.layers.0...`, its head
`lm_head.weight` as `language_model.lm_head.weight`) and back on load. A loader that assigns a
checkpoint's tensors by name, as Model Optimizer's does, needs the module names:
`Converter.convert_weight_name` is its hook, and the Model Optimizer converter renders these
renames into it.
"""

from __future__ import annotations


def prefix_renames(disk_to_module: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """(disk prefix, module prefix) pairs, longest disk prefix first, that turn checkpoint
    names into module names. For each name still wrong, the pairs its two names differ by are
    tried shortest first (what they differ by before the longest dotted ending they share,
    then before shorter ones), and the first is kept under which, applied first-match to every
    checkpoint name, each name it touches becomes exactly its module name. A name whose module
    name no prefix gives (per-expert tensors the load fuses into one) is left as it is."""
    kept: list[tuple[str, str]] = []
    for disk, module in sorted(disk_to_module.items()):
        if rename(disk, kept) == module:
            continue
        for pair in _candidates(disk, module):
            trial = sorted({*kept, pair}, key=lambda p: (-len(p[0]), p))
            if all(  # every name the pair changes the rename of comes out right
                rename(name, trial) == target
                for name, target in disk_to_module.items()
                if rename(name, trial) != rename(name, kept)
            ):
                kept = trial
                break
    return tuple(kept)


def _candidates(disk: str, module: str):
    """The (disk prefix, module prefix) pairs that turn `disk` into `module`, shortest first:
    each keeps a dotted ending both names share, and at least one part of each name before it
    (a prefix added or dropped whole, `vision_tower.` -> `model.vision_tower.`, keeps a part to
    anchor on). None where the names share no ending (a fusion of per-expert tensors)."""
    d, m = disk.split("."), module.split(".")
    shared, most = 0, min(len(d), len(m)) - 1
    while shared < most and d[-1 - shared] == m[-1 - shared]:
        shared += 1
    for k in range(shared, 0, -1):
        yield _prefix(d[: len(d) - k]), _prefix(m[: len(m) - k])


def rename(name: str, renames) -> str:
    """`name` with the first of `renames` whose disk prefix it starts with applied."""
    for disk, module in renames:
        if name.startswith(disk):
            return module + name[len(disk) :]
    return name


def _prefix(parts: list[str]) -> str:
    return "".join(f"{p}." for p in parts)
