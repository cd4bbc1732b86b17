"""megatron-r1: DeepSeek-R1-style reasoning training on Megatron-Core with colocated vLLM rollouts."""

__version__ = "0.1.0"
