"""Benchmark: load_model against transformers' from_pretrained, and a quarter of the blocks
against the whole model, on a ~600 MB checkpoint built here in a temporary directory.

The checkpoint is a Llama of 8 layers (hidden 1024, FFN 4096, 8k vocabulary, fp32, ~570 MB)
saved by save_pretrained in several shards. Every variant runs --repeat times, alternating,
after one untimed read that brings the files into the page cache; the best time is reported.
Both loaders may map the files rather than copy them, so each time is reported twice: the
call alone, and the call followed by touching every parameter (a sum over each), which is
what a first forward pays. Nothing is downloaded.

    python bench/bench_load_model.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from runtime_llama_descriptor import HandLlamaDescriptor
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from puzzletron_runtime import load_model

    hf_logging.disable_progress_bar()
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=512,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(ckpt, max_shard_size="150MB")
        del model
        gc.collect()
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        for f in ckpt.glob("*.safetensors"):  # page cache: every variant reads warm files
            f.read_bytes()

        variants = {
            "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(
                ckpt, dtype=torch.float32
            ),
            "load_model, all blocks": lambda: load_model(HandLlamaDescriptor, ckpt),
            "load_model, blocks {0,1} (+embedding)": lambda: load_model(
                HandLlamaDescriptor, ckpt, owned_blocks={0, 1}
            ),
            "load_model, blocks {2,3}": lambda: load_model(
                HandLlamaDescriptor, ckpt, owned_blocks={2, 3}
            ),
        }
        times = {name: [] for name in variants}
        touched = {name: [] for name in variants}
        for _ in range(args.repeat):
            for name, fn in variants.items():
                start = time.perf_counter()
                loaded = fn()
                times[name].append(time.perf_counter() - start)
                with torch.no_grad():
                    for p in loaded.parameters():
                        p.sum()
                touched[name].append(time.perf_counter() - start)
                del loaded
                gc.collect()
    best = {name: min(t) for name, t in times.items()}
    best_touched = {name: min(t) for name, t in touched.items()}
    whole = best["load_model, all blocks"]
    whole_touched = best_touched["load_model, all blocks"]
    print(f"checkpoint: {size / 1e6:.0f} MB, {config.num_hidden_layers} layers, fp32, CPU")
    print(f"  {'':<40} {'call':>8} {'ratio':>6}   {'+touch':>8} {'ratio':>6}")
    for name in variants:
        t, tt = best[name], best_touched[name]
        print(f"  {name:<40} {t:7.3f}s {t / whole:6.2f}   {tt:7.3f}s {tt / whole_touched:6.2f}")
    print("  (ratios against load_model of all blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
