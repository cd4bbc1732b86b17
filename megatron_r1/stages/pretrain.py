"""Pretrain the tiny base model that the CPU R1-Zero run starts from.

1. Train a BPE tokenizer on R1-template task text (`data.tokenizer`).
2. Pretrain a small dense Megatron model on a stream of R1-template examples (`data.tiny_corpus`):
   question, then either worked steps or a direct answer inside <think>, then <answer>. The share
   of worked-step examples is annealed from `worked_share_start` to `worked_share_end`, so the
   base mostly answers directly (low accuracy, short responses) but has seen the long form: the
   latent behaviour that GRPO can select, as in the R1-Zero paper's picture of accuracy and
   response length rising together. With too few worked examples RL finds nothing to select.
3. Save the result in Hugging Face format (weights, config, tokenizer) to `<run_dir>/hf`.
4. Probe it (`stages.base_probe`): held-out accuracy, and how often and how accurately it shows
   worked steps when sampled, the latent ability R1-Zero selects (`pretrain.probe_samples`, 0: skip).

The result is cached: `stages.base_model.ensure_base_model` reuses `<run_dir>/hf` when it is complete.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from megatron.core import parallel_state

from megatron_r1 import distributed
from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.data.tiny_corpus import CorpusStream, tokenizer_training_texts
from megatron_r1.data.tokenizer import load_tokenizer, train_tokenizer
from megatron_r1.models.build import build_model, num_parameters
from megatron_r1.models.hf.base import save_hf
from megatron_r1.stages.base_probe import describe, probe_base_model
from megatron_r1.train.loop import StepResult, Trainee, TrainingLoop
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.step import Batch, lm_loss_fn, train_step

log = logging.getLogger(__name__)

DONE_MARKER = "pretrain_done.json"


def _corpus(cfg: StageConfig, seed: int) -> CorpusStream:
    """The pretraining stream (tensor/pipeline peers must see the same examples, data-parallel ranks
    different ones: the caller's seed). Settings it cannot honour are config errors."""
    pre = cfg.pretrain
    try:
        return CorpusStream(task=cfg.data.task, task_options=cfg.data.task_options, seed=seed,
                            worked_share_start=pre.worked_share_start, worked_share_end=pre.worked_share_end,
                            worked_share_hold=pre.worked_share_hold, total_examples=cfg.steps * pre.batch_size,
                            languages=cfg.data.languages, cot_languages=pre.cot_languages)
    except ValueError as e:
        raise ConfigError(f"pretrain: {e}") from None


def _encode_examples(tokenizer, stream, n: int, seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example; the completion ends with eos."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, completion in (next(stream) for _ in range(n)):
        prompt_ids = tokenizer.encode(prompt)  # special tokens (BOS) as RL prompts get them
        ids = prompt_ids + tokenizer.encode(completion, add_special_tokens=False) + [eos]
        out.append((ids[:seq_len], len(prompt_ids)))
    return out


def _pad(examples: list[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-padded batch whose loss covers the completions only: the question's digits are random,
    so predicting them is irreducible noise that would drown the arithmetic we want learned."""
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, (ids, prompt_len) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, prompt_len : len(ids)] = 1.0
    return Batch(tokens=tokens, loss_mask=mask)


def run(cfg: StageConfig) -> Path:
    """Train the tokenizer and the base model; returns the Hugging Face output directory."""
    pre = cfg.pretrain
    run_dir = Path(cfg.logging.run_dir)
    hf_dir = run_dir / "hf"
    tok_dir = run_dir / "tokenizer"
    distributed.init_distributed(cfg.parallel, cfg.seed)
    main = distributed.is_main()
    torch.manual_seed(cfg.seed)
    corpus = _corpus(cfg, seed=pre.corpus_seed + 7919 * parallel_state.get_data_parallel_rank())

    # Every rank trains the same tokenizer from the same seed: cheaper than broadcasting files.
    texts = tokenizer_training_texts(pre.tokenizer_texts, seed=pre.corpus_seed, languages=cfg.data.languages, cot_languages=pre.cot_languages)
    tokenizer = train_tokenizer(texts, pre.tokenizer_vocab_size or cfg.model.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens > model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size or lower pretrain.tokenizer_vocab_size")

    model = build_model(cfg.model, cfg.parallel, cfg.memory)
    trainee = Trainee(cfg.model, model, *build_optimizer(model, cfg.optimizer, cfg.parallel, cfg.steps, cfg.memory), hf_dir=tok_dir)
    if main:
        log.info("pretraining the tiny base model: %d parameters, up to %d steps", num_parameters(model), cfg.steps)

    batch_size, seq_len = pre.batch_size, pre.seq_len
    with TrainingLoop(cfg, trainee, cfg.steps, "pretrain") as loop:
        saved = loop.resume() or {}
        stream = corpus.examples(start=loop.start_step * batch_size)  # each example a pure function of its index
        warn = {"after": pre.warn_after_s or None, "start": time.perf_counter()}
        last = {"loss": saved.get("loss", float("nan"))}

        def step(i: int) -> StepResult:
            batch = _pad(_encode_examples(tokenizer, stream, batch_size, seq_len), tokenizer.pad_token_id)
            out = train_step(trainee.ddp, trainee.optimizer, trainee.scheduler, batch, lm_loss_fn, micro_batch_size=batch_size,
                             max_tokens=cfg.memory.max_tokens_per_microbatch)
            last["loss"] = float(out["loss"])
            elapsed = time.perf_counter() - warn["start"]
            if warn["after"] is not None and elapsed > warn["after"]:
                if main:
                    log.warning("pretraining has taken %.0f s (pretrain.warn_after_s=%.0f) at step %d of %d; it runs to the end, "
                                "so the base model does not depend on machine speed", elapsed, warn["after"], i + 1, cfg.steps)
                warn["after"] = None
            row = {"pretrain/loss": last["loss"], "pretrain/lr": out.get("lr", 0.0), "pretrain/grad_norm": out.get("grad_norm", 0.0)}
            return StepResult(row, nonfinite=out.get("nonfinite", 0.0), sequences=batch_size, postfix={"loss": f"{last['loss']:.3f}"})

        loop.run(step, state=lambda: {"loss": last["loss"]})
        loss, steps_done, wall = last["loss"], cfg.steps, loop.wall()

    save_hf(model, cfg.model, hf_dir, tokenizer_dir=tok_dir)
    samples = pre.probe_samples
    # What R1-Zero will have to work with (see stages/base_probe.py); every rank hosts an engine.
    probe = probe_base_model(hf_dir, cfg, k=samples) if samples > 0 else None
    if main:
        summary = {
            "steps": steps_done,
            "final_loss": loss,
            "wall_seconds": round(wall, 1),
            "parameters": num_parameters(model),
            "config": to_dict(cfg),
        }
        if probe is not None:
            log.info("base model: %s", describe(probe))
            summary["base_probe"] = probe.as_dict()
        (run_dir / DONE_MARKER).write_text(json.dumps(summary, indent=2))
        log.info("tiny base model saved to %s (loss %.3f after %d steps)", hf_dir, loss, steps_done)
    return hf_dir
