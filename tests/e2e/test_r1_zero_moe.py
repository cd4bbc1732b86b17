"""R1-Zero GRPO on the tiny DeepSeek-V3 (MLA + aux-loss-free MoE) through the CLI, as `make r1-zero-moe`
runs it, with R2 routing replay: on 1 rank, and on 2 ranks with the experts split (EP2) under one
engine over both ranks (vLLM's CPU build cannot run data-parallel MoE engines).

The base is a randomly initialised DeepseekV3ForCausalLM with the tiny base's tokenizer (pretraining
the MoE base takes minutes; `make r1-zero-moe` does it). What is checked is the wiring: every phase
runs, the parity probe (float32: strict) passes after every refit, so the engine receives every
trained tensor including the routers' moving bias, the update replays the old-logprob pass's routing,
and the step rows carry the MoE health metrics.
"""

import json
import shutil
from pathlib import Path

import pytest

from megatron_r1.config import load_config
from tests.e2e.conftest import ROOT, cli
from tests.e2e.test_r1_zero import TINY_RUN
from tests.unit.test_hf_deepseek_v3 import make_hf_checkpoint

STAGE = ROOT / "conf/stages/r1_zero_tiny_moe.yaml"


@pytest.fixture(scope="module")
def moe_base(base_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe_base")
    make_hf_checkpoint(load_config(STAGE).model, out, seed=5)
    for f in base_model.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


# The 2-rank run (EP2, engine TP2) covers the 1-rank path and more; the 1-rank run is in `make test-slow`.
@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_moe_r1_zero_with_routing_replay(moe_base, tmp_path, ranks):
    run_dir = tmp_path / "run"
    layout = ["parallel.expert_model_parallel_size=2", "rollout.engine_tensor_parallel_size=2"] if ranks == 2 else []
    out = cli("r1-zero", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={moe_base}", "checkpoint.base_stage=",
              *TINY_RUN, "steps=2", "grpo.routing_replay=r2", "grpo.updates_per_rollout=2", "rollout.probe_every=1", *layout, ranks=ranks)
    assert "held-out accuracy" in out.stdout
    rows = _rows(run_dir)
    assert len(rows) == 2
    for row in rows:
        assert row["train/routing_replay"] == 1.0
        assert row["moe/layer1/load_max_over_mean"] >= 1.0 and row["moe/layer1/bias_change"] > 0
        assert 0.0 <= row["moe/routing_mismatch"] <= 1.0  # the second mini-batch replays after the bias moved
        assert row["sync/logprob_abs_diff_mean"] < 1e-4  # the engine has the trained weights and bias
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["grpo"]["routing_replay"] == "r2"
    assert (run_dir / "hf/config.json").exists()
    assert json.loads((run_dir / "hf/config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
