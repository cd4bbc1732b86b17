"""`megatron-r1 <command> CONFIG [section.field=value ...]`

Commands:
  r1-zero      GRPO straight on a base model with rule rewards (DeepSeek-R1-Zero)
  pretrain     train a tokenizer and pretrain the tiny base model (conf/stages/pretrain_tiny.yaml)
  rejection-sample  k samples per prompt from a model, verified and filtered into an SFT set (jsonl + stats)
  sft          supervised fine-tuning on jsonl conversations, response-only loss, packed (conf/stages/sft_tiny.yaml)
  reward-model the scalar reward model: a value head, Bradley-Terry on preference pairs (conf/stages/reward_model_tiny.yaml)
  evaluate     held-out accuracy, maj@k, format, language consistency of any HF model (checkpoint.load_hf) -> eval.json
  eval-checkpoints  every checkpoint of a run (logging.run_dir) on the held-out set, per difficulty level -> checkpoint_eval.jsonl
  grpo         the GRPO loop of r1-zero under its general name (reasoning RL, final RL with reward models)
  show-config  print the resolved config (YAML) and exit
  pipeline     PIPELINE.yaml [run_dir=...] [seed=N]: the R1 stages in order, finished ones skipped (conf/pipelines/)
  plan         STAGE.yaml [overrides] [--nodes N] [--gpu h100|h200|b200|gb200] [--host-gib G] [--search] [--json]: per-GPU memory, fits or not; RL: step time
  convert      to-hf / from-hf: Megatron checkpoints <-> Hugging Face; fp8-to-bf16: FP8 HF weights -> bf16 (`megatron-r1 convert --help`)
  prepare-data a Hub dataset (GSM8K, MATH, DeepScaleR, ...) or reasoning-gym task -> the prompt jsonl the recipes read

`megatron-r1 COMMAND --help` says what each command reads, needs and writes.

Under torchrun or srun every rank runs the same command; rank 0 writes files and prints. A config
error is printed once per host before the ranks exit (torchrun then adds its own traceback and exits 1;
srun reports the highest rank status).

Exit status: 0 done, 1 failed, 2 bad config or arguments, 75 (`preemption.REQUEUE_EXIT_CODE`)
stopped by SIGUSR1/SIGTERM after saving a checkpoint: run the same command again to resume,
76 (`heartbeat.PEER_LOST_EXIT_CODE`) another rank died or froze (the last line names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import yaml

from megatron_r1.config import ConfigError, StageConfig, to_dict
from megatron_r1.config import load_config as _load_yaml
from megatron_r1.train.guards import TrainingHalted
from megatron_r1.train.preemption import REQUEUE_EXIT_CODE, Preempted

COMMANDS = {
    "r1-zero": "megatron_r1.stages.rl:run",
    "grpo": "megatron_r1.stages.rl:run",
    "reward-model": "megatron_r1.stages.reward_model:run",
    "evaluate": "megatron_r1.stages.evaluate:run",
    "eval-checkpoints": "megatron_r1.stages.checkpoint_eval:run",
    "pretrain": "megatron_r1.stages.pretrain:run",
    "sft": "megatron_r1.stages.sft:run",
    "rejection-sample": "megatron_r1.stages.rejection_sampling:run",
    "show-config": None,
    "convert": None,  # its own arguments: see _convert_parser
    "pipeline": None,  # a pipeline file, not a stage config: see megatron_r1/pipeline.py
    "plan": None,  # its own arguments: see _plan_parser
}


# What each stage command does, reads and needs (its --help).
_WRITES = "writes in logging.run_dir: metrics.jsonl (+ tb/), checkpoints/, hf/ (when checkpoint.export_hf), summary.json, plot.png"
COMMAND_HELP = {
    "r1-zero": ("GRPO straight on a base model with rule rewards (DeepSeek-R1-Zero), colocated vLLM engines",
                "reads: model, parallel, memory, rollout, grpo, reward, data, optimizer, checkpoint, logging\n"
                "needs: checkpoint.load_hf (a Hugging Face model directory; with checkpoint.base_stage the tiny base is pretrained when missing)\n"
                + _WRITES + "\nresumes from logging.run_dir/checkpoints when present (checkpoint.resume)"),
    "grpo": ("the GRPO loop of r1-zero under its general name (reasoning RL, final RL with reward models)",
             "reads and needs what r1-zero does; final RL also reward.model_path (reward.general_scorer=reward_model) and data.general_*\n" + _WRITES),
    "sft": ("supervised fine-tuning on jsonl conversations, response-only loss, optionally packed",
            "reads: model, parallel, memory, sft, optimizer, checkpoint, logging\nneeds: checkpoint.load_hf, sft.train_path (jsonl: prompt/response or messages)\n" + _WRITES),
    "reward-model": ("the scalar reward model: the policy with a value head, Bradley-Terry on preference pairs",
                     "reads: model, parallel, memory, reward_model, data (synthetic pairs), optimizer, checkpoint, logging\n"
                     "needs: checkpoint.load_hf; reward_model.train_path/eval_path (prompt/chosen/rejected jsonl), or data.task=chain_sum for synthetic pairs\n"
                     + _WRITES + " (hf/ is a sequence classifier for reward.model_path)"),
    "pretrain": ("train a tokenizer and pretrain the tiny base model (conf/stages/pretrain_tiny.yaml)",
                 "reads: model, parallel, memory, pretrain, data, optimizer, rollout + reward (the base probe), checkpoint, logging\n"
                 "writes in logging.run_dir: tokenizer/, hf/, pretrain_done.json, metrics.jsonl, checkpoints/"),
    "rejection-sample": ("k samples per prompt from a model, verified and filtered into an SFT set",
                         "reads: model, parallel, rollout, rejection, reward, data, checkpoint, logging\nneeds: checkpoint.load_hf\n"
                         "writes in logging.run_dir: data.jsonl (prompt/response rows with provenance), stats.json"),
    "evaluate": ("held-out greedy pass@1, maj@k, format, language consistency of any Hugging Face model",
                 "reads: parallel, rollout, reward, data, logging (eval_samples)\nneeds: checkpoint.load_hf (the model to evaluate)\nwrites: logging.run_dir/eval.json"),
    "eval-checkpoints": ("the base model and every saved checkpoint of a run on the held-out set, per difficulty level",
                         "reads: model, parallel, memory, rollout, reward, data, checkpoint, logging\n"
                         "needs: logging.run_dir (a run with checkpoints/), checkpoint.load_hf (the model the run started from)\n"
                         "writes: logging.run_dir/checkpoint_eval.jsonl (resumable)"),
    "show-config": ("print the resolved config (YAML) and exit", "reads the stage YAML and the overrides; writes nothing"),
}
# Commands with arguments of their own (`megatron-r1 COMMAND --help`).
OWN_PARSERS = {
    "pipeline": "PIPELINE.yaml [run_dir=...] [seed=N]: the R1 stages in order, finished ones skipped (conf/pipelines/)",
    "plan": "STAGE.yaml [overrides] [--nodes N] [--gpu ...] [--host-gib G] [--search] [--json]: per-GPU memory, fits or not; RL: step time",
    "convert": "to-hf / from-hf / fp8-to-bf16: checkpoints <-> Hugging Face",
    "prepare-data": "a dataset or reasoning-gym task -> the prompt jsonl the recipes read",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The sections only some stages read, and which of them each training or generating command reads. A
# config that sets one its command does not read gets one warning (the shared sections, model,
# parallel, data, ..., and the commands that borrow a stage's config, evaluate and eval-checkpoints, are
# not checked).
STAGE_SECTIONS = ("rollout", "grpo", "async", "sft", "reward_model", "rejection", "pretrain")
SECTIONS_READ = {
    "r1-zero": ("rollout", "grpo", "async"),
    "grpo": ("rollout", "grpo", "async"),
    "sft": ("sft",),
    "reward-model": ("reward_model",),
    "pretrain": ("pretrain", "rollout"),  # rollout: the base probe's engine
    "rejection-sample": ("rollout", "rejection"),
}


def unread_sections(command: str, cfg: StageConfig) -> list[str]:
    """Stage-specific sections the config sets (YAML or overrides) that `command` never reads."""
    if command not in SECTIONS_READ:
        return []
    given = getattr(cfg, "given_sections", frozenset())
    return [s for s in STAGE_SECTIONS if s in given and s not in SECTIONS_READ[command]]


def load_config(path, overrides=()) -> StageConfig:
    """A stage config as every command reads it: the YAML and overrides, validated, and the `model:`
    section checked by its architecture's adapter (`models.hf.base.check_model_config`)."""
    from megatron_r1.models.hf.base import check_model_config

    cfg = _load_yaml(path, overrides)
    check_model_config(cfg.model)
    return cfg


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(LOG_LEVELS)}")
    return level


