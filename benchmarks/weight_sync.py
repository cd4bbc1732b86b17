"""Weight-sync throughput into the colocated vLLM engine, next to a plain memory copy of the same bytes.

    .venv/bin/python benchmarks/weight_sync.py                      # Qwen2-style, ~40M parameters, fp32
    .venv/bin/python benchmarks/weight_sync.py --hidden 768 --layers 12 --bucket-mb 64
    .venv/bin/python benchmarks/weight_sync.py --profile             # where a sync's time goes, inside vLLM

Both numbers come from the same run on the same tensors:
* memcpy: `Tensor.copy_` of every tensor into a preallocated twin (the floor any in-memory sync pays);
* sync:   `WeightSync.sync` of the Hugging Face-named tensors into the engine, by each refit path:
          `direct` (the model's loaders straight into the live parameters, then the CPU GEMM re-pack;
          rollout/direct_refit.py) and `reload` (vLLM's layer-by-layer reload, its re-pack on CPU, our
          tied-head refresh), each followed by the prefix-cache reset.
The producer hands out the trainer's tensors as they are, so the adapters' gathers are not timed.

Copies per byte: one more sync of each path under a `TorchDispatchMode` that adds up the bytes every
copying op writes (`copy_`, `_to_copy`, `clone`, `cat`, ...), over the bytes of the weights. The tensor
copies are the same code on GPU. On CPU oneDNN's re-pack of each GEMM weight into its blocked layout
comes on top (inside `create_onednn_mm_handler`, C++ the count does not see; timed by `--profile`); on
CUDA `process_weights_after_loading` leaves an unquantized layer's weight as loaded.

`--profile` runs one more sync under cProfile and splits it into the parts of vLLM's in-place
reload (`reload_weights` -> layer-wise reload: each layer is rebuilt in fresh memory, the checkpoint
tensors are copied in by the weight loaders, `process_weights_after_loading` re-packs the GEMM
weights for the CPU kernels, and the result is copied back into the engine's original tensors),
our CPU kernel refresh, and the prefix-cache reset.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# vLLM's start-up log would bury the result lines (override by setting the variable).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/results.py

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
    parser.add_argument("--modes", nargs="+", choices=["direct", "reload"], default=["direct", "reload"],
                        help="refit paths to measure (rollout.weight_loading), one engine after the other")
    parser.add_argument("--profile", action="store_true", help="profile one more sync: where inside vLLM the time goes")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    rows, profiles, copies = [], [], []
    with tempfile.TemporaryDirectory() as path:
        model = build_model(args, path)
        tensors = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]  # tied head
        nbytes = sum(tensor_bytes(v) for _, v in tensors)
        twins = [torch.empty_like(v) for _, v in tensors]
        for mode in args.modes:  # one engine at a time (vLLM keeps one per process)
            engine = VLLMEngine(RolloutConfig(max_model_len=128, weight_loading=mode), path)
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
            rows.append((mode, copy_gbs, sync_gbs, statistics.median(sync_s[1:])))
            with CopyCounter() as counter:
                sync.sync(iter(tensors))
            copies.append((mode, counter.copied / nbytes, dict(counter.by_op)))
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                total = sync.sync(iter(tensors)).seconds
                profiler.disable()
                profiles.append((mode, total, pstats.Stats(profiler), nbytes / copy_gbs / 1e9))
            engine.shutdown()

    params = sum(v.numel() for _, v in tensors)
    print(f"model: {params / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MiB fp32, {len(tensors)} tensors; "
          f"bucket {args.bucket_mb:g} MiB; {torch.get_num_threads()} threads")
    lines = [
        "| model | refit (`rollout.weight_loading`) | bucket | memcpy GB/s | sync GB/s | sync ms | sync / memcpy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode, copy_gbs, sync_gbs, seconds in rows:
        lines.append(f"| {params / 1e6:.1f}M fp32, {len(tensors)} tensors | {mode} | {args.bucket_mb:g} MiB | {copy_gbs:.2f} | "
                     f"{sync_gbs:.2f} | {seconds * 1e3:.0f} | {sync_gbs / copy_gbs:.3f} |")
    if {mode for mode, *_ in rows} == {"direct", "reload"}:
        seconds = {mode: s for mode, _, _, s in rows}
        lines += ["", f"direct refit {seconds['reload'] / seconds['direct']:.2f}x the speed of the reload (sync seconds, reload over direct)"]
    lines += ["", "Bytes copied per byte of weights in one sync (counted op by op: the GPU path's copies too; CPU's oneDNN "
              "re-pack comes on top, see the profile):", "",
              "| refit | tensor copies per weight byte | by op |", "|---|---:|---|"]
    for mode, copied, by_op in copies:
        ops = ", ".join(f"`{op}` {b / nbytes:.2f}" for op, b in sorted(by_op.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {mode} | {copied:.2f} | {ops} |")
    for mode, total, stats, memcpy_s in profiles:
        lines += ["", f"Where one `{mode}` sync's time goes:", "", *profile_table(total, stats, memcpy_s, PROFILE_PARTS[mode])]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_record:
        from results import append

        print("appended to", append("Weight sync into vLLM vs memcpy", text))


class CopyCounter(TorchDispatchMode):
    """Bytes written by copying ops, for every op dispatched while it is active (vLLM's engine runs in
    this process, so its loaders are seen too). The ops as they reach the dispatcher: `contiguous` and
    `.to()` arrive as `clone` / `_to_copy`, `_copy_from` as `copy_`."""

    COPIES = {"copy_", "_to_copy", "clone", "cat", "stack", "index_copy_", "index_put_", "narrow_copy"}

    def __init__(self) -> None:
        super().__init__()
        self.copied = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in self.COPIES:
            written = out if isinstance(out, torch.Tensor) else args[0]
            n = tensor_bytes(written)
            self.copied += n
            self.by_op[name] = self.by_op.get(name, 0) + n
        return out


# Parts of one sync, by the function whose cumulative time measures it (vLLM 0.32's in-place reload),
# as (label, function name, file fragment); indented labels are inside the one above them.
PROFILE_PARTS = {"reload": [
    ("vLLM `reload_weights` (all of the engine's side of the reload)", "reload_weights", "reload/inplace.py"),
    ("&nbsp;&nbsp;model `load_weights`: names, q/k/v + gate/up fusing, per-layer processing", "load_weights", "models/"),
    ("&nbsp;&nbsp;&nbsp;&nbsp;layer rebuilt in fresh memory (`materialize_layer`)", "materialize_layer", "reload/"),
    ("&nbsp;&nbsp;&nbsp;&nbsp;`process_weights_after_loading`: CPU GEMM re-pack (oneDNN)", "process_weights_after_loading", "layers/linear.py"),
    ("&nbsp;&nbsp;&nbsp;&nbsp;copy back into the engine's original tensors", "_copy_and_restore_kernel_tensors", "reload/layerwise.py"),
    ("tied LM head / MoE re-pack (our CPU refresh after the reload)", "_refresh_cpu_kernels", "vllm_engine.py"),
    ("prefix-cache reset", "reset_prefix_cache", "vllm_engine.py"),
], "direct": [
    ("`direct_refit` (all of the engine's side: the model's loaders into the live parameters)", "direct_refit", "direct_refit.py"),
    ("&nbsp;&nbsp;model `load_weights`: names, q/k/v + gate/up fusing, the one copy", "load_weights", "models/"),
    ("&nbsp;&nbsp;`process_weights_after_loading`: CPU GEMM re-pack (oneDNN)", "process_weights_after_loading", "layers/linear.py"),
    ("prefix-cache reset", "reset_prefix_cache", "vllm_engine.py"),
]}


def profile_table(total: float, stats: pstats.Stats, memcpy_s: float, parts: list[tuple[str, str, str]]) -> list[str]:
    """Seconds per part of one profiled sync (cumulative times of the outermost call of each part)."""
    cumulative: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        for _label, fn, where in parts:
            if name == fn and where in filename:
                cumulative[fn] = max(cumulative.get(fn, 0.0), ct)
    rows = ["| part of one sync (cProfile; profiling slows it) | s | share |", "|---|---:|---:|"]
    for label, fn, _where in parts:
        rows.append(f"| {label} | {cumulative.get(fn, 0.0):.3f} | {100 * cumulative.get(fn, 0.0) / total:.0f} % |")
    top_level = [fn for label, fn, _where in parts if not label.startswith("&nbsp;")]
    outside = total - sum(cumulative.get(fn, 0.0) for fn in top_level)
    rows.append(f"| the rest: our bucketing and RPC, outside vLLM | {outside:.3f} | {100 * outside / total:.0f} % |")
    rows.append(f"| whole sync (profiled) | {total:.3f} | 100 % |")
    rows.append(f"| a plain memcpy of the same bytes (unprofiled) | {memcpy_s:.3f} | {100 * memcpy_s / total:.0f} % |")
    hot = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:6]  # by own (exclusive) time
    rows += ["", "| hot spots by own time | calls | s |", "|---|---:|---:|"]
    for (filename, line, name), (_cc, calls, own, _ct, _callers) in hot:
        where = filename.split("site-packages/")[-1] if "site-packages/" in filename else filename.rsplit("/", 2)[-1]
        rows.append(f"| `{name}` ({where}:{line}) | {calls} | {own:.3f} |")
    return rows


if __name__ == "__main__":
    main()
