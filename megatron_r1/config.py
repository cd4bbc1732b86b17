"""Typed run configuration: one dataclass per concern, nested in a `StageConfig`.

A stage is loaded from YAML (``conf/stages/*.yaml``) and then patched by command-line overrides
written as ``section.field=value``. A section may name a preset instead of spelling it out, e.g.
``model: tiny_dense`` loads ``conf/models/tiny_dense.yaml``; keys beside ``preset:`` override it.

Every field has a default that works for the tiny CPU run. Mistakes end in one ``ConfigError`` line
that names the bad key and the closest valid ones, or the field and the type it expects.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the fix."""


@dataclass
class ModelConfig:
    """Architecture. Field names follow Megatron-Core's TransformerConfig where one exists."""

    arch: Literal["qwen2", "llama", "deepseek_v3"] = "llama"  # Hugging Face family: llama | qwen2 | deepseek_v3 (picks the adapter)
    vocab_size: int = 512  # padded vocabulary size (embedding rows)
    hidden_size: int = 128  # model width
    ffn_hidden_size: int = 512  # dense MLP width (SwiGLU intermediate size)
    num_layers: int = 2  # transformer blocks
    num_attention_heads: int = 2  # query heads
    num_query_groups: int = 2  # key/value heads (GQA when fewer than the query heads)
    kv_channels: int = 64  # head dim (vLLM's CPU attention needs 64/128-style sizes)
    max_position_embeddings: int = 1024  # longest sequence the rotary table covers
    rotary_base: float = 10000.0  # RoPE theta
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    add_qkv_bias: bool = True  # bias on q/k/v (Qwen2; Llama as attention_bias with a zero o_proj bias)
    tie_embeddings: bool = True  # share input embedding and output layer
    init_method_std: float = 0.02  # std of the random init (when no checkpoint is loaded)
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 | bfloat16: dtype of the trained weights
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None  # GPU + Transformer Engine only: delayed | tensorwise | blockwise | mxfp8
    # Multi-latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False  # MLA instead of GQA
    q_lora_rank: int | None = None  # low-rank query compression (None: full q projection)
    kv_lora_rank: int = 512  # latent size of the compressed kv (vLLM CPU MLA needs 512)
    qk_head_dim: int = 128  # non-rotary part of each q/k head
    qk_pos_emb_head_dim: int = 64  # decoupled rotary part of each q/k head (vLLM CPU MLA needs 64)
    v_head_dim: int = 128  # value head dim
    rope_type: Literal["rope", "yarn"] = "rope"  # rope | yarn (DeepSeek-V3 uses yarn for long context)
    rope_scaling_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_position_embeddings: int = 4096  # yarn: pre-extension context length
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_mscale: float = 1.0  # yarn
    rope_mscale_all_dim: float = 0.0  # yarn
    # Mixture of experts (DeepSeek-V3 style).
    num_experts: int | None = None  # routed experts (None: dense model)
    moe_ffn_hidden_size: int | None = None  # width of one routed expert
    moe_shared_expert_intermediate_size: int | None = None  # total width of the shared experts
    moe_router_topk: int = 2  # experts per token
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"  # softmax | sigmoid (DeepSeek-V3: sigmoid)
    moe_router_enable_expert_bias: bool = False  # aux-loss-free load balancing bias (DeepSeek-V3)
    moe_router_bias_update_rate: float = 1e-3  # step size of that bias
    moe_router_num_groups: int | None = None  # group-limited routing: number of expert groups
    moe_router_group_topk: int | None = None  # group-limited routing: groups each token may use
    moe_router_topk_scaling_factor: float | None = None  # routed_scaling_factor
    moe_norm_topk_prob: bool = True  # renormalise the top-k weights (sigmoid routers)
    moe_aux_loss_coeff: float = 0.0  # auxiliary load-balancing loss (0 for aux-loss-free)
    first_k_dense_layers: int = 0  # leading layers with a dense MLP instead of MoE
    mtp_num_layers: int = 0  # multi-token-prediction modules (DeepSeek-V3: 1)
    mtp_loss_scaling_factor: float = 0.1  # weight of the MTP loss


