"""Ship a pretrained tiny base in `assets/`, or compare a rebuilt one with the shipped copy.

The CPU runs start from a base shipped in the repository (`assets/tiny_base`, `assets/tiny_moe_base`), so
R1-Zero starts from the same weights on every machine: pretraining it again on another CPU gives another
base (MKL and oneDNN pick kernels by instruction set, so the sums round differently), and the final
accuracy follows the base. `make tiny-base` / `make tiny-moe-base` rebuild one and run `compare`:

    python tools/ship_base.py compare runs/tiny_base assets/tiny_base
    python tools/ship_base.py ship runs/tiny_base assets/tiny_base --stage conf/stages/pretrain_tiny.yaml

`ship` copies `<run>/hf`, writes `SHA256SUMS` (checked by every stage that loads the directory, and by
`sha256sum -c SHA256SUMS`) and `provenance.json` (the command, machine, commit and the base probe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # results.cpu_name: the machine, as benchmark records name it

from megatron_r1.checksums import CHECKSUMS, read_checksums, sha256_of, write_checksums  # noqa: E402
from results import cpu_name  # noqa: E402

DONE_MARKER = "pretrain_done.json"  # megatron_r1.stages.pretrain.DONE_MARKER (importing it starts Megatron-Core)

PROVENANCE = "provenance.json"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ship(run_dir: Path, out: Path, stage: str) -> None:
    import torch

    hf, done = run_dir / "hf", run_dir / DONE_MARKER
    if not (hf / "config.json").is_file() or not done.is_file():
        sys.exit(f"error: {run_dir} is not a finished pretraining run (needs hf/config.json and {DONE_MARKER}): "
                 f"run `megatron-r1 pretrain {stage}` first")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    names = sorted(p.name for p in hf.iterdir() if p.is_file())
    for name in names:
        shutil.copy2(hf / name, out / name)
    write_checksums(out, names)
    record = json.loads(done.read_text())
    provenance = {
        "rebuild": f"megatron-r1 pretrain {stage}",
        "stage_config": stage,
        "steps": record["steps"],
        "final_loss": record["final_loss"],
        "parameters": record["parameters"],
        "pretrain_wall_seconds": record["wall_seconds"],
        "base_probe": record.get("base_probe"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"shipped {run_dir}/hf -> {out} ({len(names)} files, {CHECKSUMS}, {PROVENANCE})")


def compare(run_dir: Path, shipped: Path) -> int:
    """0 when the rebuilt base's files equal the shipped ones byte for byte, 1 otherwise (with what differs)."""
    hf = run_dir / "hf"
    expected = read_checksums(shipped)
    if not expected:
        sys.exit(f"error: {shipped} has no {CHECKSUMS}: not a shipped base")
    actual = {n: sha256_of(hf / n) for n in expected if (hf / n).is_file()}
    differ = sorted(n for n in expected if actual.get(n) != expected[n])
    if not differ:
        print(f"{hf} is byte-identical to the shipped {shipped}")
        return 0
    probe = json.loads((shipped / PROVENANCE).read_text()).get("machine", {}) if (shipped / PROVENANCE).is_file() else {}
    print(f"{hf} differs from the shipped {shipped} in {', '.join(differ)}: expected when this CPU is not the one that "
          f"built it ({probe.get('cpu', 'see provenance.json')}); start a stage from it with checkpoint.load_hf={hf}")
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ship", help="copy a finished pretraining run's hf/ into a shipped base directory")
    s.add_argument("run_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--stage", required=True, help="the pretraining stage config that made it (recorded as the rebuild command)")
    c = sub.add_parser("compare", help="is a rebuilt base byte-identical to the shipped one?")
    c.add_argument("run_dir", type=Path)
    c.add_argument("shipped", type=Path)
    args = parser.parse_args()
    if args.command == "ship":
        ship(args.run_dir, args.out, args.stage)
    else:
        sys.exit(compare(args.run_dir, args.shipped))


if __name__ == "__main__":
    main()
