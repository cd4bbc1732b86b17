"""Write train.jsonl and eval.jsonl: chain-sum questions with their answers, one JSON object a line.

    .venv/bin/python examples/own_prompts/make_data.py            # next to this file
    .venv/bin/python examples/own_prompts/make_data.py --train 1000 --out-dir data/

Each row is {"question": ..., "answer": ...}, the format `data.source: jsonl` reads ("prompt" works
in place of "question"; the answer may be a string or a number). The questions are written the way
the tiny base model saw them in pretraining (5-8 one-digit terms joined by + and -), so it can
already solve some of them and R1-Zero has something to reinforce. Replace them with your own task:
any question whose answer a math verifier can compare (numbers, fractions, expressions) works.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

QUESTION = "State the final answer to the following arithmetic problem: {chain} ="


def chain_sum(rng: random.Random) -> dict:
    terms = [rng.randint(0, 9) for _ in range(rng.randint(5, 8))]
    ops = [rng.choice("+-") for _ in terms[1:]]
    total, chain = terms[0], str(terms[0])
    for op, term in zip(ops, terms[1:]):
        total += term if op == "+" else -term
        chain += f" {op} {term}"
    return {"question": QUESTION.format(chain=chain), "answer": str(total)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--train", type=int, default=512, help="training questions")
    p.add_argument("--eval", type=int, default=64, help="held-out questions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = random.Random(args.seed)
    rows: dict[str, dict] = {}
    # Distinct questions, so the held-out ones never appear in training (the loader would drop them).
    while len(rows) < args.train + args.eval:
        row = chain_sum(rng)
        rows.setdefault(row["question"], row)
    rows_list = list(rows.values())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows_list[: args.train]), ("eval", rows_list[args.train :])):
        path = args.out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} rows to {path}")


if __name__ == "__main__":
    main()