@dataclass
class ParallelConfig:
    """How the trainer is split over ranks (Megatron parallel_state)."""

    tensor_model_parallel_size: int = 1  # TP
    pipeline_model_parallel_size: int = 1  # PP
    expert_model_parallel_size: int = 1  # EP
    expert_tensor_parallel_size: int | None = None  # TP inside experts (None: same as TP)
    context_parallel_size: int = 1  # CP
    num_layers_in_first_pipeline_stage: int | None = None  # uneven PP: layers on the first stage (None: even split)
    num_layers_in_last_pipeline_stage: int | None = None  # uneven PP: layers on the last stage (embedding/loss make the ends heavier)
    sequence_parallel: bool = False  # shard activations along sequence in TP regions (needed for TP+MoE)
    use_distributed_optimizer: bool = False  # ZeRO-1 style optimizer state sharding
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto | nccl | gloo
    timeout_minutes: float = 30.0  # a collective waiting longer fails the job (longest expected imbalance between ranks, e.g. a slow rollout)
    heartbeat_timeout_s: float = 60.0  # a rank silent this long (dead, frozen) ends the job with a message naming it (0: off; distributed.py)
    rollout_ranks: int = 1  # placement=disaggregated: how many of the job's ranks (the last ones) host only vLLM engines (placement.py)

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Decoder layers on each pipeline stage (Megatron's uneven split: first/last given, the rest even)."""
        pp = self.pipeline_model_parallel_size
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if pp == 1:
            return [num_layers]
        ends = [n for n in (first, last) if n is not None]
        middle_stages = pp - len(ends)
        middle_layers = num_layers - sum(ends)
        if any(n < 1 for n in ends) or middle_layers < middle_stages or (middle_stages and middle_layers % middle_stages) or (
            not middle_stages and middle_layers
        ):
            given = ", ".join(f"{n} on the {end} stage" for n, end in ((first, "first"), (last, "last")) if n is not None)
            raise ConfigError(
                f"{num_layers} layers cannot be split over {pp} pipeline stages" + (f" with {given}" if given else "") + ": "
                "the stages between them must get an equal share; change "
                "parallel.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
            )
        each = middle_layers // middle_stages if middle_stages else 0
        return [first if first is not None else each] + [each] * (pp - 2) + [last if last is not None else each]


@dataclass
class MemoryConfig:
    """Trading compute or host memory for GPU memory (what `megatron-r1 plan` weighs)."""

    recompute: Literal["none", "full"] = "none"  # none | full: recompute whole decoder layers in backward (keeps only each layer's input)
    recompute_num_layers: int = 1  # full: layers per recomputed chunk (Megatron's uniform method)
    precision_aware_optimizer: bool = False  # GPU, distributed optimizer: Megatron's precision-aware Adam (TE FusedAdam: bf16 moments); required by optimizer offload
    optimizer_offload_fraction: float = 0.0  # GPU: share of the optimizer state (and its step) kept on the host; needs precision_aware_optimizer
    # RL: what leaves the device while the colocated engine generates (train/memory.py TrainerSwap):
    # none | except_weights: gradients released, optimizer state + reference model to pinned host memory |
    # all: also the policy's weights, after the refit has copied them into the engine
    swap_during_rollout: Literal["none", "except_weights", "all"] = "none"
    # Training micro-batches by a token budget instead of *.micro_batch_size rows (train/step.py): rows sorted
    # longest first, cut into micro-batches of at most this many positions, each only as wide as its longest
    # row (packed with no padding on GPUs with TE), so the forward/backward runs on little padding; the
    # gradient is the same. 0: off (fixed rows per micro-batch).
    max_tokens_per_microbatch: int = 0


@dataclass
class RolloutConfig:
    """The colocated vLLM engine and how it samples."""

    engine_tensor_parallel_size: int = 1  # vLLM TP inside one engine (an engine may span nodes)
    engine_pipeline_parallel_size: int = 1  # vLLM PP inside one engine; engines = world / (TP x PP)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # engine weight dtype: auto = float32 on CPU, bfloat16 on GPU (the only dtypes every backend, MLA included, runs there)
    max_model_len: int = 512  # prompt + response tokens
    gpu_memory_utilization: float = 0.35  # GPU: share of memory vLLM may take (trainer shares the device)
    cpu_kvcache_space_gb: float = 1.0  # CPU: KV cache size
    enforce_eager: bool = True  # no CUDA graphs (faster start, needed on CPU)
    enable_sleep_mode: bool = True  # GPU: free KV cache / weights while training
    sleep_level: int = 2  # 2: drop KV cache and weights (re-sent after every update); 1: keep a host copy of the weights
    seed: int = 0  # engine seed
    n_samples_per_prompt: int = 8  # group size G
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_response_tokens: int = 96  # response budget
    # GRPO training rollouts stop (EOS, stop strings) only after this many tokens (vLLM's min_tokens; 0: whenever
    # the model stops). Benchmarks set it to max_response_tokens so two trainers generate the same work.
    min_response_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # extra stop strings
    sync_bucket_mb: float = 64.0  # weight-sync bucket size
    # The fixed logprob parity probe after the first sync and every N-th (0: never). Every colocated step is also
    # checked for free: the update scores the sampled tokens with the weights that sampled them (weight_sync.check_sampled).
    probe_every: int = 10
    # Fail if the probe's mean |logprob_vllm - logprob_trainer| exceeds it; a step's batch above it is probed (None: per dtype)
    probe_mean_threshold: float | None = None
    probe_max_threshold: float | None = None  # fail if the max exceeds it (None: per dtype, see rollout/weight_sync.py)
    probe_prompts: int = 4  # prompts in the probe batch
    # none | fp8: the engine's weights in blockwise FP8 (128 x 128 scales, as DeepSeek-V3 was trained),
    # quantized by vLLM from the bf16 weights at start and again at every refit (GPU only; rollout/vllm_engine.py)
    quantization: Literal["none", "fp8"] = "none"
    # How a refit gets the new weights into the engine: direct (the model's own weight loaders, straight into the
    # live parameters: one copy; CPU re-packs its GEMMs; rollout/direct_refit.py) | reload (vLLM's layer-wise
    # reload_weights) | auto: direct for unquantized dense models, reload for the rest (quantized, MoE, MLA)
    weight_loading: Literal["auto", "direct", "reload"] = "auto"

    def engine_dtype(self, on_gpu: bool, mla: bool = False) -> str:
        """The dtype the engine runs in. ``auto``: float32 on CPU (AVX2 CPUs have no native bf16,
        and the CPU kernels are exact in fp32, so the parity probe can be strict), bfloat16 on GPU
        (what the RL anchors generate in, and a dtype every CUDA attention backend supports).
        vLLM's CUDA MLA backends (FlashMLA, Triton MLA, ...) have no float32 kernels: an explicit
        float32 MLA engine on a GPU is refused here, before anything loads, instead of by vLLM's
        "No valid attention backend found" after the trainer has built its model."""
        if self.dtype == "auto":
            return "bfloat16" if on_gpu else "float32"
        if on_gpu and mla and self.dtype == "float32":
            raise ConfigError(
                "rollout.dtype=float32: vLLM's CUDA attention for MLA models (DeepSeek-V3) runs in "
                "bfloat16/float16 only; set rollout.dtype=bfloat16 (or auto)"
            )
        return self.dtype


@dataclass
class GRPOConfig:
    """The GRPO objective and its variants."""

    prompts_per_step: int = 16  # prompts sampled per RL step (batch = prompts x group size)
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation over the rest)
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (mini-batches)
    clip_eps_low: float = 0.2  # PPO clip lower bound (1 - eps_low)
    clip_eps_high: float = 0.2  # PPO clip upper bound (1 + eps_high); 0.28 is DAPO's clip-higher
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    scale_advantages_by_std: bool = True  # False: Dr. GRPO (no std normalisation)
    kl_beta: float = 0.0  # KL penalty weight; 0 skips the reference model entirely
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # k1 | k2 | k3
    entropy_coeff: float = 0.0  # entropy bonus
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, resample to fill
    max_sampling_rounds: int = 3  # cap on resampling rounds with dynamic sampling
    overlong_buffer_tokens: int = 0  # soft overlong penalty zone before max_response_tokens (0: off)
    overlong_penalty: float = 1.0  # penalty at the very end of that zone
    clip_ratio_c: float | None = None  # dual-clip: cap a negative-advantage token's loss at -c * A (e.g. 3.0); None: off
    mismatch_correction: Literal["none", "truncate", "mask"] = "none"  # none | truncate | mask: importance weights pi_trainer / pi_engine per token (algorithms/mismatch.py)
    mismatch_level: Literal["token", "sequence"] = "token"  # token | sequence (geometric mean of the sequence's token weights)
    mismatch_max: float = 2.0  # truncation cap (truncate) / upper bound (mask) of the weight
    mismatch_min: float = 0.5  # lower bound of the weight (mask)
    # MoE routing replay (train/moe_routing.py): none | r2 (the updates replay the routing of the trainer's
    # own old-logprob pass; needs updates_per_rollout > 1 to differ from none) | r3 (the logprob pass and the
    # updates replay the routing the engine sampled with; vLLM returns it on GPU only)
    routing_replay: Literal["none", "r2", "r3"] = "none"


