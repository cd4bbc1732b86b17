"""New weights straight into the live vLLM model (`rollout.weight_loading: direct`), instead of vLLM's
layer-wise `reload_weights`. Runs inside this rank's vLLM worker (`collective_rpc`, in process).

vLLM 0.32's reload rebuilds every layer it receives tensors for: it puts the parameters back in checkpoint
shape on the meta device, dry-runs every weight loader to count what arrives, then allocates the layer
afresh, replays the loaders into it, runs `process_weights_after_loading` and copies the result back into
the live tensors. Each byte is allocated once and copied twice, and a tied LM head (which receives no
tensor) is never refreshed. The direct path calls the model's own `load_weights` on the live parameters:
each loader copies its tensor (or its tensor-parallel slice, into its place in a fused q/k/v or gate/up
parameter) once.

* GPU, unquantized: that copy is all there is (`process_weights_after_loading` does nothing for
  unquantized linears and embeddings on CUDA); parameters keep their addresses, so CUDA graphs stay valid.
* CPU: vLLM's CPU linears keep only a packed copy of their weight for oneDNN (`cpu_linear`) and an empty
  Parameter in its place. Before a layer's first tensor arrives, each such linear gets a full-size,
  loader-ready weight again (from a buffer pool, on the Parameter object itself: models snapshot
  `named_parameters()` before loading); after the layer's last tensor, `process_weights_after_loading`
  re-packs it and the buffer goes back to the pool; at the end every LM head is re-packed (a tied one
  shares the new embedding). Every row of a staged weight starts with a NaN sentinel, so a tensor the
  refit did not send (which the reload would leave stale) is an error naming it, not a silently
  uninitialised weight. The re-pack is oneDNN's own work and cannot be skipped: it is what remains
  of the sync time on CPU (benchmarks/weight_sync.py).

Dense models without quantization only (`rollout.vllm_engine.VllmEngine` decides): quantized engines need
the reload (it re-quantizes), and the MoE experts' and MLA's derived tensors are rebuilt by the reload.
Tensors must arrive layer by layer (the exporter streams them so); a layer that comes back after the next
one started is refused, because its staged weight would already be packed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def _layer_of(name: str) -> str | None:
    match = _LAYER.match(name)
    return match.group(1) if match else None


def direct_refit(worker, weights: Iterable[tuple[str, torch.Tensor]], pool: dict) -> dict[str, int]:
    """Load Hugging Face-named full tensors into `worker`'s live model (see the module docstring). `pool`
    keeps the CPU staging buffers between calls. Returns counts of what was done."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.platforms import current_platform

    model = worker.get_model()
    on_cpu = current_platform.is_cpu()
    modules: dict[str, list[torch.nn.Module]] = {}
    for qualname, module in model.named_modules():
        layer = _layer_of(qualname + ".")
        if layer is not None:
            modules.setdefault(layer, []).append(module)
    counts = {"tensors": 0, "staged": 0, "repacked": 0}
    staged: dict[str, list] = {}
    finished: set[str] = set()

    def stage(layer: str) -> None:
        """CPU: give each linear whose weight the GEMM dispatch emptied a loader-ready full-size weight."""
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        out = []
        for module in modules.get(layer, []):
            weight = getattr(module, "weight", None)
            if not (isinstance(module, LinearBase) and weight is not None and weight.numel() == 0):
                continue
            recorded = LAYERWISE_INFO[module].restore_metadata[0]["weight"]  # shape, class, loader at build time
            key = (tuple(recorded.shape), recorded.dtype)
            free = pool.setdefault(key, [])
            buffer = free.pop() if free else torch.empty(key[0], dtype=key[1])
            # A sentinel in every row: loaders write whole rows (fused q/k/v and gate/up shards are row
            # blocks), so a row still NaN in column 0 is one no tensor was sent for; `finish` refuses it.
            buffer[:, 0] = float("nan")
            weight.data = buffer
            weight.__class__ = recorded.__class__
            weight.__dict__.update(recorded.__dict__)
            restore_layer_refs(weight, module)
            weight.weight_loader = _get_original_loader(weight)  # the record may carry the reload's wrapper
            out.append((module, buffer, key))
        counts["staged"] += len(out)
        staged[layer] = out

    def finish(layer: str) -> None:
        """CPU: re-pack the layer's staged linears (which empties their weight again) and pool the buffers."""
        for module, buffer, key in staged.pop(layer, []):
            if torch.isnan(buffer[:, 0]).any():
                name = next(n for n, m in model.named_modules() if m is module)
                raise RuntimeError(f"direct refit: {name}.weight was not sent in full (or holds NaN): every tensor of a "
                                   "layer must be in one refit; the engine's copy of that layer is now invalid")
            module.quant_method.process_weights_after_loading(module)
            counts["repacked"] += 1
            if module.weight.numel() == 0 or module.weight.data_ptr() != buffer.data_ptr():
                pool[key].append(buffer)
        finished.add(layer)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        current = None
        for name, tensor in weights:
            layer = _layer_of(name)
            if layer != current:
                if current is not None:
                    finish(current)  # loaders copy synchronously: the layer's tensors are all in place
                if layer in finished:
                    raise RuntimeError(f"direct refit: {name} arrived after its layer {layer} was finished; "
                                       "send each layer's tensors together (or set rollout.weight_loading=reload)")
                if layer is not None and on_cpu:
                    stage(layer)
                current = layer
            counts["tensors"] += 1
            yield name, tensor
        if current is not None:
            finish(current)

    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        model.load_weights(stream())
        for layer in list(staged):
            finish(layer)
        if on_cpu:  # an LM head's packed copy is stale, tied or not
            for module in model.modules():
                if isinstance(module, ParallelLMHead):
                    module.quant_method.process_weights_after_loading(module)
                    counts["repacked"] += 1
    return counts
