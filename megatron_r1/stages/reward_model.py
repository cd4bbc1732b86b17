"""Train the scalar reward model (stage `reward_model`): Bradley-Terry on preference pairs.

The model is the policy architecture with a value head (`models/reward_model.py`), initialised from
`checkpoint.load_hf` (a causal LM: its decoder; the head starts random). A pair's loss is
``-log sigmoid(r(chosen) - r(rejected))``, r the scalar at the response's last token (no
end-of-sequence token is appended: transformers' sequence classifiers read the last token that is
not padding, and many tokenizers pad with their end-of-sequence token); the reported
accuracy is the share of pairs with r(chosen) > r(rejected) (0.5 is chance).

Pairs come from `reward_model.train_path` / `eval_path`, or are synthetic for the tiny chain_sum
setting (`data/preferences.py`). Same Megatron step, optimizer, checkpoints (exact resume) and
metrics as the other stages. Outputs in `logging.run_dir`: `metrics.jsonl`, `checkpoints/`, `hf/`
(a `...ForSequenceClassification` directory, `num_labels=1`, that transformers loads and
`reward.model_path` points the final RL stage at), `summary.json` (held-out accuracy before and
after, per pair kind) and `plot.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.data.preferences import PreferencePair, load_preferences, synthetic_pairs
from megatron_r1.data.sft import SFTDataError, resolve_template
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.models.build import num_parameters
from megatron_r1.models.reward_model import last_token_index
from megatron_r1.rewards.reward_model import META_FILE, encode_for_reward, score_sequences
from megatron_r1.stages.base_model import prepare_base_model
from megatron_r1.train.loop import StepResult, TrainingLoop, build_from_hf
from megatron_r1.train.metrics import read_metrics
from megatron_r1.train.step import Batch, data_parallel_share, train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    kind: str


def encode_pairs(pairs: list[PreferencePair], tokenizer, template: str, max_seq_len: int) -> tuple[list[EncodedPair], Counter]:
    """Token ids of both sides (`rewards.reward_model.encode_for_reward`); pairs that cannot be
    encoded or are longer than `max_seq_len` are skipped and counted."""
    template = resolve_template(template, tokenizer)
    out, skipped = [], Counter()
    for pair in pairs:
        sides = []
        for response in (pair.chosen, pair.rejected):
            ids, reason = encode_for_reward(pair.prompt, response, tokenizer, template)
            if ids is None:
                skipped[reason] += 1
                break
            sides.append(ids)
        else:
            if max(len(s) for s in sides) > max_seq_len:
                skipped["longer_than_max_seq_len"] += 1
            else:
                out.append(EncodedPair(sides[0], sides[1], pair.kind))
    return out, skipped


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> Batch:
    """Rows chosen_0, rejected_0, chosen_1, ...: right-padded, the loss mask on each row's last
    token, `extras["last"]` its index."""
    rows = [ids for p in pairs for ids in (p.chosen, p.rejected)]
    width = max(2, max(len(r) for r in rows))
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, len(r) - 1] = 1.0
    last = last_token_index(torch.tensor([len(r) for r in rows]))
    return Batch(tokens=tokens, loss_mask=mask, extras={"last": last})


def bradley_terry_loss_fn(values, _entropy, micro):
    """-log sigmoid(r_chosen - r_rejected), this micro-batch's share of the whole batch's pair mean."""
    rewards = values.gather(1, micro.extras["last"].long().unsqueeze(1)).squeeze(1)
    margin = rewards[0::2] - rewards[1::2]
    loss = -F.logsigmoid(margin).sum() / (micro.num_sequences / 2)
    # Metrics are per row (weighted by the loss mask: one token per row); each pair's value twice.
    both = lambda x: x.repeat_interleave(2)  # noqa: E731
    return loss, {"accuracy": both((margin > 0).float()), "margin": both(margin.detach()),
                  "reward_chosen": both(rewards[0::2].detach()), "reward_rejected": both(rewards[1::2].detach())}


def pairwise_accuracy(model, pairs: list[EncodedPair], pad_id: int, micro_batch_size: int) -> dict[str, float]:
    """Share of pairs ranked right (ties count half), overall and per kind, and the mean margin."""
    scores = score_sequences(model, [ids for p in pairs for ids in (p.chosen, p.rejected)], pad_id, micro_batch_size)
    margin = scores[0::2] - scores[1::2]
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    by_kind: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(pairs, right.tolist()):
        by_kind[p.kind].append(r)
    out = {"eval/accuracy": float(right.mean()), "eval/margin": float(margin.mean())}
    out.update({f"eval/accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
    return out


def _pairs(cfg: StageConfig, split: str) -> tuple[list[PreferencePair], Counter]:
    r = cfg.reward_model
    path = r.train_path if split == "train" else r.eval_path
    if path:
        return load_preferences(path)
    if cfg.data.task != "chain_sum":
        raise ConfigError(f"synthetic preference pairs exist for chain_sum only; give reward_model.{split}_path a jsonl of prompt/chosen/rejected rows")
    n, seed = (r.synthetic_pairs, r.train_seed) if split == "train" else (r.synthetic_eval_pairs, r.eval_seed)
    return synthetic_pairs(n, seed, cfg.data.task_options, cfg.data.languages, cot_in_words=r.synthetic_in_words), Counter()


def run(cfg: StageConfig) -> dict:
    """Train the reward model (every rank calls it); returns the summary on rank 0."""
    distributed.init_distributed(cfg.parallel, cfg.seed)
    from megatron.core import parallel_state

    main = distributed.is_main()
    r = cfg.reward_model
    hf_dir, _ = prepare_base_model(cfg)
    tokenizer = load_tokenizer(hf_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if r.micro_batch_size < 1 or r.batch_size < 1:
        raise ConfigError("reward_model.batch_size and reward_model.micro_batch_size must be >= 1")
    try:
        encoded = {split: (*encode_pairs((got := _pairs(cfg, split))[0], tokenizer, r.template, r.max_seq_len), got[1]) for split in ("train", "eval")}
    except (SFTDataError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    train, train_skipped, train_bad = encoded["train"]
    held_out, eval_skipped, eval_bad = encoded["eval"]
    if not train or not held_out:
        raise ConfigError(f"no usable {'training' if not train else 'held-out'} preference pairs "
                          f"(skipped: {dict(train_skipped + train_bad) if not train else dict(eval_skipped + eval_bad)})")
    dp = parallel_state.get_data_parallel_world_size()
    plan = []
    for epoch in range(r.epochs):
        order = list(range(len(train)))
        random.Random(f"reward_model:{cfg.seed}:{epoch}").shuffle(order)
        plan += [[train[i] for i in order[s : s + r.batch_size]] for s in range(0, len(order), r.batch_size)]
    plan = [b for b in plan if len(b) >= dp]
    if not plan:
        raise ConfigError(f"{len(train)} pairs cannot give each of {dp} data-parallel ranks a pair; add pairs")

    trainee = build_from_hf(cfg, hf_dir, len(plan), head="value")
    mb_rows = 2 * r.micro_batch_size

    with TrainingLoop(cfg, trainee, len(plan), "reward model") as loop:
        saved = loop.resume()
        initial = saved.get("initial_eval") if saved else None
        if main:
            skipped = dict(train_skipped + train_bad)
            log.info("reward model: %s parameters; %d training pairs (skipped: %s), %d held out; %d steps of %d pairs",
                     f"{num_parameters(trainee.model):,}", len(train), skipped or "none", len(held_out), len(plan), r.batch_size)
        if initial is None:
            initial = pairwise_accuracy(trainee.ddp, held_out, pad_id, mb_rows)
            loop.metrics.log(0, initial)
            if main:
                log.info("held-out pairwise accuracy before training: %.1f %%", 100 * initial["eval/accuracy"])
        last = {"eval": None}

        def step(i: int) -> StepResult:
            pairs = plan[i]
            mine = pairs[data_parallel_share(len(pairs), "raise reward_model.batch_size")]
            out = train_step(trainee.ddp, trainee.optimizer, trainee.scheduler, pair_batch(mine, pad_id), bradley_terry_loss_fn, mb_rows, head="value",
                             max_tokens=cfg.memory.max_tokens_per_microbatch, rows_per_unit=2)  # a pair stays in one micro-batch
            row = {"train/loss": out["loss"], "train/accuracy": out["accuracy"], "train/margin": out["margin"],
                   "train/reward_chosen": out["reward_chosen"], "train/reward_rejected": out["reward_rejected"],
                   "train/grad_norm": out["grad_norm"], "train/lr": out["lr"], "train/padding_share": out["padding_share"]}
            return StepResult(row, nonfinite=out.get("nonfinite", 0.0), sequences=2 * len(pairs),
                              postfix={"loss": f"{out['loss']:.3f}", "acc": f"{out['accuracy']:.2f}"})

        def evaluate(done: int) -> dict[str, float]:
            last["eval"] = pairwise_accuracy(trainee.ddp, held_out, pad_id, mb_rows)
            return last["eval"]

        loop.run(step, evaluate=evaluate, eval_every=r.eval_every, state=lambda: {"initial_eval": initial})
        final = last["eval"]
        if final is None:  # resumed at the end
            final = pairwise_accuracy(trainee.ddp, held_out, pad_id, mb_rows)
        if loop.export_hf() is not None and main:  # how inputs were formed, for the scorer in the RL job (rewards/reward_model.py)
            meta = {"template": resolve_template(r.template, tokenizer), "max_seq_len": r.max_seq_len, "base_model": str(hf_dir)}
            (loop.run_dir / "hf" / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if not main:
            return {}
        summary = {
            "steps": len(plan),
            "train_pairs": len(train),
            "eval_pairs": len(held_out),
            "skipped": {"train": dict(train_skipped + train_bad), "eval": dict(eval_skipped + eval_bad)},
            "initial_accuracy": initial["eval/accuracy"],
            "final_accuracy": final["eval/accuracy"],
            "final_accuracy_by_kind": {k.removeprefix("eval/accuracy_"): v for k, v in final.items() if k.startswith("eval/accuracy_")},
            "final_margin": final["eval/margin"],
            "wall_seconds": round(loop.wall(), 1),
            "base_model": str(hf_dir),
            "config": to_dict(cfg),
        }
        loop.write_summary(summary, plot=_plot)
    kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in summary["final_accuracy_by_kind"].items())
    print(f"\nReward model finished: {loop.run_dir}\n  held-out pairwise accuracy {100 * summary['initial_accuracy']:.1f} % -> "
          f"{100 * summary['final_accuracy']:.1f} % ({kinds})\n  model      {loop.run_dir / 'hf'}\n", flush=True)
    return summary


def _plot(run_dir: Path) -> None:
    """Training loss and held-out pairwise accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((a, "train/loss", "Bradley-Terry loss"), (b, "eval/accuracy", "held-out pairwise accuracy")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    b.axhline(0.5, color="grey", linestyle=":", label="chance")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plot.png", dpi=110)
    plt.close(fig)