@dataclass
class RewardConfig:
    """Rule rewards, weighted and summed."""

    accuracy_weight: float = 1.0  # verified answer inside <answer>...</answer>
    format_weight: float = 0.1  # <think>...</think><answer>...</answer>
    format_mode: Literal["strict", "soft"] = "strict"  # strict | soft
    language_weight: float = 0.0  # language consistency of the chain of thought
    languages: list[str] = field(default_factory=lambda: ["en", "zh", "fr", "de", "es", "ru"])  # ISO 639-1 codes the language reward tells apart (lingua)
    custom: dict[str, float] = field(default_factory=dict)  # "pkg.module:function" -> weight
    timeout_s: float = 5.0  # a reward call slower than this scores 0
    max_failure_rate: float = 0.5  # share of a step's sequences whose reward raised, above which the step counts as failing
    failure_patience: int = 3  # failing steps in a row before the run stops
    # Code problems (data.task=humaneval): each program runs against its tests in a sandbox (rewards/sandbox.py).
    code_timeout_s: float = 5.0  # wall clock of one program's run, interpreter start included
    code_workers: int = 0  # programs one rank runs at once; 0: its CPUs (srun binding), or the node's CPUs over its ranks (torchrun)
    code_memory_mb: int = 1024  # memory of one program's whole process tree
    # General prompts (data.general_*; stage final_rl): scored by a reward model instead of the rules.
    general_scorer: Literal["reward_model", "judge"] = "reward_model"  # reward_model: the scalar model at model_path | judge: a rubric prompt to the judge engine
    model_path: str = ""  # Hugging Face directory of the scalar reward model (`megatron-r1 reward-model` writes <run_dir>/hf)
    model_weight: float = 1.0  # weight of the reward model's (or judge's) score in a general prompt's reward
    judge_max_tokens: int = 32  # verdict budget of the generative judge (the policy's own engine, greedy)


