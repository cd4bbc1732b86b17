"""Ask a converted (or exported) R1-Zero model a question through vLLM, as a user of the weights would.

    .venv/bin/python examples/convert_and_chat/chat.py runs/examples/hf \
        "State the final answer to the following arithmetic problem: 4 + 1 + 7 - 7 + 7 - 6 ="

The question is wrapped in the R1-Zero template the policy was trained with; the model answers
with <think> ... </think> <answer> ... </answer>. Those tags are special tokens of the tiny
tokenizer, so decoding keeps special tokens, or the tags would vanish from the text.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_QUESTION = "State the final answer to the following arithmetic problem: 4 + 1 + 7 - 7 + 7 - 6 ="


def main() -> None:
    p = argparse.ArgumentParser(description="Chat with a Hugging Face R1-Zero model through vLLM")
    p.add_argument("model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    p.add_argument("--template", default="r1_zero", help="prompt template the model was trained with (megatron_r1.data.templates)")
    p.add_argument("--max-tokens", type=int, default=96, help="response budget")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = p.parse_args()

    # vLLM's CPU build sizes its KV cache from this variable (GiB); 1 GiB is plenty for one question.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The engine in this process rather than in a child: it starts in half the time on 2 cores.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the console for the answer
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from megatron_r1.data.templates import render_prompt
    from megatron_r1.rewards.accuracy import extract_answer

    prompt = render_prompt(args.template, args.question)
    # The exported tokenizer gives the ids the policy was trained on (README, "Checkpoints").
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = tokenizer(prompt)["input_ids"]

    # float32 and eager mode: what the tiny model was trained in, and what vLLM's CPU build runs.
    # gpu_memory_utilization only matters on a GPU, where a small share leaves room for others.
    llm = LLM(model=args.model, tokenizer=args.model, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.2, max_model_len=len(prompt_ids) + args.max_tokens)
    # Default decoding keeps the reasoning tags: the export writes them as plain (non-special) tokens.
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0].outputs[0]

    print(f"question: {args.question}")
    print(f"response: {out.text.strip()}")
    print(f"answer:   {extract_answer(out.text)}")


# vLLM may start worker processes that re-import this file: only the main process may run it.
if __name__ == "__main__":
    main()
