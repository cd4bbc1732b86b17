"""The GRPO update, megatron-r1 beside plain Hugging Face transformers: real tokens per second on batches with
an R1-Zero length spread, same model, same weights, same batch, same objective, same optimizer settings.

    .venv/bin/python benchmarks/train_throughput.py                      # tiny (0.6M), 25M, 100M on CPU
    .venv/bin/python benchmarks/train_throughput.py --sizes tiny --repeats 10

The batch: prompts of 20-30 tokens and responses drawn as R1-Zero makes them late in training (seven in
ten short, three in ten up to the response cap), built into a trainer batch by the GRPO stage's own
`make_batch`. Three ways to run one update on it (median seconds over the timed repeats, the first is a
warm-up; tokens/s counts real tokens only, prompt + response, never padding):

* megatron-r1, padded: `train_step` with `grpo.micro_batch_size` rows per micro-batch, each as wide as
  the batch's longest row (what the trainer did before `memory.max_tokens_per_microbatch`);
* megatron-r1, token budget: `memory.max_tokens_per_microbatch` = micro-batch rows x the longest row (the
  same activation memory bound as the padded path): rows sorted longest first, each micro-batch cut to
  its own longest row;
* transformers: the same weights exported with `save_hf`, loaded by `AutoModelForCausalLM`, micro-batches of
  the same rows right-padded to the batch's longest with an attention mask (as TRL's GRPOTrainer feeds its
  model), the same clipped surrogate (token mean over the whole batch), the entropy for the log, `AdamW`
  and `clip_grad_norm_`.

The padding share of each is the part of the positions the model ran on that are not real tokens.

`--profile` runs one more padded megatron-r1 update and one more transformers update (the same positions:
both padded to the batch's longest row) under the torch profiler and prints where each spends its time,
op by op: what differs between two trainers doing the same GEMMs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("MEGATRON_R1_LOG_LEVEL", "WARNING")

from results import append  # noqa: E402
from length_plan import response_length  # noqa: E402

# name -> (model preset, sequences per update, response cap, micro-batch rows)
SIZES = {
    "tiny": ("tiny_dense", 128, 96, 64),  # the r1_zero_tiny step: 16 prompts x 8 samples
    "25m": ("bench_25m", 16, 256, 8),
    "100m": ("bench_100m", 8, 256, 4),
}
STAGE = ROOT / "conf/stages/r1_zero_tiny.yaml"


def grpo_samples(n: int, max_response: int, vocab: int, seed: int = 0) -> list:
    """Prompts of 20-30 tokens; responses: 70 % from 5 to a third of the cap, 30 % from half the cap to the cap."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(20, 30))]
        length = response_length(rng, max_response)
        samples.append(SimpleNamespace(prompt_ids=prompt, response_ids=[rng.randrange(1, vocab) for _ in range(length)], logprobs=None))
    return samples