@dataclass
class DataConfig:
    """Where prompts come from."""

    source: Literal["reasoning_gym", "jsonl"] = "reasoning_gym"  # reasoning_gym | jsonl
    task: str = "chain_sum"  # reasoning-gym dataset name
    task_options: dict[str, Any] = field(
        default_factory=lambda: {"min_terms": 5, "max_terms": 8, "min_digits": 1, "max_digits": 1, "allow_negation": False}
    )  # passed to reasoning_gym.create_dataset
    train_path: str = ""  # jsonl with {"prompt"|"question": ..., "answer": ...} when source=jsonl
    eval_path: str = ""  # held-out jsonl (source=jsonl)
    train_seed: int = 1000  # seed of the training prompts (each seed owns a disjoint block of reasoning-gym seeds)
    eval_seed: int = 2000  # seed of the held-out prompts (different seed: disjoint items)
    train_size: int = 20000  # training prompts
    eval_size: int = 200  # held-out prompts
    template: Literal["r1_zero", "plain"] = "r1_zero"  # prompt template
    languages: list[str] = field(default_factory=list)  # pose each chain_sum prompt in one of these (en, zh; data/phrasebook.py); empty: as written
    general_path: str = ""  # general prompts, jsonl {"prompt"|"question", optional "answer", "language"}: scored by reward.general_scorer
    general_task: str = ""  # ... or a reasoning-gym task standing in for them (its verifier only reported, never rewarded)
    general_task_options: dict[str, Any] = field(default_factory=dict)  # options of general_task
    general_seed: int = 3000  # seed of the general prompts (disjoint from train/eval seeds)
    general_size: int = 2000  # general prompts drawn from general_task
    general_share: float = 0.0  # share of each step's prompts drawn from the general prompts (paper: ~200k of 800k SFT rows)
    general_eval_size: int = 64  # general prompts held out of training; each evaluation scores the greedy responses to them with reward.general_scorer (eval/general/*); 0: none
    max_prompt_tokens: int = 256  # longer prompts are skipped and counted
    level_key: str = ""  # reasoning-gym metadata field naming an item's difficulty (e.g. num_terms): eval-checkpoints reports accuracy per level


@dataclass
class OptimizerConfig:
    """Megatron-Core optimizer and learning-rate schedule."""

    lr: float = 2e-5  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    weight_decay: float = 0.0  # decoupled weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip
    lr_warmup_steps: int = 0  # linear warm-up
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"  # constant | linear | cosine
    max_nonfinite_steps: int = 3  # steps in a row whose update was skipped for an inf/nan loss or gradient before the run stops (0: never)


