"""Rollout throughput: the engine wrapper next to raw `vllm.LLM.generate` and Hugging Face `generate`.

    .venv/bin/python benchmarks/rollout.py                          # tiny Qwen2 (hidden 128, 2 layers)
    .venv/bin/python benchmarks/rollout.py --prompts 32 --samples 8 --max-tokens 128

All three produce the same number of tokens from the same model and prompts (random prompt ids,
no stop token, so every response runs to `--max-tokens`), sampled at temperature 1:
* wrapper: `VLLMEngine.generate` (logprobs of every sampled token, results as `Rollout`s);
* raw vLLM: `LLM.generate` on the same engine with the same sampling parameters, outputs untouched;
* Hugging Face: `model.generate(do_sample=True)` on the same weights, one batch of prompts x samples.
Each is timed `--repeats` times in turn; the best run of each is reported (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

# vLLM's start-up log would bury the result lines (override by setting the variable).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/results.py

from megatron_r1.config import RolloutConfig  # noqa: E402
from results import append  # noqa: E402
from megatron_r1.rollout.vllm_engine import VLLMEngine  # noqa: E402


def build_model(args, path: str):
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=1,
        head_dim=64, tie_word_embeddings=True, max_position_embeddings=1024, torch_dtype="float32",
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # run every response to max_new_tokens, as vLLM does here
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


def best_of(repeats: int, fn) -> tuple[float, int]:
    """(best seconds, tokens) over `repeats` calls of `fn` returning a token count."""
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128, help="model width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO group size)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="response tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best reported)")
    parser.add_argument(
        "--cpu-adaptation", action="store_true",
        help="install megatron_r1.platform's CPU adaptation first, as a training process has it",
    )
    args = parser.parse_args()
    if args.cpu_adaptation:
        from megatron_r1 import platform

        platform.setup()

    from vllm import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as path:
        model = build_model(args, path)
        engine = VLLMEngine(RolloutConfig(max_model_len=args.prompt_len + args.max_tokens + 8), path)
        sampling = dict(n=args.samples, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens)

        def wrapper() -> int:
            return sum(len(r.response_ids) for r in engine.generate(prompts, **sampling))

        raw_params = SamplingParams(**sampling, logprobs=0, detokenize=False)
        raw_prompts = [{"prompt_token_ids": p} for p in prompts]

        def raw() -> int:
            outs = engine.llm.generate(raw_prompts, raw_params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        hf_input = torch.tensor(prompts)

        def hf() -> int:
            with torch.no_grad():
                out = model.generate(
                    hf_input, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens,
                    min_new_tokens=args.max_tokens, num_return_sequences=args.samples,
                )
            return (out.shape[1] - args.prompt_len) * out.shape[0]

        wrapper()  # warm-up: first batches pay for allocations
        results = {"wrapper": [float("inf"), 0], "raw": [float("inf"), 0], "hf": [float("inf"), 0]}
        for _ in range(args.repeats):  # interleaved, so background load hits all three alike
            for name, fn in (("wrapper", wrapper), ("raw", raw), ("hf", hf)):
                seconds, tokens = best_of(1, fn)
                results[name] = [min(results[name][0], seconds), tokens]
        engine.shutdown()

    rate = {k: tokens / seconds for k, (seconds, tokens) in results.items()}
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.prompts} prompts x {args.samples} samples, {args.prompt_len} + {args.max_tokens} tokens; "
          f"{torch.get_num_threads()} threads{'; CPU adaptation on' if args.cpu_adaptation else ''}")
    print(f"VLLMEngine.generate     {rate['wrapper']:10.0f} tokens/s")
    print(f"raw LLM.generate        {rate['raw']:10.0f} tokens/s")
    print(f"HF generate             {rate['hf']:10.0f} tokens/s")
    print(f"ratio wrapper / raw     {rate['wrapper'] / rate['raw']:10.3f}")
    print(f"ratio wrapper / HF      {rate['wrapper'] / rate['hf']:10.2f}")
    text = "\n".join([
        "| generator | tokens/s | vs raw `LLM.generate` |", "|---|---:|---:|",
        *(f"| {label} | {rate[k]:,.0f} | {rate[k] / rate['raw']:.3f} |"
          for k, label in (("wrapper", "`VLLMEngine.generate` (ours)"), ("raw", "raw `LLM.generate`"), ("hf", "HF `generate`"))),
        "", f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.prompts} prompts x {args.samples} samples, "
        f"{args.prompt_len} + {args.max_tokens} tokens; best of {args.repeats}, {torch.get_num_threads()} threads.",
    ])
    print("appended to", append("Rollout generation: engine wrapper vs raw vLLM vs HF", text))


if __name__ == "__main__":
    main()
