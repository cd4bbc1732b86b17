"""Megatron-Core models <-> Hugging Face checkpoints: the adapter interface and the parallel plumbing.

Two concerns, kept apart:

* An `HFAdapter` (one per HF architecture: `qwen2.py`, `llama.py`, `deepseek_v3.py`) knows only
  names and layouts. It maps ONE full, unsharded Megatron tensor with a *global* name to HF
  tensors and back, and translates configs. It never sees a process group.
* The functions below know only parallelism. `iter_full_state` walks this rank's parameters and
  persistent buffers, undoes tensor, expert and pipeline parallelism and yields full tensors
  under global names; `load_full_state` does the inverse. They never look at HF names.

Global names are this rank's `named_parameters()` / persistent-buffer names with

* `decoder.layers.<i>.` numbered across the whole model (the pipeline stage's offset added), and
* routed experts numbered across the whole model: `...mlp.experts.local_experts.<e>....` (local
  spec) or `...mlp.experts.linear_fc1.weight<e>` (Transformer Engine's grouped GEMM), where
  `e = ep_rank * num_local_experts + j` for local expert `j`.

With tied embeddings the last pipeline stage's copy of the embedding (`output_layer.weight`) is
not yielded (it equals `embedding.word_embeddings.weight`) and is loaded from the embedding.

All ranks of a model-parallel group must call the parallel functions together, in the same order:
they run collectives (all-gathers over TP/EP, broadcasts over PP).
"""

from __future__ import annotations

import abc
import importlib
import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from megatron_r1.config import ConfigError, ModelConfig
from megatron_r1.data.tokenizer import export_tokenizer

# --------------------------------------------------------------------------------------------
# Adapters.


# Whole-model tensors every decoder-only HF family names alike (Megatron name -> HF name).
WHOLE_MODEL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


class HFAdapter(abc.ABC):
    """Names, layouts and config of one HF architecture; pure functions of full tensors."""

    architecture: str = ""  # the `architectures[0]` entry of config.json, e.g. "Qwen2ForCausalLM"

    def check_config(self, cfg: ModelConfig) -> None:
        """ConfigError unless this HF architecture computes what Megatron does for `cfg`."""

    @abc.abstractmethod
    def hf_config(self, cfg: ModelConfig) -> dict:
        """config.json contents for `cfg`; raises ConfigError when HF cannot express it."""

    @abc.abstractmethod
    def model_config(self, hf_config: dict) -> ModelConfig:
        """The ModelConfig of a config.json (the inverse of `hf_config`)."""

    @abc.abstractmethod
    def to_hf(self, name: str, tensor: Tensor, cfg: ModelConfig) -> list[tuple[str, Tensor]]:
        """One full Megatron tensor (global name) -> its HF tensors; [] when HF does not store it."""

    @abc.abstractmethod
    def from_hf(self, name: str, get: Callable[[str], Tensor], cfg: ModelConfig) -> Tensor | None:
        """The full Megatron tensor `name` built from HF tensors read with `get`; None: not in HF."""


# arch (ModelConfig.arch, also HF's `model_type`) -> module defining `ADAPTER`. Imported on first
# use, so a missing or broken adapter module affects only its own architecture.
_ADAPTER_MODULES = {
    "qwen2": "megatron_r1.models.hf.qwen2",
    "llama": "megatron_r1.models.hf.llama",
    "deepseek_v3": "megatron_r1.models.hf.deepseek_v3",
}


def get_adapter(arch: str) -> HFAdapter:
    """The adapter for `arch`; ValueError naming the supported ones otherwise."""
    if arch not in _ADAPTER_MODULES:
        raise ValueError(f"unknown model arch {arch!r}; supported: {', '.join(sorted(_ADAPTER_MODULES))}")
    return importlib.import_module(_ADAPTER_MODULES[arch]).ADAPTER


