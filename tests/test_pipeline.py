"""A 2-rank pipeline (torch.distributed.pipelining) over a heterogeneous tiny checkpoint gives
the full model's logits; each rank reads only its own blocks' tensors.

The ranks are spawned by the test (gloo on CPU; NCCL on two GPUs under the `gpu` marker) and
talk over a free port on 127.0.0.1. The last rank compares the pipeline's logits with those of
the whole model loaded in the same process (same device, same thread count), run on the same
micro-batches: the same operations on the same shapes, so the comparison is torch.equal (a
stage boundary only hands a tensor over, bit for bit).
"""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from runtime_llama_descriptor import HandLlamaDescriptor, tiny_llama_config
from transformers import AutoModelForCausalLM

from puzzletron_runtime import deci_x_patcher, load_stage, stage_blocks

BLOCK_CONFIGS = [
    {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 32}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 96}},
    {"attention": {"num_key_value_heads": 2}, "ffn": {"no_op": True}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    {"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 64}},
]
MICROBATCHES = 2


def input_ids():
    return torch.randint(0, 128, (4, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline_ckpt")
    config = tiny_llama_config(num_hidden_layers=len(BLOCK_CONFIGS))
    config.block_configs = BLOCK_CONFIGS
    torch.manual_seed(4)
    with deci_x_patcher(HandLlamaDescriptor):
        model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory, max_shard_size="30KB")
    assert len(list(directory.glob("*.safetensors"))) >= 2
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    return directory, logits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, checkpoint_dir, backend, results_dir):
    """One spawned rank: build its stage, run the schedule, record what it read and got."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    import puzzletron_runtime.loading as loading
    from puzzletron_runtime import load_model

    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        read = []
        real_open = loading.safe_open

        class Recording:
            def __init__(self, *args, **kwargs):
                self.inner = real_open(*args, **kwargs)

            def __enter__(self):
                self.f = self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, name):
                return self.f.get_slice(name)

            def get_tensor(self, name):
                read.append(name)
                return self.f.get_tensor(name)

        loading.safe_open = Recording
        module = load_stage(HandLlamaDescriptor, checkpoint_dir, rank, world, device=device)
        loading.safe_open = real_open
        stage = PipelineStage(module, rank, world, device)
        schedule = ScheduleGPipe(stage, n_microbatches=MICROBATCHES)
        ids = input_ids().to(device)
        record = {"read": read}
        with torch.no_grad():
            if rank == 0:
                schedule.step(ids)
            elif rank == world - 1:
                logits = schedule.step()
                whole = load_model(HandLlamaDescriptor, checkpoint_dir, device=device)
                reference = torch.cat(
                    [whole(input_ids=chunk).logits for chunk in ids.tensor_split(MICROBATCHES)]
                )
                torch.save(
                    {"pipeline": logits.cpu(), "reference": reference.cpu()},
                    Path(results_dir) / "logits.pt",
                )
            else:
                schedule.step()
        (Path(results_dir) / f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_pipeline(checkpoint, backend, tmp_path):
    directory, source_logits = checkpoint
    mp.spawn(
        _rank,
        args=(2, free_port(), str(directory), backend, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    got = torch.load(tmp_path / "logits.pt")
    assert got["pipeline"].shape == source_logits.shape
    assert torch.equal(got["pipeline"], got["reference"])
    # and the whole model is the model that was saved (another process: a tolerance)
    torch.testing.assert_close(got["pipeline"], source_logits, rtol=1e-5, atol=1e-5)
    reads = [set(json.loads((tmp_path / f"rank{r}.json").read_text())["read"]) for r in (0, 1)]
    return reads


def test_two_rank_pipeline_on_cpu_gives_the_full_logits(checkpoint, tmp_path):
    reads = run_pipeline(checkpoint, "gloo", tmp_path)
    # 5 blocks: rank 0 owns 0-2 and the embedding, rank 1 owns 3-4, the final norm and the head
    assert {n.split(".")[2] for n in reads[0] if n.startswith("model.layers.")} == {"0", "1", "2"}
    assert "model.embed_tokens.weight" in reads[0] and "lm_head.weight" not in reads[0]
    assert {n.split(".")[2] for n in reads[1] if n.startswith("model.layers.")} == {"4"}
    assert {"model.norm.weight", "lm_head.weight"} <= reads[1]
    assert "model.embed_tokens.weight" not in reads[1]
    assert not reads[0] & reads[1]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL needs one CUDA device per rank (2)",
)
def test_two_rank_pipeline_on_gpus_with_nccl(checkpoint, tmp_path):
    run_pipeline(checkpoint, "nccl", tmp_path)


def test_stage_blocks_and_stage_checks(checkpoint):
    assert stage_blocks(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert stage_blocks(5, 1) == [range(0, 5)]
    with pytest.raises(ValueError):
        stage_blocks(2, 3)
    directory, source_logits = checkpoint
    with pytest.raises(ValueError, match="contiguous"):
        load_stage(HandLlamaDescriptor, directory, 0, 2, blocks=[0, 2])
    with pytest.raises(ValueError, match="own block 0"):
        load_stage(HandLlamaDescriptor, directory, 1, 2, blocks=[0, 1])
    # a single stage is the whole model
    whole = load_stage(HandLlamaDescriptor, directory, 0, 1)
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids()), source_logits, rtol=1e-5, atol=1e-5)


def test_torchrun_entry_point_with_one_rank(checkpoint):
    """`python -m puzzletron_runtime.pipeline` as torchrun starts it (environment variables
    for a world of one): the README's command, checked against the whole model."""
    import os
    import subprocess
    import sys

    directory, _ = checkpoint
    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]),
        CUDA_VISIBLE_DEVICES="",
    )
    result = subprocess.run(
        [sys.executable, "-m", "puzzletron_runtime.pipeline", str(directory)]
        + ["--descriptor", "runtime_llama_descriptor:HandLlamaDescriptor", "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "rank 0/1: logits (4, 16, 128) torch.float32" in lines
    assert "rank 0/1: largest difference from the whole model: 0.0" in lines
