"""Pipeline-parallel stages on PyTorch's own engine (`torch.distributed.pipelining`).

Each rank loads only its contiguous run of decoder blocks with `load_model(owned_blocks=...)`
(so it reads only those blocks' tensors, plus the embedding on the first stage and the final
norm and LM head on the last) and wraps it as a `PipelineStage`:

    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe
    from puzzletron_runtime import pipeline_stage

    dist.init_process_group()                      # torchrun sets rank and world size
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = pipeline_stage(Descriptor, checkpoint, rank, world, device=f"cuda:{rank}")
    schedule = ScheduleGPipe(stage, n_microbatches=4)
    with torch.no_grad():
        if rank == 0:
            schedule.step(input_ids)               # token ids in
        elif rank == world - 1:
            logits = schedule.step()               # the full model's logits out
        else:
            schedule.step()

A stage passes hidden states on: the first takes token ids, a middle one runs its blocks on
the hidden states it receives (the decoder's own mask, positions and rotary embeddings are
recomputed on every stage, as the decoder's forward does), and the last applies the final
norm, the LM head and whatever the causal-LM class applies after it (logit scaling,
soft-capping) and returns logits. Heterogeneous checkpoints (`block_configs` in config.json)
load through the descriptor's patcher like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .loading import load_model
from .model_descriptor.model_descriptor_factory import ModelDescriptorFactory

__all__ = ["StageModule", "load_stage", "pipeline_stage", "stage_blocks"]


def stage_blocks(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced runs of block indices, one per stage (earlier stages take the
    remainder): stage_blocks(10, 4) -> [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    runs, start = [], 0
    for stage in range(num_stages):
        end = start + base + (stage < extra)
        runs.append(range(start, end))
        start = end
    return runs


class StageModule(nn.Module):
    """One pipeline stage over a model loaded with some of its blocks: token ids (first stage)
    or hidden states (others) in; hidden states (all but the last) or logits (last) out."""

    def __init__(self, model: nn.Module, descriptor: Any, first: bool, last: bool):
        super().__init__()
        if not first and descriptor.stages_need_token_ids():
            raise ValueError(
                f"{descriptor.__name__}: the layers read inputs the model computes from the token "
                "ids before layer 0 (per-layer inputs), and a stage after the first receives only "
                "hidden states: this pipeline cannot split the model"
            )
        self.model = model
        self.first = first
        self.last = last
        # the module that owns the layer stack runs embedding -> layers -> final norm
        stack = descriptor.layer_block_name(0).rpartition(".")[0]
        self.decoder_name = stack.rpartition(".")[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.first else {"inputs_embeds": x}
        if self.last:
            return self.model(**inputs, use_cache=False).logits
        decoder = self.model.get_submodule(self.decoder_name)
        out = decoder(**inputs, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def load_stage(
    descriptor: Any,
    checkpoint_dir: str | Path,
    stage_index: int,
    num_stages: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    blocks: Iterable[int] | None = None,
) -> StageModule:
    """The StageModule of `stage_index` out of `num_stages`: its blocks are `blocks` (a
    contiguous run) or its share from `stage_blocks`."""
    descriptor = ModelDescriptorFactory.get(descriptor)
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index {stage_index} is outside 0..{num_stages - 1}")
    if blocks is None:
        from .loading import _read_config  # the same config load_model reads

        config = _read_config(descriptor, Path(checkpoint_dir))
        num_layers = int(descriptor.get_language_model_config(config).num_hidden_layers)
        blocks = stage_blocks(num_layers, num_stages)[stage_index]
    blocks = sorted(set(blocks))
    if not blocks or blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise ValueError(f"a stage's blocks must be a non-empty contiguous run, got {blocks}")
    model = load_model(descriptor, checkpoint_dir, owned_blocks=blocks, device=device, dtype=dtype)
    first = stage_index == 0
    last = stage_index == num_stages - 1
    if first != (blocks[0] == 0):
        raise ValueError(f"stage {stage_index} must {'' if first else 'not '}own block 0")
    num_layers = len(model.get_submodule(descriptor.layer_block_name(0).rpartition(".")[0]))
    if last != (blocks[-1] == num_layers - 1):
        raise ValueError(
            f"stage {stage_index} must {'' if last else 'not '}own the last block ({num_layers - 1})"
        )
    return StageModule(model, descriptor, first, last)


def pipeline_stage(
    descriptor: Any,
    checkpoint_dir: str | Path,
    stage_index: int,
    num_stages: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    blocks: Iterable[int] | None = None,
    group: Any = None,
):
    """A `torch.distributed.pipelining.PipelineStage` over `load_stage(...)`, for the
    process group `group` (default: the world) in which this rank is stage `stage_index`.
    Input and output shapes are inferred by the pipeline at the first step."""
    from torch.distributed.pipelining import PipelineStage

    module = load_stage(descriptor, checkpoint_dir, stage_index, num_stages, device, dtype, blocks)
    return PipelineStage(module, stage_index, num_stages, torch.device(device), group=group)


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m puzzletron_runtime.pipeline CHECKPOINT --descriptor
    MODULE:CLASS`: run a pipeline over random token ids; the last rank prints the logits' shape
    and, with --check, their largest difference from the whole model loaded on that rank."""
    import argparse
    import importlib
    import os

    import torch.distributed as dist
    from torch.distributed.pipelining import ScheduleGPipe

    parser = argparse.ArgumentParser(prog="python -m puzzletron_runtime.pipeline")
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--descriptor",
        required=True,
        help="module:Class, e.g. generated.llama:LlamaModelDescriptor",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--check", action="store_true", help="compare with the whole model")
    args = parser.parse_args(argv)

    module_name, _, class_name = args.descriptor.partition(":")
    descriptor = getattr(importlib.import_module(module_name), class_name)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        dtype = getattr(torch, args.dtype)
        stage = pipeline_stage(descriptor, args.checkpoint, rank, world, device, dtype)
        schedule = ScheduleGPipe(stage, n_microbatches=args.microbatches)
        vocab = stage.submod.model.config.vocab_size
        ids = torch.randint(
            0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)
        ).to(device)
        with torch.no_grad():
            if rank == 0 and world > 1:
                schedule.step(ids)
            elif rank == world - 1:
                logits = schedule.step(ids) if world == 1 else schedule.step()
                print(f"rank {rank}/{world}: logits {tuple(logits.shape)} {logits.dtype}")
                if args.check:
                    whole = load_model(descriptor, args.checkpoint, device=device, dtype=dtype)
                    reference = torch.cat(
                        [whole(input_ids=c).logits for c in ids.tensor_split(args.microbatches)]
                    )
                    diff = (logits - reference).abs().max().item()
                    print(f"rank {rank}/{world}: largest difference from the whole model: {diff}")
            else:
                schedule.step()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