def check_model_config(cfg: ModelConfig) -> None:
    """The `model:` section checked by its architecture's adapter (what Hugging Face and vLLM can
    express): a ConfigError naming the field to change. The CLI calls it right after loading a
    stage config; `build_model` again for programmatic use."""
    if cfg.arch not in _ADAPTER_MODULES:
        raise ConfigError(f"model.arch={cfg.arch!r} is not one of: {', '.join(sorted(_ADAPTER_MODULES))}")
    get_adapter(cfg.arch).check_config(cfg)


# --------------------------------------------------------------------------------------------
# Where each local tensor sits in the full model.

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
# Routed experts: `local_experts.J.` (local spec, SequentialMLP) or `linear_fcN.weightJ` (TE grouped GEMM).
_LOCAL_EXPERT = re.compile(r"(?P<pre>.*\.experts\.local_experts\.)(?P<j>\d+)(?P<post>\..+)")
_GROUPED_EXPERT = re.compile(r"(?P<pre>.*\.experts\.linear_fc[12]\.(?:weight|bias))(?P<j>\d+)(?P<post>)")
_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"


@dataclass
class _Entry:
    """One local parameter or persistent buffer and how it is split over ranks."""

    tensor: Tensor  # the parameter or buffer itself (loads copy into it)
    names: list[str]  # global names of the full tensors it is part of: one per EP rank for routed experts
    own: int  # index in `names` of the one this rank holds (its EP rank for experts, else 0)
    tp_group: dist.ProcessGroup | None  # group it is split over along `dim` (None: not split)
    dim: int
    stride: int  # pieces per shard along `dim` (2 for a GLU fc1: each rank holds [gate_r; up_r])
    ep_group: dist.ProcessGroup | None  # expert-parallel group for routed experts (None otherwise)
    exported: bool = True  # False for the tied output layer's copy of the embedding (PP > 1)

    @property
    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.tensor.shape)
        if self.tp_group is not None:
            shape[self.dim] *= dist.get_world_size(self.tp_group)
        return tuple(shape)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("virtual pipeline stages (a list of model chunks) are not supported by the HF conversion")
        model = model[0]
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _persistent_buffers(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Buffers that belong to the model's state (e.g. the MoE router's `expert_bias`)."""
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _layer_offsets(model: torch.nn.Module) -> dict[int, int]:
    """Local decoder layer index -> global index (Megatron numbers layers from 1 across stages)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None) or []
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def _tied_output_copy(model: torch.nn.Module, name: str) -> bool:
    """True for the last stage's copy of a tied embedding (a parameter only when PP > 1): it is
    loaded from the embedding and not exported twice."""
    return name == _OUTPUT and bool(getattr(model, "share_embeddings_and_output_weights", False))


def _entries(model: torch.nn.Module) -> list[_Entry]:
    """This rank's tensors, in a fixed order, with their global names and shard layout."""
    from megatron.core import parallel_state as ps

    config = model.config
    layer_index = _layer_offsets(model)
    tp_group = ps.get_tensor_model_parallel_group()
    etp_group = ps.get_expert_tensor_parallel_group()
    ep_group = ps.get_expert_model_parallel_group()
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    num_local = (config.num_moe_experts or 0) // ep_size

    def global_layer(name: str) -> str:
        return _LAYER.sub(lambda m: f"decoder.layers.{layer_index[int(m[1])]}.", name, count=1)

    tensors = [(n, p) for n, p in model.named_parameters()] + list(_persistent_buffers(model))
    out = []
    for local_name, tensor in tensors:
        tied_copy = _tied_output_copy(model, local_name)
        name = _EMBEDDING if tied_copy else global_layer(local_name)
        expert = _LOCAL_EXPERT.fullmatch(name) or _GROUPED_EXPERT.fullmatch(name)
        if ".experts." in name and expert is None:
            raise ValueError(f"unsupported routed-expert layout {local_name!r}: use SequentialMLP or TE grouped GEMM")
        if expert is not None:
            j = int(expert["j"])
            names = [f"{expert['pre']}{e * num_local + j}{expert['post']}" for e in range(ep_size)]
            own, group, egroup = ep_rank, etp_group, (ep_group if ep_size > 1 else None)
        else:
            names, own, group, egroup = [name], 0, tp_group, None
        split = getattr(tensor, "tensor_model_parallel", False) and dist.get_world_size(group) > 1
        out.append(
            _Entry(
                tensor=tensor,
                names=names,
                own=own,
                tp_group=group if split else None,
                dim=int(getattr(tensor, "partition_dim", 0)),
                stride=_stride(name, tensor, config),
                ep_group=egroup,
                exported=not tied_copy,
            )
        )
    return out