def profiled(update) -> dict:
    """One more call of `update` under the torch profiler: wall seconds and {op: (self seconds, calls)}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        update()
        wall = time.perf_counter() - start
    return {"wall": wall, "ops": {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}}


def op_table(mr1: dict, hf: dict, rows: int = 12) -> list[str]:
    """The ops where the two updates spend the most time, side by side."""
    ops = sorted(set(mr1["ops"]) | set(hf["ops"]), key=lambda op: -max(mr1["ops"].get(op, (0, 0))[0], hf["ops"].get(op, (0, 0))[0]))
    lines = ["| op | megatron-r1 s (calls) | transformers s (calls) |", "|---|---:|---:|"]
    for op in ops[:rows]:
        (a, na), (b, nb) = mr1["ops"].get(op, (0.0, 0)), hf["ops"].get(op, (0.0, 0))
        lines.append(f"| `{op}` | {a:.3f} ({na}) | {b:.3f} ({nb}) |")
    for label, key in (("all ops (self time)", None), ("wall (profiled)", "wall")):
        a = mr1[key] if key else sum(t for t, _ in mr1["ops"].values())
        b = hf[key] if key else sum(t for t, _ in hf["ops"].values())
        lines.append(f"| {label} | {a:.3f} | {b:.3f} |")
    return lines


def megatron_side(cfg, batch, micro: int, max_tokens: int, repeats: int, hf_dir: Path | None,
                  profile: bool = False) -> tuple[list[float], float, int, dict | None]:
    from megatron_r1.models.build import build_model, num_parameters
    from megatron_r1.models.hf.base import save_hf
    from megatron_r1.train.grpo_update import grpo_loss_fn
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import train_step

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel, cfg.memory)
    if hf_dir is not None:
        save_hf(model, cfg.model, hf_dir)  # the Hugging Face side starts from these very weights
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.parallel, repeats + 1, cfg.memory)
    seconds, padding = [], 0.0

    def update():
        return train_step(ddp, optimizer, scheduler, batch, grpo_loss_fn(cfg), micro, with_entropy=True, max_tokens=max_tokens)

    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = update()
        seconds.append(time.perf_counter() - start)
        padding = out["padding_share"]
    return seconds[1:], padding, num_parameters(model), profiled(update) if profile else None


def hf_side(hf_dir: Path, batch, micro: int, repeats: int, lr: float, clip: float, eps: float,
            profile: bool = False) -> tuple[list[float], float, dict | None]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    tokens, mask = batch.tokens, batch.loss_mask[:, 1:]
    lengths = (batch.loss_mask.flip(1).argmax(1) * -1 + batch.seq_len)  # last trained position + 1
    attention = (torch.arange(batch.seq_len)[None] < lengths[:, None]).long()
    total = mask.sum()
    seconds = []

    def update():
        opt.zero_grad(set_to_none=True)
        for rows in torch.arange(batch.size).split(micro):
            logits = model(input_ids=tokens[rows], attention_mask=attention[rows]).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[rows, 1:, None]).squeeze(-1)
            ratio = torch.exp(logprobs - logprobs.detach())
            adv = batch.advantages[rows, None]
            per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
            (per_token * mask[rows]).sum().div(total).backward()
            with torch.no_grad():  # the entropy TRL logs
                probs = torch.softmax(logits, dim=-1)
                _ = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for _ in range(repeats + 1):
        start = time.perf_counter()
        update()
        seconds.append(time.perf_counter() - start)
    return seconds[1:], 1.0 - float(lengths.sum()) / tokens.numel(), profiled(update) if profile else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    p.add_argument("--repeats", type=int, default=5, help="timed updates per side (after one warm-up)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    p.add_argument("--profile", action="store_true", help="also profile one padded update of each (same positions), op by op")
    args = p.parse_args()

    from megatron_r1 import distributed
    from megatron_r1.config import load_config
    from megatron_r1.train.grpo_update import make_batch
    from megatron_r1.train.step import needed_widths

    lines = ["| model | params | batch (seqs, response cap, micro rows) | padded: s/update | real tok/s | padding | "
             "token budget: s/update | real tok/s | padding | transformers: s/update | real tok/s | padding | "
             "budget / padded | budget / transformers |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    profiles = []
    for name in args.sizes:
        preset, seqs, cap, micro = SIZES[name]
        cfg = load_config(STAGE, [f"model={preset}", f"rollout.max_response_tokens={cap}", "rollout.max_model_len=512"])
        distributed.init_distributed(cfg.parallel, cfg.seed)
        samples = grpo_samples(seqs, cap, cfg.model.vocab_size)
        batch = make_batch(samples, torch.randn(seqs, generator=torch.Generator().manual_seed(0)), pad_id=0)
        real = float(needed_widths(batch.loss_mask).sum())
        budget = micro * batch.seq_len  # the padded path's activation bound
        with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
            padded_s, padded_pad, params, mr1_prof = megatron_side(cfg, batch, micro, 0, args.repeats, Path(tmp), args.profile)
            budget_s, budget_pad, _, _ = megatron_side(cfg, batch, micro, budget, args.repeats, None)
            hf_s, hf_pad, hf_prof = hf_side(Path(tmp), batch, micro, args.repeats, cfg.optimizer.lr, cfg.optimizer.clip_grad,
                                            cfg.grpo.clip_eps_high, args.profile)
        if args.profile:
            profiles.append((name, mr1_prof, hf_prof))
        a, b, h = statistics.median(padded_s), statistics.median(budget_s), statistics.median(hf_s)
        lines.append(f"| {name} | {params / 1e6:.1f}M | {seqs}, {cap}, {micro} | {a:.3f} | {real / a:,.0f} | {padded_pad:.0%} | "
                     f"{b:.3f} | {real / b:,.0f} | {budget_pad:.0%} | {h:.3f} | {real / h:,.0f} | {hf_pad:.0%} | "
                     f"{a / b:.2f}x | {h / b:.2f}x |")
        print(lines[-1], flush=True)
    for name, mr1_prof, hf_prof in profiles:
        lines += ["", f"Where one padded update's time goes at {name} (megatron-r1 and transformers on the same positions; "
                  "torch profiler, self time per op):", "", *op_table(mr1_prof, hf_prof)]
    lines.append("")
    lines.append(f"Median of {args.repeats} updates after one warm-up, {torch.get_num_threads()} threads, fp32; real tokens = "
                 "prompt + response, no padding. The ratio columns are speed ratios (above 1: the token-budget update is faster).")
    text = "\n".join(lines)
    print("\n" + text + "\n")
    if not args.no_record:
        print("appended to", append("GRPO update: padded and token-budget micro-batches vs transformers", text))


if __name__ == "__main__":
    main()
