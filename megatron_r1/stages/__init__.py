"""The commands: each stage of the R1 recipe as `megatron-r1 <command>` runs it.

* `rl`                 — R1-Zero / reasoning / final RL: GRPO with colocated vLLM engines (`r1-zero`, `grpo`)
* `sft`                — supervised fine-tuning on conversations (cold start, rejection-sampled data, distillation)
* `reward_model`       — the scalar reward model, Bradley-Terry on preference pairs
* `pretrain`           — the tiny base model of the CPU runs (tokenizer + pretraining), probed by `base_probe`
* `rejection_sampling` — k samples per prompt, verified and filtered into an SFT set
* `evaluate`           — the held-out evaluation for any Hugging Face model
* `checkpoint_eval`    — the held-out evaluation of every saved checkpoint of a run
* `base_model`         — the Hugging Face model a stage starts from (pretrained first when missing)

The training stages supply their data and their step; `train.loop.TrainingLoop` does the rest.
"""