def _stride(name: str, tensor: Tensor, config) -> int:
    """Pieces per TP shard. Megatron tags GLU fc1 with partition_stride=2; trust the name too."""
    stride = int(getattr(tensor, "partition_stride", 1))
    glu_fc1 = re.search(r"linear_fc1\.(weight|bias)\d*$", name) is not None
    if glu_fc1 and config.gated_linear_unit:
        stride = max(stride, 2)
    return stride


def _merge(shards: list[Tensor], dim: int, stride: int) -> Tensor:
    """Full tensor from TP shards: piece k of every shard, in rank order, for each k."""
    pieces = [s.chunk(stride, dim) for s in shards]
    return torch.cat([p[k] for k in range(stride) for p in pieces], dim)


def _split(full: Tensor, rank: int, world: int, dim: int, stride: int) -> Tensor:
    """This rank's TP shard of a full tensor (the inverse of `_merge`)."""
    pieces = full.chunk(stride, dim)
    return torch.cat([p.chunk(world, dim)[rank] for p in pieces], dim)


def _all_gather(tensor: Tensor, group: dist.ProcessGroup, traffic: dict[str, int] | None = None) -> list[Tensor]:
    tensor = tensor.detach().contiguous()
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor, group=group)
    if traffic is not None:
        traffic["received"] = traffic.get("received", 0) + (len(out) - 1) * tensor.numel() * tensor.element_size()
    return out


def _full_tensors(entry: _Entry, traffic: dict[str, int] | None = None) -> list[Tensor]:
    """The full tensors of `entry`, one per name (collectives over its TP and EP groups)."""
    t = entry.tensor.detach()
    if entry.tp_group is not None:
        t = _merge(_all_gather(t, entry.tp_group, traffic), entry.dim, entry.stride)
    if entry.ep_group is not None:
        return _all_gather(t, entry.ep_group, traffic)
    return [t]


# --------------------------------------------------------------------------------------------
# Full state out and in.


