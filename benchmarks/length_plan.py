"""Equal work with a length spread: every sampled response's length, drawn from one seeded plan, given to vLLM.

Two trainers sampling from randomly initialised models do not produce the same response lengths (how
soon a random policy samples EOS drifts apart after one update), so a speed comparison must fix the
lengths. Fixing them all at the cap (`rollout.min_response_tokens`) compares equal work with no
spread: nothing for an update without padding to save. This plan fixes them with the spread R1-Zero
batches have instead, the same one `train_throughput.py` uses (seven in ten responses from 5 tokens to
a third of the cap, three in ten from half the cap to the cap).

It works at the one place both trainers share, `vllm.LLM.generate`: a sampled call (temperature > 0)
whose `max_tokens` is the cap has every response it asks for (prompt-major, then sample) told its
length from the plan (`min_tokens = max_tokens = length`: no stop before it, none after). Calls asking
for n > 1 samples of a prompt are issued as n single-sample requests and handed back grouped as vLLM
returns them, so a trainer that asks for n samples per prompt (megatron-r1) and one that repeats each
prompt n times (TRL) get the same lengths in the same places. The k-th sampled call of a process gets
the plan's k-th draw: both trainers make one sampled call per step. Greedy calls (evaluation, the
parity probe) and calls with another `max_tokens` pass through untouched.

    .venv/bin/python benchmarks/length_plan.py --cap 256 --seed 1234 -m megatron_r1.cli r1-zero STAGE key=value ...

runs a module with the plan installed (`benchmarks/_trl_worker.py --length-plan SEED` installs it itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import runpy
import sys


def response_length(rng: random.Random, cap: int) -> int:
    """One response length, as R1-Zero batches have them late in training: 70 % from 5 to a third of the cap,
    30 % from half the cap to the cap."""
    return rng.randint(5, max(5, cap // 3)) if rng.random() < 0.7 else rng.randint(cap // 2, cap)


def plan(seed: int, call: int, count: int, cap: int) -> list[int]:
    """The lengths of the `count` responses of the `call`-th sampled generate call."""
    rng = random.Random(f"{seed}:{call}")
    return [response_length(rng, cap) for _ in range(count)]


def install(cap: int, seed: int) -> None:
    """Patch `vllm.LLM.generate` in this process (see the module docstring)."""
    from vllm import LLM, SamplingParams

    original = LLM.generate
    calls = itertools.count()

    def generate(self, prompts, sampling_params=None, *args, **kwargs):
        params = sampling_params
        if not isinstance(params, SamplingParams) or not params.temperature or params.max_tokens != cap:
            return original(self, prompts, sampling_params, *args, **kwargs)
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        n = params.n
        lengths = plan(seed, next(calls), len(prompts) * n, cap)
        single = []
        for length in lengths:
            one = params.clone()
            one.n, one.min_tokens, one.max_tokens = 1, length, length
            single.append(one)
        outputs = original(self, [p for p in prompts for _ in range(n)], single, *args, **kwargs)
        if n == 1:
            return outputs
        grouped = []
        for i in range(len(prompts)):
            group = outputs[i * n : (i + 1) * n]
            first = group[0]
            first.outputs = [dataclasses.replace(out.outputs[0], index=j) for j, out in enumerate(group)]
            grouped.append(first)
        return grouped

    LLM.generate = generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cap", type=int, required=True, help="the response cap (rollout.max_response_tokens)")
    parser.add_argument("--seed", type=int, required=True)
    argv = sys.argv[1:]
    if "-m" not in argv or argv.index("-m") == len(argv) - 1:
        parser.error("name the module to run: ... -m MODULE [ARGS ...]")
    at = argv.index("-m")
    args = parser.parse_args(argv[:at])
    module, rest = argv[at + 1], argv[at + 2 :]  # everything after the module is its own
    install(args.cap, args.seed)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
