"""The Megatron-Core training step beside a plain Hugging Face one: tokens per second, same model,
same weights, same batch, same micro-batching, same optimizer settings.

    .venv/bin/python benchmarks/train_throughput.py                 # tiny (0.6M) and ~25M, on CPU
    .venv/bin/python benchmarks/train_throughput.py --sizes tiny --repeats 10

megatron-r1: `train_step` (Megatron DDP with its contiguous gradient buffer, Megatron's Adam with
gradient clipping, the lr schedule) on the model `models.build` makes, the loss through
`forward_backward` as GRPO and SFT use it. Hugging Face: the same weights exported with `save_hf`
and loaded by `AutoModelForCausalLM`, `torch.optim.AdamW` and `clip_grad_norm_`, the same
token-mean loss over the same micro-batches. Reported: median seconds and tokens/s over the timed
repeats (the first is warm-up), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("MEGATRON_R1_LOG_LEVEL", "WARNING")

from results import append  # noqa: E402

# name -> (model overrides of the tiny stage, sequences, tokens per sequence, micro-batch)
SIZES = {
    "tiny": ([], 128, 128, 64),
    "25m": (["model.hidden_size=512", "model.ffn_hidden_size=2048", "model.num_layers=8", "model.num_attention_heads=8",
             "model.num_query_groups=8"], 32, 256, 8),
}
STAGE = ROOT / "conf/stages/r1_zero_tiny.yaml"


def megatron_side(cfg, tokens: torch.Tensor, micro: int, repeats: int, hf_dir: Path) -> tuple[list[float], int]:
    from megatron_r1.models.build import build_model, num_parameters
    from megatron_r1.models.hf.base import save_hf
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import Batch, lm_loss_fn, train_step

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel, cfg.memory)
    save_hf(model, cfg.model, hf_dir)  # the Hugging Face side starts from these very weights
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.parallel, repeats + 1, cfg.memory)
    batch = Batch(tokens=tokens, loss_mask=torch.ones_like(tokens))
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, micro)
        seconds.append(time.perf_counter() - start)
    return seconds[1:], num_parameters(model)


def hf_side(hf_dir: Path, tokens: torch.Tensor, micro: int, repeats: int, lr: float, clip: float) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    targets = tokens[:, 1:].numel()
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for chunk in tokens.split(micro):
            logits = model(input_ids=chunk).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, chunk[:, 1:, None]).squeeze(-1)
            (-logprobs.sum() / targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per side (after one warm-up)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = p.parse_args()

    from megatron_r1 import distributed
    from megatron_r1.config import load_config

    lines = ["| model | params | batch (seqs x tokens, micro) | megatron-r1 s/step | tok/s | HF s/step | tok/s | megatron-r1 / HF |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name in args.sizes:
        overrides, seqs, length, micro = SIZES[name]
        cfg = load_config(STAGE, overrides)
        distributed.init_distributed(cfg.parallel, cfg.seed)
        tokens = torch.randint(0, cfg.model.vocab_size, (seqs, length), generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
            mcore_s, params = megatron_side(cfg, tokens, micro, args.repeats, Path(tmp))
            hf_s = hf_side(Path(tmp), tokens, micro, args.repeats, cfg.optimizer.lr, cfg.optimizer.clip_grad)
        m, h = statistics.median(mcore_s), statistics.median(hf_s)
        n = tokens.numel()
        lines.append(f"| {name} | {params / 1e6:.1f}M | {seqs} x {length}, {micro} | {m:.3f} | {n / m:,.0f} | {h:.3f} | {n / h:,.0f} | {h / m:.2f}x |")
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"Median of {args.repeats} steps after one warm-up, {torch.get_num_threads()} threads, fp32. "
                 "The last column is the speed ratio (above 1: megatron-r1 is faster).")
    text = "\n".join(lines)
    print("\n" + text + "\n")
    if not args.no_record:
        print("appended to", append("Training step: Megatron-Core vs Hugging Face", text))


if __name__ == "__main__":
    main()