def iter_full_state(model: torch.nn.Module, traffic: dict[str, int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (global name, full tensor) for every parameter and persistent buffer of the whole model,
    one at a time, on every rank. Collective: all ranks of the model-parallel group call it in step.
    `traffic["received"]` (when given) counts the bytes this rank receives from others.

    Tensors of unsplit parameters may alias the parameter itself: copy before modifying them.
    With PP > 1 each stage's tensors are broadcast from the stage that owns them, stage by stage.
    """
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    entries = [entry for entry in _entries(model) if entry.exported]
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_size = dist.get_world_size(pp_group)
    if pp_size == 1:
        for entry in entries:
            yield from zip(entry.names, _full_tensors(entry, traffic))
        return

    # Receivers must know what is coming: exchange (name, shape, dtype) of every stage first.
    mine = [(name, entry.full_shape, entry.tensor.dtype) for entry in entries for name in entry.names]
    stages: list = [None] * pp_size
    dist.all_gather_object(stages, mine, group=pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    my_stage = dist.get_rank(pp_group)
    device = next(iter(model.parameters())).device
    for stage, manifest in enumerate(stages):
        if stage == my_stage:
            for entry in entries:
                for name, full in zip(entry.names, _full_tensors(entry, traffic)):
                    dist.broadcast(full.contiguous(), src=ranks[stage], group=pp_group)
                    yield name, full
        else:
            for name, shape, dtype in manifest:
                full = torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(full, src=ranks[stage], group=pp_group)
                if traffic is not None:
                    traffic["received"] = traffic.get("received", 0) + full.numel() * full.element_size()
                yield name, full


def load_full_state(model: torch.nn.Module, get_full: Callable[[str], Tensor | None]) -> None:
    """Copy this rank's shard of every full tensor `get_full(global_name)` into the model, in place.

    `get_full` returning None leaves that tensor as initialised. Shapes that do not match raise
    ValueError naming the tensor. No communication: each rank reads only what it holds.
    Load before building the optimizer: its fp32 main copies of bf16 parameters are not touched.
    """
    model = unwrap(model)
    for entry in _entries(model):
        _load_entry(entry, entry.names[entry.own], get_full)


def _load_entry(entry: _Entry, name: str, get_full: Callable[[str], Tensor | None]) -> None:
    full = get_full(name)
    if full is None:
        return
    if tuple(full.shape) != entry.full_shape:
        raise ConfigError(
            f"{name}: the checkpoint gives shape {tuple(full.shape)}, the model expects {entry.full_shape}; "
            "does the model config match the checkpoint?"
        )
    if entry.tp_group is not None:
        full = _split(full, dist.get_rank(entry.tp_group), dist.get_world_size(entry.tp_group), entry.dim, entry.stride)
    with torch.no_grad():
        entry.tensor.copy_(full)


# --------------------------------------------------------------------------------------------
# HF tensors and directories.


def export_hf_tensors(model: torch.nn.Module, cfg: ModelConfig, traffic: dict[str, int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor) for the whole model on every rank, streamed (collective); `traffic`
    as in `iter_full_state`."""
    adapter = get_adapter(cfg.arch)
    for name, tensor in iter_full_state(model, traffic):
        yield from adapter.to_hf(name, tensor, cfg)


class _SafetensorsReader:
    """Lazy reads from `model.safetensors` or the shards named by `model.safetensors.index.json`."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index, single = self.dir / "model.safetensors.index.json", self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(self.dir)!r}")
        self.weight_map = weight_map
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def get(self, name: str) -> Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ConfigError(f"{str(self.dir)!r} has no tensor {name!r}; is the model config right for this checkpoint?")
        if file not in self._files:
            self._files[file] = self._stack.enter_context(safe_open(str(self.dir / file), framework="pt"))
        return self._files[file].get_tensor(name)

    def __enter__(self) -> "_SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


# Heads a model can carry in place of the language-model head (`models/reward_model.py`).
HEADS = ("lm", "score", "none")
_SCORE = "score.weight"  # HF sequence classifiers' head


def load_hf(model: torch.nn.Module, cfg: ModelConfig, hf_dir: str | Path, head: str = "lm") -> None:
    """Load a HF checkpoint directory into this rank's shard of `model` (each rank reads what it holds).

    `head`: "lm" loads the language-model head as usual; "score" loads `output_layer` (a reward
    model's value head) from a sequence classifier's `score.weight`; "none" leaves it as
    initialised (a reward model started from a causal LM).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    adapter = get_adapter(cfg.arch)
    with _SafetensorsReader(hf_dir) as reader:

        def get_full(name: str) -> Tensor | None:
            if name == _OUTPUT and head != "lm":
                return reader.get(_SCORE) if head == "score" else None
            return adapter.from_hf(name, reader.get, cfg)

        load_full_state(model, get_full)


def read_hf_config(hf_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a HF directory's config.json (its `model_type` picks the adapter)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {str(Path(hf_dir))!r}: not a Hugging Face model directory")
    hf_config = json.loads(path.read_text())
    model_type = hf_config.get("model_type", "")
    if model_type not in _ADAPTER_MODULES:
        raise ConfigError(
            f"{str(path)!r} has model_type {model_type!r}; supported: {', '.join(sorted(_ADAPTER_MODULES))} "
            "(convert the model to one of them, or add an adapter in megatron_r1/models/hf/)"
        )
    cfg = get_adapter(model_type).model_config(hf_config)
    _check_tokenizer_fits(Path(hf_dir), cfg.vocab_size)
    return cfg


def _check_tokenizer_fits(hf_dir: Path, vocab_size: int) -> None:
    """A tokenizer with more tokens than the embedding has rows would crash the first forward pass
    deep inside an embedding lookup (or, worse, silently alias ids under vocab-parallel TP)."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ConfigError(
            f"{str(hf_dir)!r}: its tokenizer has {n} tokens but config.json's vocab_size is {vocab_size}; "
            "use the tokenizer the model was trained with (or a model whose vocab_size covers it)"
        )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class _ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes` (one tensor may exceed it)."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.out / f"model-part{len(self.files):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Name the files: `model.safetensors` if one, else numbered shards plus the index."""
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        n = len(self.files)
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _special_token_ids(tokenizer_dir: Path | None) -> dict[str, int]:
    """bos/eos/pad token ids from a model config.json beside the tokenizer, or the tokenizer itself."""
    if tokenizer_dir is None:
        return {}
    ids: dict[str, int] = {}
    model_config = tokenizer_dir / "config.json"
    if model_config.is_file():
        c = json.loads(model_config.read_text())
        ids = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if c.get(k) is not None}
    tok_config, tok_file = tokenizer_dir / "tokenizer_config.json", tokenizer_dir / "tokenizer.json"
    if tok_config.is_file() and tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
        c = json.loads(tok_config.read_text())
        for role in ("bos", "eos", "pad"):
            token = c.get(f"{role}_token")
            token = token.get("content") if isinstance(token, dict) else token
            token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
            if token_id is not None:
                ids.setdefault(f"{role}_token_id", token_id)
    return ids


def save_hf(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    head: str = "lm",
) -> Path:
    """Write the whole model as a HF directory that transformers and vLLM load (collective).

    Rank 0 writes `model.safetensors` (or shards + index), `config.json`, `generation_config.json`
    and the tokenizer files of `tokenizer_dir`; the other ranks only take part in the gathers.
    `dtype` defaults to `cfg.params_dtype`. `head="score"` writes a reward model (untied, its value
    head as `output_layer`) as the architecture's sequence classifier with one label.
    """
    if head not in ("lm", "score"):
        raise ValueError(f"save_hf head must be 'lm' or 'score', got {head!r}")
    if head == "score" and cfg.tie_embeddings:
        raise ValueError("a reward model's head is not the embedding: save it with tie_embeddings=False (models.reward_model.reward_model_config)")
    adapter = get_adapter(cfg.arch)
    out = Path(out_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype.replace("torch.", "")]
    dtype = dtype or _DTYPES[cfg.params_dtype]
    dtype_name = str(dtype).replace("torch.", "")
    hf_config = adapter.hf_config(cfg)  # before any collective: a config error then stops every rank alike
    if head == "score":
        hf_config.update(
            architectures=[adapter.architecture.replace("ForCausalLM", "ForSequenceClassification")],
            num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
        )
    lm_head = WHOLE_MODEL_NAMES[_OUTPUT]
    main = not dist.is_initialized() or dist.get_rank() == 0
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # Files of a previous save (perhaps with another shard count) would mix with these.
        for stale in [*out.glob("model*.safetensors*"), out / "generation_config.json"]:
            stale.unlink(missing_ok=True)
        writer = _ShardWriter(out, max_shard_bytes)
    for name, tensor in export_hf_tensors(model, cfg):
        if head == "score" and name == lm_head:
            name = _SCORE
        if writer is not None:
            # A copy: views of one fused tensor share storage, which safetensors refuses.
            writer.add(name, tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous())
    if main:
        writer.finish()
        ids = _special_token_ids(tok_dir)
        hf_config.update(ids)
        hf_config.update(torch_dtype=dtype_name, dtype=dtype_name)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tok_dir is not None:  # the reasoning tags survive standard decoding (data/tokenizer.py)
            export_tokenizer(tok_dir, out, _TOKENIZER_FILES)
        if not (out / "generation_config.json").is_file() and ids:
            (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()  # nobody reads the directory before rank 0 has finished it
    return out
