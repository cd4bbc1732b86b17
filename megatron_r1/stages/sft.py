"""Supervised fine-tuning on conversations: the cold-start, rejection-sampling and distillation stages.

Same Megatron step, optimizer, checkpoints, metrics and Hugging Face export as the RL loop; the
loss is the token mean of the negative log-likelihood over response tokens (`data/sft.py` builds
the masks and packs rows). The whole schedule (which rows, in which order, in which batch) is a
pure function of the data, `seed` and `sft.*`, computed before the first step, so the
learning-rate schedule knows its length and a resumed run continues with exactly the batch it
would have trained on next.

Outputs in `logging.run_dir`: `metrics.jsonl` (+ TensorBoard), `checkpoints/`, `hf/` (the
fine-tuned model, loadable by transformers and vLLM), `summary.json` and `plot.png`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.data.sft import Row, SFTDataError, SFTDataset, epoch_rows, load_sft_dataset
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import num_parameters
from megatron_r1.stages.base_model import prepare_base_model
from megatron_r1.train.loop import StepResult, TrainingLoop, build_from_hf
from megatron_r1.train.metrics import read_metrics
from megatron_r1.train.step import Batch, data_parallel_share, forward_backward, lm_loss_fn, train_step

log = logging.getLogger(__name__)


def collate(rows: list[Row], pad_id: int, packed: bool) -> Batch:
    """Right-padded `Batch` of rows; packed rows carry their document numbers (`segment_ids`)."""
    width = max(2, max(len(r.ids) for r in rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        tokens[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.float32)
        segments[i, :n] = torch.tensor(r.segments)
    return Batch(tokens=tokens, loss_mask=mask, segment_ids=segments if packed else None)


def schedule(data: SFTDataset, cfg: StageConfig, data_parallel_size: int) -> list[list[Row]]:
    """Every optimizer step's rows, epoch after epoch. A last batch too small to give every
    data-parallel rank a row is dropped (its examples come again next epoch, in another order)."""
    s = cfg.sft
    steps: list[list[Row]] = []
    for epoch in range(s.epochs):
        rows = epoch_rows(data.examples, epoch, cfg.seed, s.max_seq_len, s.packing)
        for start in range(0, len(rows), s.batch_size):
            batch = rows[start : start + s.batch_size]
            if len(batch) >= data_parallel_size:
                steps.append(batch)
    if s.max_steps:
        steps = steps[: s.max_steps]
    if not steps:
        raise ConfigError(
            f"{len(data.examples)} conversations give no batch of at least {data_parallel_size} rows "
            "(one per data-parallel rank); add data or lower sft.batch_size"
        )
    return steps


def _my_rows(rows: list[Row]) -> list[Row]:
    """This data-parallel rank's share of a step's rows."""
    return rows[data_parallel_share(len(rows), "add data or lower sft.batch_size")]


def eval_loss(ddp, data: SFTDataset, cfg: StageConfig, pad_id: int, dp: int) -> float:
    """Token-mean NLL of the held-out conversations' responses (forward only, every rank)."""
    s = cfg.sft
    total, tokens = 0.0, 0.0
    rows = epoch_rows(data.examples, 0, cfg.seed, s.max_seq_len, s.packing)
    if len(rows) < dp:
        raise ConfigError(f"the held-out set packs into {len(rows)} rows, fewer than the {dp} data-parallel ranks; add data or leave sft.eval_path empty")
    chunks = [rows[i : i + s.batch_size] for i in range(0, len(rows), s.batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < dp:  # every rank needs a row: fold a short tail into the batch before
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    for chunk in chunks:
        out = forward_backward(ddp, collate(_my_rows(chunk), pad_id, s.packing), lm_loss_fn, s.micro_batch_size, forward_only=True,
                               max_tokens=cfg.memory.max_tokens_per_microbatch)
        total += out["loss"] * out["num_tokens"]
        tokens += out["num_tokens"]
    return total / max(tokens, 1.0)


def _log_data(name: str, data: SFTDataset) -> None:
    skipped = ", ".join(f"{k} {v}" for k, v in data.skipped.most_common()) or "none"
    log.info("%s: %d conversations (%d response tokens) from %d rows; skipped: %s",
             name, len(data.examples), data.response_tokens, data.rows, skipped)


def run(cfg: StageConfig) -> dict:
    """Fine-tune `checkpoint.load_hf` on `sft.train_path` (every rank calls it); returns the summary on rank 0."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    from megatron.core import parallel_state

    main = distributed.is_main()
    hf_dir, _ = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    try:
        train = load_sft_dataset(cfg.sft.train_path, tokenizer, cfg.sft.template, cfg.sft.max_seq_len)
        held_out = load_sft_dataset(cfg.sft.eval_path, tokenizer, cfg.sft.template, cfg.sft.max_seq_len) if cfg.sft.eval_path else None
    except SFTDataError as e:
        raise ConfigError(str(e)) from None
    dp = parallel_state.get_data_parallel_world_size()
    plan = schedule(train, cfg, dp)
    if main:
        _log_data("train", train)
        if held_out is not None:
            _log_data("eval", held_out)
    trainee = build_from_hf(cfg, hf_dir, len(plan))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    with TrainingLoop(cfg, trainee, len(plan), "SFT") as loop:
        saved = loop.resume()
        initial_eval = saved.get("initial_eval") if saved else None
        if main:
            rows = len(epoch_rows(train.examples, 0, cfg.seed, cfg.sft.max_seq_len, cfg.sft.packing))
            log.info("SFT: %s parameters, %d steps (%d epochs of %d rows of up to %d tokens, packing %s%s)",
                     f"{num_parameters(trainee.model):,}", len(plan), cfg.sft.epochs, rows, cfg.sft.max_seq_len,
                     "on" if cfg.sft.packing else "off", f"; stopping at sft.max_steps={cfg.sft.max_steps}" if cfg.sft.max_steps else "")
        if held_out is not None and saved is None:
            initial_eval = eval_loss(trainee.ddp, held_out, cfg, pad_id, dp)
            loop.metrics.log(0, {"eval/loss": initial_eval})
        last = {"eval": None}

        def step(i: int) -> StepResult:
            rows = plan[i]
            out = train_step(trainee.ddp, trainee.optimizer, trainee.scheduler, collate(_my_rows(rows), pad_id, cfg.sft.packing),
                             lm_loss_fn, cfg.sft.micro_batch_size, max_tokens=cfg.memory.max_tokens_per_microbatch)
            row = {"train/loss": out["loss"], "train/grad_norm": out["grad_norm"], "train/lr": out["lr"],
                   "train/response_tokens": out["num_tokens"], "train/rows": float(len(rows)),
                   "train/fill": sum(len(r.ids) for r in rows) / (len(rows) * cfg.sft.max_seq_len),
                   "train/padding_share": out["padding_share"]}
            postfix = {"loss": f"{out['loss']:.3f}", **({"eval": f"{last['eval']:.3f}"} if last["eval"] is not None else {})}
            return StepResult(row, nonfinite=out.get("nonfinite", 0.0), sequences=len(rows), postfix=postfix)

        def evaluate(done: int) -> dict[str, float]:
            last["eval"] = eval_loss(trainee.ddp, held_out, cfg, pad_id, dp)
            return {"eval/loss": last["eval"]}

        loop.run(step, evaluate=evaluate if held_out is not None else None, eval_every=cfg.sft.eval_every,
                 state=lambda: {"initial_eval": initial_eval})
        final_eval = last["eval"]
        if held_out is not None and final_eval is None:  # resumed at the end
            final_eval = eval_loss(trainee.ddp, held_out, cfg, pad_id, dp)
        loop.export_hf()
        if not main:
            return {}
        history = [r for r in read_metrics(loop.run_dir / "metrics.jsonl") if "train/loss" in r]
        summary = {
            "steps": len(plan),
            "epochs": cfg.sft.epochs,
            "train_conversations": len(train.examples),
            "train_response_tokens": train.response_tokens,
            "skipped": dict(train.skipped),
            "first_loss": history[0]["train/loss"] if history else None,
            "final_loss": history[-1]["train/loss"] if history else None,
            "initial_eval_loss": initial_eval,
            "final_eval_loss": final_eval,
            "wall_seconds": round(loop.wall(), 1),
            "base_model": str(hf_dir),
            "config": to_dict(cfg),
        }
        loop.write_summary(summary, plot=_plot)
    run_dir = loop.run_dir
    print(f"\nSFT finished: {run_dir}\n  train loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} over {len(plan)} steps"
          + (f"\n  eval loss  {initial_eval if initial_eval is not None else float('nan'):.3f} -> {final_eval:.3f}" if final_eval is not None else "")
          + f"\n  model      {run_dir / 'hf'}\n", flush=True)
    return summary


def _plot(run_dir: Path) -> None:
    """Train and eval loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train/loss", "train"), ("eval/loss", "held-out")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("response NLL (token mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plot.png", dpi=110)
    plt.close(fig)
