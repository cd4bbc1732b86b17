"""Weight-sync throughput into the colocated vLLM engine, next to a plain memory copy of the same bytes.

    .venv/bin/python benchmarks/weight_sync.py                      # Qwen2-style, ~40M parameters, fp32
    .venv/bin/python benchmarks/weight_sync.py --hidden 768 --layers 12 --bucket-mb 64

Both numbers come from the same run on the same tensors:
* memcpy: `Tensor.copy_` of every tensor into a preallocated twin (the floor any in-memory sync pays);
* sync:   `WeightSync.sync` of the Hugging Face-named tensors into the engine (vLLM's layer-by-layer
          reload, its kernel repacking on CPU, and the prefix-cache reset).
The producer hands out the trainer's tensors as they are, so the adapters' gathers are not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

# vLLM's start-up log would bury the result lines (override by setting the variable).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from megatron_r1.config import RolloutConfig  # noqa: E402
from megatron_r1.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_r1.rollout.weight_sync import WeightSync, tensor_bytes  # noqa: E402


def build_model(args, path: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=1,
        head_dim=64, tie_word_embeddings=True, max_position_embeddings=512, torch_dtype="float32",
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="model width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="weight-sync bucket size")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as path:
        model = build_model(args, path)
        engine = VLLMEngine(RolloutConfig(max_model_len=128), path)
        tensors = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]  # tied head
        nbytes = sum(tensor_bytes(v) for _, v in tensors)
        twins = [torch.empty_like(v) for _, v in tensors]
        sync = WeightSync(engine, args.bucket_mb)

        copy_s, sync_s = [], []
        for _ in range(args.repeats + 1):  # the first round warms caches and allocators
            start = time.perf_counter()
            for dst, (_, src) in zip(twins, tensors):
                dst.copy_(src)
            copy_s.append(time.perf_counter() - start)
            sync_s.append(sync.sync(iter(tensors)).seconds)
        copy_gbs = nbytes / statistics.median(copy_s[1:]) / 1e9
        sync_gbs = nbytes / statistics.median(sync_s[1:]) / 1e9
        engine.shutdown()

    params = sum(v.numel() for _, v in tensors)
    print(f"model: {params / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB fp32, {len(tensors)} tensors; "
          f"bucket {args.bucket_mb:g} MiB; {torch.get_num_threads()} threads")
    print(f"memcpy (Tensor.copy_)   {copy_gbs:8.2f} GB/s")
    print(f"WeightSync -> vLLM      {sync_gbs:8.2f} GB/s   ({statistics.median(sync_s[1:]) * 1e3:.0f} ms per sync)")
    print(f"ratio sync / memcpy     {sync_gbs / copy_gbs:8.3f}")


if __name__ == "__main__":
    main()