@dataclass
class CheckpointConfig:
    """Saving, resuming and exporting."""

    save_every: int = 50  # steps between checkpoints (and always at the end)
    resume: bool = True  # continue from the latest checkpoint in the run directory
    load_hf: str = ""  # initialise the policy from this Hugging Face directory (also: tokenizer, engine start)
    load_megatron: str = ""  # then load its weights from this Megatron checkpoint root (latest step), e.g. `convert from-hf`
    base_stage: str = ""  # stage YAML that prepares `load_hf` when it is missing (the tiny base: conf/stages/pretrain_tiny.yaml)
    base_overrides: list[str] = field(default_factory=list)  # overrides for that stage, e.g. [seed=777, pretrain.corpus_seed=300000]
    export_hf: bool = True  # write the final policy as Hugging Face weights to <run_dir>/hf
    keep_last: int = 2  # checkpoints kept on disk (0: all; at least 2, so a damaged newest one has a fallback)
    verify: Literal["size", "checksum"] = "checksum"  # checksum: sizes + CRC-32 of every file, re-read on resume (split over ranks) | size: sizes only (multi-TB checkpoints)
    async_save: bool = False  # GPU: write checkpoints in the background (Megatron's async writer); completed at a later step


@dataclass
class LoggingConfig:
    """Where the run writes and how often it reports."""

    run_dir: str = "runs/default"  # all outputs of the stage
    eval_every: int = 10  # steps between held-out evaluations (0: only at start and end)
    eval_samples: int = 4  # k of maj@k at evaluation
    tensorboard: bool = True  # write TensorBoard events to <run_dir>/tb
    progress_bar: bool = True  # tqdm bar on the console
    save_rollouts: bool = False  # write every step's sequences to <run_dir>/rollouts/step_N.jsonl


@dataclass
class PretrainConfig:
    """The tiny base model: its tokenizer and its R1-template corpus (stage `pretrain`, see data/tiny_corpus.py)."""

    corpus_seed: int = 100000  # stream seed of the corpus (disjoint from data.train_seed / data.eval_seed)
    worked_share_start: float = 1.0  # share of examples that show worked steps at the start
    worked_share_end: float = 0.05  # ... and at the last step
    worked_share_hold: float = 0.5  # fraction of the steps held at the start share before the linear anneal
    batch_size: int = 32  # sequences per optimizer step
    seq_len: int = 160  # tokens per sequence (longer examples are cut)
    tokenizer_vocab_size: int | None = None  # BPE vocabulary (None: model.vocab_size)
    tokenizer_texts: int = 20000  # texts the BPE merges are learned from
    warn_after_s: float = 900.0  # warn when pretraining takes longer (it never stops early; 0: never warn)
    probe_samples: int = 8  # sampled responses per held-out prompt for the base probe (0: skip the probe)
    cot_languages: list[str] = field(default_factory=list)  # write worked steps in words of these languages, drawn independently of the prompt's (empty: symbols)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on conversations (stages `sft`, `cold_start_sft`, `distill`; see stages/sft.py)."""

    train_path: str = ""  # jsonl, one conversation per line: {"prompt", "response"} or {"messages": [{role, content}, ...]}
    eval_path: str = ""  # held-out jsonl of the same form (eval loss); empty: no evaluation
    template: Literal["auto", "chat", "r1_zero", "plain"] = "auto"  # auto: the tokenizer's chat template, r1_zero when it has none | chat | r1_zero | plain
    epochs: int = 2  # passes over the training set (the paper's 2 for the rejection-sampling SFT)
    max_steps: int = 0  # stop after this many optimizer steps (0: all epochs)
    batch_size: int = 16  # rows per optimizer step (packed rows when packing)
    micro_batch_size: int = 16  # rows per forward/backward
    max_seq_len: int = 512  # tokens per row; longer conversations are skipped and counted
    packing: bool = True  # several conversations per row, each attending only to itself
    eval_every: int = 50  # steps between eval-loss measurements (0: only at the end)


