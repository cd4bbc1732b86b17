"""Convert checkpoints between Megatron `dist_checkpointing` and Hugging Face; see `megatron_r1.convert`.

    python tools/convert_checkpoint.py to-hf --checkpoint runs/r1_zero_tiny/checkpoints --out /tmp/hf
    python tools/convert_checkpoint.py from-hf --hf assets/tiny_base --stage conf/stages/r1_zero_tiny.yaml --out /tmp/ckpt
    python tools/convert_checkpoint.py fp8-to-bf16 checkpoints/DeepSeek-V3-Base checkpoints/DeepSeek-V3-Base-bf16

The same as `megatron-r1 convert ...`. Under torchrun for models that need several ranks (to-hf,
from-hf); fp8-to-bf16 is one process.
"""

import sys

from megatron_r1.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
