"""`SHA256SUMS` for a directory of files (the tiny bases shipped in `assets/`), in `sha256sum`'s format, so
that `sha256sum -c SHA256SUMS` checks it too and every stage that loads the directory refuses a damaged copy."""

from __future__ import annotations

import hashlib
from pathlib import Path

from megatron_r1.config import ConfigError

CHECKSUMS = "SHA256SUMS"


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(model_dir: Path, names: list[str]) -> Path:
    """`SHA256SUMS` for `names` in `model_dir`, in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks it)."""
    lines = [f"{sha256_of(model_dir / name)}  {name}\n" for name in sorted(names)]
    (model_dir / CHECKSUMS).write_text("".join(lines))
    return model_dir / CHECKSUMS


def read_checksums(model_dir: Path) -> dict[str, str]:
    """File name -> sha256 from `model_dir/SHA256SUMS` ({} when the directory has none)."""
    path = model_dir / CHECKSUMS
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def verify_checksums(model_dir: Path) -> None:
    """A model directory that ships `SHA256SUMS` (the tiny bases in `assets/`) must match it: a file
    damaged, truncated or replaced (a Git LFS pointer, a half-finished copy) is a one-line error
    before any rank loads it. Directories without the file are not checked."""
    for name, digest in read_checksums(model_dir).items():
        path = model_dir / name
        if not path.is_file():
            raise ConfigError(f"{path} is missing but listed in {model_dir / CHECKSUMS}: restore it "
                              f"(`git checkout -- {model_dir}` for a shipped base) or point checkpoint.load_hf elsewhere")
        if sha256_of(path) != digest:
            raise ConfigError(f"{path} does not match its checksum in {model_dir / CHECKSUMS} (damaged or replaced): "
                              f"restore it (`git checkout -- {model_dir}` for a shipped base, or rebuild it: `make tiny-base`)")