@dataclass
class RejectionConfig:
    """Rejection sampling (stage `rejection_sampling`, see stages/rejection_sampling.py): k samples per
    prompt from `checkpoint.load_hf`, only verified, well-formed, single-language ones kept."""

    samples_per_prompt: int = 4  # k responses sampled per prompt
    keep_per_prompt: int = 1  # distinct accepted responses kept per prompt (0: all of them)
    max_prompts: int = 0  # prompts to sample from the training split (0: all of data.train_size)
    prompts_per_call: int = 256  # prompts each engine generates for at once (progress and memory granularity)
    require_correct: bool = True  # the verifier (accuracy reward) must accept the answer
    require_format: bool = True  # <think>...</think> <answer>...</answer>, strictly
    min_language_consistency: float = 1.0  # share of CoT words in the prompt's language (CoTs without words pass)
    rewrite: Literal["none", "readable"] = "none"  # none | readable: whitespace-normalised thought + a summary line in the prompt's language (cold start)
    general_ratio: float = 0.0  # general rows per kept reasoning row, from data.general_* prompts approved by the reward model (paper: 200k : 600k = 0.33)
    min_general_score: float | None = None  # a general response is kept only if the reward model scores it at least this (None: the best of its k)


@dataclass
class RewardModelConfig:
    """The scalar reward model (stage `reward_model`, see stages/reward_model.py): the policy architecture
    with a value head, trained with the Bradley-Terry loss on preference pairs."""

    train_path: str = ""  # jsonl {"prompt", "chosen", "rejected"}; empty: synthetic chain_sum pairs (data/preferences.py)
    eval_path: str = ""  # held-out pairs of the same form; empty: synthetic ones from another seed
    synthetic_pairs: int = 4000  # training pairs to generate when train_path is empty
    synthetic_eval_pairs: int = 400  # held-out pairs to generate when eval_path is empty
    train_seed: int = 4000  # stream seed of the synthetic training pairs
    eval_seed: int = 5000  # ... and of the held-out ones
    synthetic_in_words: bool = False  # synthetic worked steps in words of the question's language (the bilingual tiny setting), not symbols
    template: Literal["auto", "chat", "r1_zero", "plain"] = "r1_zero"  # how a prompt is wrapped (data/templates.py, or auto/chat as in sft.template)
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 32  # pairs per forward/backward
    max_seq_len: int = 512  # longer pairs are skipped and counted
    eval_every: int = 50  # steps between held-out accuracy measurements (0: only at the start and end)


@dataclass
class PlanConfig:
    """What `megatron-r1 plan` assumes about a step beyond what the stage config says (its time model,
    `planner/timing.py`). Only the plan command reads it; a run measures the real thing."""

    prompt_tokens_mean: int = 0  # mean prompt length (0: half of data.max_prompt_tokens)
    response_tokens_mean: int = 0  # mean response length (0: half of rollout.max_response_tokens)
    response_tokens_max: int = 0  # the longest response of a step: generation lasts at least this many decode steps (0: rollout.max_response_tokens, some response hits the cap)
    logprob_passes: int | None = None  # trainer forward passes before the update (None: this trainer's: reference model when grpo.kl_beta > 0, old policy when grpo.updates_per_rollout > 1)
    refit_transfer: Literal["full_tensors", "engine_shard"] = "full_tensors"  # what each GPU receives at a refit: full_tensors (this trainer: every rank streams every full tensor to its worker) | engine_shard (its engine shard only, as a resharding refit does)


@dataclass
class AsyncConfig:
    """Generation overlapping the update (placement=disaggregated; `rollout/bridge.py`). The YAML section is `async`."""

    max_staleness: int = 0  # the engines sample batch t with the weights of step t - k at the oldest (0: synchronous, the same run as colocated)


@dataclass
class StageConfig:
    """One stage of the R1 pipeline, everything it needs."""

    name: str = "r1_zero"  # stage name (reported in summaries): r1_zero | pretrain | sft | cold_start_sft | reasoning_rl | reward_model | final_rl | distill
    seed: int = 1234  # global seed
    steps: int = 60  # RL / training steps
    placement: Literal["colocated", "disaggregated"] = "colocated"  # GRPO: every rank trains and generates, or rollout ranks apart from trainer ranks (placement.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # read by `megatron-r1 plan` only
    async_: AsyncConfig = field(default_factory=AsyncConfig, metadata={"key": "async"})  # `async` is a Python keyword


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating.


