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
  pipeline     PIPELINE.yaml [run_dir=...]: the R1 stages in order, finished ones skipped (conf/pipelines/)
  plan         STAGE.yaml [overrides] [--nodes N] [--gpu h100|h200|b200] [--search] [--json]: per-GPU memory, fits or not
  convert      to-hf / from-hf: Megatron checkpoints <-> Hugging Face; fp8-to-bf16: FP8 HF weights -> bf16 (`megatron-r1 convert --help`)

Under torchrun or srun every rank runs the same command; rank 0 writes files and prints.

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


def load_config(path, overrides=()) -> StageConfig:
    """A stage config as every command reads it: the YAML and overrides, validated, and the `model:`
    section checked by its architecture's adapter (`models.hf.base.check_model_config`)."""
    from megatron_r1.models.hf.base import check_model_config

    cfg = _load_yaml(path, overrides)
    check_model_config(cfg.model)
    return cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("config", help="stage YAML (a path, or a name under conf/stages/)")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. optimizer.lr=1e-5")
    p.add_argument("--log-level", default=os.environ.get("MEGATRON_R1_LOG_LEVEL", "INFO"))
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

    p = argparse.ArgumentParser(prog="megatron-r1 plan", description="Per-GPU memory of a stage's layout on a cluster: fits or the component that breaks it")
    p.add_argument("config", help="stage YAML (a path, or a name under conf/stages/)")
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. parallel.pipeline_model_parallel_size=16")
    p.add_argument("--nodes", type=int, help="nodes of --gpu (default: $SLURM_NNODES, else the smallest world the layout needs)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
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
    gpu = dataclasses.replace(GPUS[args.gpu], per_node=args.gpus_per_node)
    nodes = args.nodes or int(os.environ.get("SLURM_NNODES", 0))
    if not nodes:
        p = cfg.parallel
        needed = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        needed = max(needed, p.expert_model_parallel_size * (p.expert_tensor_parallel_size or p.tensor_model_parallel_size) * p.pipeline_model_parallel_size)
        needed = max(needed, cfg.rollout.engine_tensor_parallel_size * cfg.rollout.engine_pipeline_parallel_size)
        nodes = -(-needed // gpu.per_node)
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    result = plan_stage(cfg, nodes, gpu, search=args.search)
    print(to_json(result) if args.json else to_table(result))
    return 0 if result.fits else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
        if len(argv) < 2 or argv[1].startswith("-"):
            print("usage: megatron-r1 pipeline PIPELINE.yaml [run_dir=DIR] [launcher='torchrun --nproc-per-node 2']", file=sys.stderr)
            return 2
        from megatron_r1 import pipeline

        try:
            pipeline.run(argv[1], argv[2:])
        except Preempted as e:
            print(f"megatron-r1 pipeline: {e}", file=sys.stderr)
            return REQUEUE_EXIT_CODE
        except (ConfigError, RuntimeError) as e:
            print(f"megatron-r1 pipeline: {e}", file=sys.stderr)
            return 2 if isinstance(e, ConfigError) else 1
        return 0
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_third_party()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank reads the same config: one line per job
            print(f"megatron-r1: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    module_name, func_name = COMMANDS[args.command].split(":")
    import importlib

    run = getattr(importlib.import_module(module_name), func_name)
    try:
        run(cfg)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"megatron-r1: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except (ConfigError, FileNotFoundError) as e:
        from megatron_r1.distributed import report_once  # torch: only once a stage has run

        if report_once(str(e)):  # every rank usually hits the same mistake: one line per job
            print(f"megatron-r1: {e}", file=sys.stderr)
        return 2
    except TrainingHalted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-r1: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