def _parser() -> argparse.ArgumentParser:
    from megatron_r1 import __version__

    p = argparse.ArgumentParser(prog="megatron-r1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"megatron-r1 {__version__}")
    level_help = f"{' | '.join(LOG_LEVELS)} (default INFO, or $MEGATRON_R1_LOG_LEVEL); before or after the command"
    p.add_argument("--log-level", type=_log_level, default=os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO").upper(), help=level_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, details) in COMMAND_HELP.items():
        c = sub.add_parser(name, help=summary, description=f"{summary}\n\n{details}", formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("config", help="stage YAML (a path, or a name under conf/stages/)")
        c.add_argument("overrides", nargs="*", help="section.field=value, e.g. optimizer.lr=1e-5")
        c.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, help=level_help)
    for name, summary in OWN_PARSERS.items():
        sub.add_parser(name, help=summary, add_help=False)  # parsed by its own parser (see main)
    return p


def _quiet_third_party() -> None:
    """Keep the console for our progress bar and summaries: libraries' chatter goes to WARNING."""
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("vllm", "megatron", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1 convert", description="Megatron checkpoints <-> Hugging Face directories; FP8 -> bf16 Hugging Face weights")
    sub = p.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="a Megatron checkpoint (any TP/PP/EP layout) -> a Hugging Face directory")
    to.add_argument("--checkpoint", required=True, help="checkpoint root (holds 'latest' and step_N/)")
    to.add_argument("--step", type=int, help="step to convert (default: the latest)")
    to.add_argument("--out", required=True, help="Hugging Face output directory")
    to.add_argument("--model-config", help="HF directory of the model the run started from (checkpoints that do not record it)")
    to.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the written weights (default: the model's)")
    fr = sub.add_parser("from-hf", help="a Hugging Face directory -> a Megatron checkpoint in a stage's layout")
    fr.add_argument("--hf", required=True, help="Hugging Face model directory")
    fr.add_argument("--stage", required=True, help="stage YAML whose parallel layout and dtype to use")
    fr.add_argument("--out", required=True, help="checkpoint root to write (step 0)")
    fr.add_argument("overrides", nargs="*", help="section.field=value, e.g. parallel.tensor_model_parallel_size=2")
    fp = sub.add_parser("fp8-to-bf16", help="a Hugging Face FP8 checkpoint (DeepSeek-V3's block scales) -> bf16 weights the rollout engine can run")
    fp.add_argument("src", help="FP8 Hugging Face directory (config.json with an fp8 quantization_config)")
    fp.add_argument("dst", help="new output directory (written as DST.tmp, renamed when complete)")
    fp.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="dtype of the dequantized weights (other tensors are copied unchanged)")
    fp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file to write, in GiB")
    return p


def _convert(argv: list[str]) -> int:
    from megatron_r1 import convert

    args = _convert_parser().parse_args(argv)
    if args.direction == "to-hf":
        convert.to_hf(args.checkpoint, args.out, step=args.step, model_config=args.model_config, dtype=args.dtype)
    elif args.direction == "fp8-to-bf16":
        convert.fp8_to_bf16(args.src, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    else:
        convert.from_hf(args.hf, load_config(args.stage, args.overrides), args.out)
    return 0


def _plan_parser() -> argparse.ArgumentParser:
    from megatron_r1.planner import GPUS

    p = argparse.ArgumentParser(prog="megatron-r1 plan", description="Per-GPU memory of a stage's layout on a cluster (fits, or the component "
                                "that breaks it) and, for RL stages, the predicted step time and where it goes")
    p.add_argument("config", help="stage YAML (a path, or a name under conf/stages/)")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. parallel.pipeline_model_parallel_size=16")
    p.add_argument("--nodes", type=int, help="nodes of --gpu (default: $SLURM_NNODES, else the smallest world the layout needs)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--host-gib", type=float, help="CPU memory of one node in GiB (default: the GPU's usual node, e.g. 2048 for a DGX H100)")
    p.add_argument("--search", action="store_true", help="also report the smallest node count on which the layout fits")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def _plan(argv: list[str]) -> int:
    from megatron_r1.planner import GPUS, plan_stage
    from megatron_r1.planner.report import to_json, to_table

    args = _plan_parser().parse_intermixed_args(argv)
    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    cfg = load_config(args.config, args.overrides)
    if args.host_gib is not None and args.host_gib <= 0:
        raise ConfigError(f"--host-gib must be > 0, got {args.host_gib}")
    gpu = dataclasses.replace(GPUS[args.gpu], per_node=args.gpus_per_node)
    if args.host_gib is not None:
        gpu = dataclasses.replace(gpu, host_memory_gib=args.host_gib)
    nodes = args.nodes or int(os.environ.get("SLURM_NNODES", 0))
    if not nodes:
        p = cfg.parallel
        needed = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        needed = max(needed, p.expert_model_parallel_size * (p.expert_tensor_parallel_size or p.tensor_model_parallel_size) * p.pipeline_model_parallel_size)
        engine = cfg.rollout.engine_tensor_parallel_size * cfg.rollout.engine_pipeline_parallel_size
        # disaggregated: the trainer's GPUs and the engines' apart (`planner.memory.rollout_gpus`)
        needed = needed + max(cfg.parallel.rollout_ranks, engine) if cfg.placement == "disaggregated" else max(needed, engine)
        nodes = -(-needed // gpu.per_node)
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    result = plan_stage(cfg, nodes, gpu, search=args.search)
    print(to_json(result) if args.json else to_table(result))
    return 0 if result.fits else 1


def _pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1 pipeline", description="Every stage of a pipeline file in order (conf/pipelines/); "
                                "finished stages are skipped, an interrupted one resumes. Prints the per-stage table (pipeline.json).")
    p.add_argument("pipeline", help="pipeline YAML, e.g. conf/pipelines/r1_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="run_dir=DIR and launcher='torchrun --nproc-per-node 2' override the file's; seed=N goes to every command")
    return p


def _user_error(prefix: str, message: str) -> None:
    """Print a user error so that it reaches the user under torchrun too: the first local rank of each
    host prints it; the others wait a moment before exiting, because torchrun stops the remaining
    ranks as soon as one exits and the printing rank must not be stopped first."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prefix}{message}", file=sys.stderr, flush=True)
    else:
        import time

        time.sleep(5.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare-data"]:
        logging.basicConfig(level=os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        from megatron_r1.stages import prepare_data

        try:
            return prepare_data.main(argv[1:])
        except ConfigError as e:
            print(f"megatron-r1 prepare-data: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["plan"]:
        logging.basicConfig(level=logging.WARNING)
        _quiet_third_party()
        try:
            return _plan(argv[1:])
        except ConfigError as e:
            print(f"megatron-r1 plan: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["convert"]:
        logging.basicConfig(level=os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        _quiet_third_party()
        try:
            return _convert(argv[1:])
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"megatron-r1 convert: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["pipeline"]:
        logging.basicConfig(level=os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        args = _pipeline_parser().parse_args(argv[1:])
        from megatron_r1 import pipeline

        try:
            pipeline.run(args.pipeline, args.overrides)
        except Preempted as e:
            print(f"megatron-r1 pipeline: {e}", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        except (ConfigError, RuntimeError) as e:
            print(f"megatron-r1 pipeline: {e}", file=sys.stderr)
            return 2 if isinstance(e, ConfigError) else 1
        return 0
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_third_party()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # every rank reads the same config: one line per host
        _user_error("megatron-r1: config error: ", str(e))
        return 2
    if args.command == "show-config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if cfg.placement != "colocated" and args.command not in ("r1-zero", "grpo"):
        _user_error("megatron-r1: config error: ", f"placement={cfg.placement} places rollout engines apart from the trainer, "
                    f"which only the GRPO stages (r1-zero, grpo) have; set placement=colocated for {args.command}")
        return 2
    ignored = unread_sections(args.command, cfg)
    if ignored and os.environ.get("RANK", "0") == "0":
        logging.getLogger("megatron_r1.cli").warning(
            "%s: the config's %s section%s %s no effect on this command (read by: %s)", args.command, ", ".join(ignored),
            "s" if len(ignored) > 1 else "", "have" if len(ignored) > 1 else "has",
            "; ".join(f"{s} by {', '.join(c for c, read in SECTIONS_READ.items() if s in read)}" for s in ignored))
    module_name, func_name = COMMANDS[args.command].split(":")
    import importlib

    run = getattr(importlib.import_module(module_name), func_name)
    try:
        run(cfg)
    except (Preempted, ConfigError, FileNotFoundError, TrainingHalted) as e:
        from megatron_r1.distributed import report_once  # torch: only once a stage has run

        # Every rank usually stops for the same reason at once: the first to get here prints it.
        if report_once(str(e)):
            print(f"megatron-r1: {e}", file=sys.stderr, flush=True)
        return REQUEUE_EXIT_CODE if isinstance(e, Preempted) else 1 if isinstance(e, TrainingHalted) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
