"""Checkpoint conversion as users run it: `tools/convert_checkpoint.py` / `megatron-r1 convert`.

A 2-rank gloo job trains a tiny MoE at EP=2 and a tiny dense model at TP=2 one Adam step each and
saves, for each, a Megatron checkpoint and the in-run Hugging Face export. Then, from the command
line: `to-hf` of each checkpoint (one process: a different layout from the one that saved) must give
the in-run export's tensors and transformers logits; `from-hf` of the dense export into a TP=2
checkpoint (under torchrun) and back must give them again; a checkpoint with a shard missing must
fail with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"moe_ep2": ("tiny_moe", {"expert_model_parallel_size": 2}), "dense_tp2": ("tiny_dense", {"tensor_model_parallel_size": 2})}


def _job(rank: int, port: int, out: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_r1 import distributed
    from megatron_r1.config import OptimizerConfig, ParallelConfig, load_config
    from megatron_r1.models.build import build_model
    from megatron_r1.models.hf.base import save_hf
    from megatron_r1.train.checkpoint import model_info, save_checkpoint
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import Batch, lm_loss_fn, train_step

    for name, (preset, layout) in MODELS.items():
        par = ParallelConfig(**layout)
        distributed.init_distributed(par, seed=11)
        cfg = load_config(None, [f"model.preset={preset}"]).model
        model = build_model(cfg, par)
        ddp, opt, sched = build_optimizer(model, OptimizerConfig(lr=3e-2), par, total_steps=10)
        tokens = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
        train_step(ddp, opt, sched, Batch(tokens=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float32)), lm_loss_fn, 4)
        save_hf(model, cfg, Path(out) / name / "inrun")
        save_checkpoint(Path(out) / name / "ckpt", 1, ddp, opt, sched, {"model_info": model_info(cfg, None)})
    distributed.destroy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert")
    mp.spawn(_job, args=(free_port(), str(out)), nprocs=2, join=True)
    return out


def _run(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    env = {**os.environ, "MEGATRON_R1_STRICT_DEVICES": "1"} if ranks > 1 else None  # device tensors in collectives
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr[-4000:]


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _logits(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_to_hf_of_a_sharded_checkpoint_equals_the_in_run_export(trained, name, tmp_path):
    out = tmp_path / "hf"
    _ok(_run("tools/convert_checkpoint.py", "to-hf", "--checkpoint", str(trained / name / "ckpt"), "--out", str(out)))
    ours, inrun = _tensors(out), _tensors(trained / name / "inrun")
    assert sorted(ours) == sorted(inrun)
    if name.startswith("moe"):  # every routed expert of every layer, one by one
        assert sum(".mlp.experts." in k for k in ours) == sum(".mlp.experts." in k for k in inrun) > 0
    for k in inrun:
        assert torch.equal(ours[k], inrun[k]), k
    torch.testing.assert_close(_logits(out), _logits(trained / name / "inrun"), atol=1e-5, rtol=0)


@pytest.mark.slow  # a torchrun job of its own (`make test-slow`)
def test_from_hf_into_tp2_and_back_gives_the_same_model(trained, tmp_path):
    inrun = trained / "dense_tp2" / "inrun"
    ckpt = tmp_path / "ckpt_tp2"
    _ok(_run("-m", "megatron_r1.cli", "convert", "from-hf", "--hf", str(inrun), "--stage", "conf/stages/r1_zero_tiny.yaml",
             "--out", str(ckpt), "parallel.tensor_model_parallel_size=2", ranks=2))
    assert (ckpt / "latest").read_text().strip() == "0"
    back = tmp_path / "back"
    _ok(_run("-m", "megatron_r1.cli", "convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(back)))
    ours, ref = _tensors(back), _tensors(inrun)
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    torch.testing.assert_close(_logits(back), _logits(inrun), atol=1e-5, rtol=0)


def test_a_checkpoint_with_a_missing_shard_fails_in_one_line(trained, tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(trained / "moe_ep2" / "ckpt", broken)
    shards = sorted((broken / "step_1").glob("*.distcp"))
    assert len(shards) >= 2 and any(s.name.startswith("__1_") for s in shards)  # every rank wrote its own
    shards[-1].unlink()  # one of rank 1's
    out = _run("-m", "megatron_r1.cli", "convert", "to-hf", "--checkpoint", str(broken), "--out", str(tmp_path / "hf"))
    assert out.returncode == 2
    message = out.stderr.strip().splitlines()[-1]
    # Found by the checkpoint's manifest before Megatron tries to read it: the file is named.
    assert message.startswith("megatron-r1 convert: ") and f"step_1: {shards[-1].name} is missing" in message, out.stderr[-2000:]


def test_to_hf_names_missing_tensors(tmp_path):
    from megatron_r1.convert import ConversionError, verify_hf_dir
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 3), "c": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing 1 tensor\(s\): b; unexpected 1 tensor\(s\): c"):
        verify_hf_dir(tmp_path, {"a": (2, 3), "b": (5,)})
    with pytest.raises(ConversionError, match=r"wrong shape: a \(2, 3\) != \(3, 2\)"):
        verify_hf_dir(tmp_path, {"a": (3, 2), "c": (4,)})
    assert verify_hf_dir(tmp_path, {"a": (2, 3), "c": (4,)}) == 10
