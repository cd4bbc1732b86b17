"""Expert parallelism on CPU: a DeepSeek-V3 MoE model split over 2 gloo ranks (EP=2) computes the
same logits as the single-process model loaded from the same HF weights, and exports the same
HF tensors.

Each rank feeds a different batch, so tokens of one rank must reach experts held by the other
(Megatron's allgather dispatcher) for the logits to match. Results come back through files;
assertions run in the parent.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megatron_r1.config import ModelConfig, ParallelConfig, load_config
from megatron_r1.distributed import destroy, free_port, init_distributed
from megatron_r1.models.build import build_model
from megatron_r1.models.hf import export_hf_tensors, load_hf
from megatron_r1.models.hf.deepseek_v3 import ADAPTER
from tests.unit.test_hf_deepseek_v3 import make_hf_checkpoint

WORLD = 2
SEQ = 24


def tiny() -> ModelConfig:
    return load_config(None, ["model=tiny_moe"]).model


def batches(cfg: ModelConfig) -> torch.Tensor:
    """One [2, SEQ] batch of token ids per rank."""
    return torch.randint(0, cfg.vocab_size, (WORLD, 2, SEQ), generator=torch.Generator().manual_seed(7))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)


def _worker(rank: int, port: int, hf_dir: str, out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores
    parallel = ParallelConfig(expert_model_parallel_size=WORLD)
    init_distributed(parallel)
    try:
        cfg = tiny()
        model = build_model(cfg, parallel).eval()
        held = {n.split("local_experts.")[1].split(".")[0] for n, _ in model.named_parameters() if "local_experts" in n}
        assert len(held) == cfg.num_experts // WORLD  # each rank really holds only its half of the experts
        load_hf(model, cfg, hf_dir)
        exported = {name: t.clone() for name, t in export_hf_tensors(model, cfg)}  # collective
        torch.save({"logits": logits(model, batches(cfg)[rank]), "export": exported}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy()



def test_ep2_matches_single_process(tmp_path):
    cfg = tiny()
    hf_dir = make_hf_checkpoint(cfg, tmp_path / "hf")
    mp.spawn(_worker, args=(free_port(), str(hf_dir), str(tmp_path)), nprocs=WORLD, join=True)

    # The reference: the whole model in this process (EP=1, every expert local).
    init_distributed(ParallelConfig())
    reference = build_model(cfg, ParallelConfig()).eval()
    load_hf(reference, cfg, hf_dir)
    expected_export = dict(export_hf_tensors(reference, cfg))
    hf_tensors = load_file(hf_dir / "model.safetensors")

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["logits"], logits(reference, batches(cfg)[rank]), rtol=0, atol=1e-5)
        assert sorted(got["export"]) == sorted(expected_export) == sorted(hf_tensors)
        for name, tensor in expected_export.items():
            assert torch.equal(got["export"][name], tensor), name
            assert torch.equal(tensor, hf_tensors[name]), name