def choices(cls: type, name: str) -> tuple:
    """The values a choice field (`Literal[...]`) accepts, e.g. `choices(RewardConfig, "general_scorer")`:
    the one list the loader checks and the code that acts on the value reads."""
    tp = typing.get_type_hints(cls)[name]
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    raise TypeError(f"{cls.__name__}.{name} is not a choice field")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:  # a choice: one of the listed values
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}={value!r} is not one of: {', '.join(str(c) for c in typing.get_args(tp))}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message (a choice lists its values)
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool (true/false), got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string; it is a float to anyone writing it
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _load_preset(cls: type, name: str, where: str) -> dict:
    """A section given as a string names a YAML file: a path, or a preset in conf/<section>s/."""
    section = where.rsplit(".", 1)[-1]
    candidates = [Path(name), CONF_DIR / f"{section}s" / f"{name}.yaml", CONF_DIR / f"{section}s" / name]
    for path in candidates:
        if path.is_file():
            data = _read_yaml(path)
            if "preset" in data:  # presets may build on presets
                base = _load_preset(cls, data.pop("preset"), where)
                base.update(data)
                data = base
            return data
    known = sorted(p.stem for p in (CONF_DIR / f"{section}s").glob("*.yaml"))
    hint = f"; presets: {', '.join(known)}" if known else ""
    raise ConfigError(f"{where}: no preset or file named {name!r}{hint}")


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, str):
        data = _load_preset(cls, data, where)
    elif isinstance(data, dict) and "preset" in data:
        data = dict(data)
        base = _load_preset(cls, data.pop("preset"), where)
        base.update(data)
        data = base
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if cls is StageConfig and key == "extra":
            raise ConfigError(_RETIRED_EXTRA)
        if key not in fields:
            raise ConfigError(_unknown_key(f"{where}.{key}" if where else key, key, fields))
        name = fields[key].name
        kwargs[name] = _coerce(value, hints[name], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _key(f: dataclasses.Field) -> str:
    """The name a field goes by in YAML (a keyword such as `async` cannot be an attribute)."""
    return f.metadata.get("key", f.name)


_RETIRED_EXTRA = (
    "the untyped 'extra' section is gone: pretraining knobs live in 'pretrain' (pretrain.corpus_seed, ...), "
    "the base-model stage in checkpoint.base_stage / checkpoint.base_overrides"
)


def _unknown_key(full: str, key: str, fields: dict) -> str:
    close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(fields)}"
    return f"unknown config key {full!r}; {hint}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:  # an empty file would silently run every default
        raise ConfigError(f"{path}: the file is empty; start from a config under conf/stages/")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `a.b.c=value` strings into a raw config mapping (values parsed as YAML scalars)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            if isinstance(node.get(part), str):  # a preset named by string: expand to a mapping
                node[part] = {"preset": node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StageConfig:
    """Load a stage config from YAML (or defaults when `path` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file() and (CONF_DIR / "stages" / f"{path}.yaml").is_file():
            p = CONF_DIR / "stages" / f"{path}.yaml"
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _read_yaml(p)
    data = apply_overrides(data, list(overrides))
    cfg = _build(StageConfig, data, "")
    validate(cfg)
    cfg.given_sections = frozenset(data)  # what the YAML or the overrides set (not a field: never saved or printed)
    return cfg




def validate(cfg: StageConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    r, g = cfg.rollout, cfg.grpo
    for dotted, value in (("rollout.n_samples_per_prompt", r.n_samples_per_prompt), ("rollout.max_response_tokens", r.max_response_tokens),
                          ("rollout.max_model_len", r.max_model_len), ("grpo.prompts_per_step", g.prompts_per_step),
                          ("grpo.micro_batch_size", g.micro_batch_size), ("grpo.updates_per_rollout", g.updates_per_rollout)):
        if value < 1:
            raise ConfigError(f"{dotted}={value} must be >= 1")
    if not 0 <= r.min_response_tokens <= r.max_response_tokens:
        raise ConfigError(f"rollout.min_response_tokens={r.min_response_tokens} must lie in [0, rollout.max_response_tokens={r.max_response_tokens}]")
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature={r.temperature:g} must be >= 0 (0: greedy)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p:g} must lie in (0, 1]")
    m = cfg.model
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError("model.num_attention_heads must be a multiple of model.num_query_groups")
    if m.num_experts is not None and m.moe_ffn_hidden_size is None:
        raise ConfigError("model.moe_ffn_hidden_size is required when model.num_experts is set")
    p = cfg.parallel
    if m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError("model.num_attention_heads must be divisible by parallel.tensor_model_parallel_size")
    if m.num_experts is not None and m.num_experts % p.expert_model_parallel_size:
        raise ConfigError("model.num_experts must be divisible by parallel.expert_model_parallel_size")
    if m.num_experts is not None and p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        raise ConfigError("MoE with tensor parallelism needs parallel.sequence_parallel=true")
    mem = cfg.memory
    if not 0.0 <= mem.optimizer_offload_fraction <= 1.0:
        raise ConfigError(f"memory.optimizer_offload_fraction={mem.optimizer_offload_fraction} must lie in [0, 1]")
    if mem.optimizer_offload_fraction > 0 and not p.use_distributed_optimizer:
        raise ConfigError("memory.optimizer_offload_fraction > 0 needs parallel.use_distributed_optimizer=true (Megatron offloads the sharded state)")
    if mem.optimizer_offload_fraction > 0 and not mem.precision_aware_optimizer:
        # Without it Megatron's distributed optimizer keeps an fp32 master copy of its shard on the
        # GPU and hands only that to the host optimizer (Megatron-LM's own arguments refuse this).
        raise ConfigError("memory.optimizer_offload_fraction > 0 needs memory.precision_aware_optimizer=true (otherwise the fp32 master weights stay on the GPU)")
    if mem.precision_aware_optimizer and not p.use_distributed_optimizer:
        raise ConfigError("memory.precision_aware_optimizer needs parallel.use_distributed_optimizer=true (Megatron supports it with the distributed optimizer only)")
    if mem.recompute_num_layers < 1:
        raise ConfigError(f"memory.recompute_num_layers must be >= 1, got {mem.recompute_num_layers}")
    if cfg.rollout.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.sleep_level={cfg.rollout.sleep_level} must be 1 or 2")
    if cfg.grpo.clip_eps_low < 0 or cfg.grpo.clip_eps_high < 0:
        raise ConfigError("grpo.clip_eps_low and grpo.clip_eps_high must be >= 0")
    if cfg.grpo.routing_replay == "r3" and cfg.rollout.engine_pipeline_parallel_size > 1:
        raise ConfigError("grpo.routing_replay=r3: vLLM returns routed experts from engines without pipeline parallelism only; set rollout.engine_pipeline_parallel_size=1")
    if cfg.checkpoint.keep_last == 1 or cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least 2 (a damaged newest checkpoint falls back to the one before), or 0 to keep all")
    if p.timeout_minutes <= 0 or p.heartbeat_timeout_s < 0:
        raise ConfigError("parallel.timeout_minutes must be > 0 and parallel.heartbeat_timeout_s >= 0 (0 turns the heartbeat off)")
    if cfg.async_.max_staleness < 0:
        raise ConfigError(f"async.max_staleness={cfg.async_.max_staleness} must be >= 0 (0: synchronous)")
    if cfg.async_.max_staleness > 0 and cfg.placement != "disaggregated":
        raise ConfigError(f"async.max_staleness={cfg.async_.max_staleness} overlaps generation with the update, which needs engines "
                          "apart from the trainer: set placement=disaggregated (and launch parallel.rollout_ranks more processes)")
    if p.rollout_ranks < 1:
        raise ConfigError(f"parallel.rollout_ranks={p.rollout_ranks} must be >= 1")
    budget = cfg.memory.max_tokens_per_microbatch
    if budget < 0:
        raise ConfigError(f"memory.max_tokens_per_microbatch={budget} must be >= 0 (0: micro-batches of *.micro_batch_size rows)")
    if budget and (p.pipeline_model_parallel_size > 1 or p.expert_model_parallel_size > 1):
        raise ConfigError("memory.max_tokens_per_microbatch needs pipeline_model_parallel_size=1 and expert_model_parallel_size=1 in this "
                          "version (pipeline stages and expert groups exchange micro-batches of one shape); set it to 0")
    sft = cfg.sft
    for name in ("epochs", "batch_size", "micro_batch_size"):
        if getattr(sft, name) < 1:
            raise ConfigError(f"sft.{name} must be >= 1, got {getattr(sft, name)}")
    rej = cfg.rejection
    if rej.samples_per_prompt < 1 or rej.keep_per_prompt < 0 or rej.max_prompts < 0 or rej.prompts_per_call < 1:
        raise ConfigError("rejection: samples_per_prompt and prompts_per_call must be >= 1, keep_per_prompt and max_prompts >= 0")
    if sft.max_seq_len < 2:
        raise ConfigError(f"sft.max_seq_len must be >= 2, got {sft.max_seq_len}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """A config dataclass from a plain mapping (the inverse of `to_dict`), validated like YAML."""
    return _build(cls, data, where or cls.__name__)


def to_dict(cfg: Any) -> dict:
    """Plain-dict view (for summary.json, logs and checkpoints), keyed as in YAML."""
    return {_key(f): _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    return to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
