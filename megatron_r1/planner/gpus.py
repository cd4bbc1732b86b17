"""The GPUs the planner knows: memory, bandwidths and peak throughput, one table with its sources.

Dense peaks (no 2:4 sparsity: NVIDIA's datasheets print the sparse figure, twice these). Link rates
are per GPU and per direction. Sources, read 2026-12:

* H100 SXM5 / H200 SXM: NVIDIA H100 and H200 Tensor Core GPU datasheets (HBM3 80 GB at 3.35 TB/s;
  HBM3e 141 GB at 4.8 TB/s; 989 TFLOPS BF16 and 1,979 FP8 dense; NVLink 4 at 900 GB/s both ways);
  DGX H100/H200 user guide: one ConnectX-7 400 Gb/s InfiniBand port per GPU, 2 TiB host memory,
  PCIe Gen5 x16 to the host (64 GB/s per direction on the wire).
* B200: DGX B200 datasheet (180 GB usable HBM3e at 8 TB/s; 2.25 PFLOPS BF16, 4.5 FP8 dense; NVLink 5
  at 1.8 TB/s both ways; ConnectX-7 400 Gb/s per GPU; 4 TiB host memory).
* GB200 (NVL72): GB200 NVL72 datasheet (186 GB HBM3e at 8 TB/s; 2.5 PFLOPS BF16, 5 FP8 dense per GPU;
  NVLink 5 at 1.8 TB/s in a 72-GPU domain; NVLink-C2C to the Grace CPU at 900 GB/s both ways, shared
  by the tray's two GPUs; 4 GPUs and ~960 GB of LPDDR5X per compute tray; 400 Gb/s per GPU off the rack).

`memory_gib` is what `torch.cuda.mem_get_info` reports as total (a little under the marketed size).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """A GPU and the node around it."""

    name: str
    memory_gib: float  # what `torch.cuda.mem_get_info` reports as total
    per_node: int = 8
    host_memory_gib: float = 2048.0  # CPU memory of one node (DGX H100: 2 TiB)
    reserve_gib: float = 5.0  # CUDA context + NCCL buffers + allocator fragmentation
    hbm_tb_s: float = 3.35  # HBM bandwidth
    bf16_tflops: float = 989.0  # dense peak
    fp8_tflops: float = 1979.0  # dense peak
    nvlink_gb_s: float = 450.0  # per direction, inside the NVLink domain
    network_gb_s: float = 50.0  # per direction, between NVLink domains (InfiniBand 400 Gb/s)
    host_link_gb_s: float = 64.0  # per direction, GPU <-> host memory (PCIe Gen5 x16 wire rate)
    nvlink_domain: int = 8  # GPUs one NVLink domain joins (a node; 72 on GB200 NVL72)

    def peak_tflops(self, fp8: bool) -> float:
        return self.fp8_tflops if fp8 else self.bf16_tflops


GPUS = {
    "h100": Gpu("H100 80GB", 79.6),
    "h200": Gpu("H200 141GB", 139.8, hbm_tb_s=4.8),
    "b200": Gpu("B200 180GB", 178.4, host_memory_gib=4096.0, hbm_tb_s=8.0, bf16_tflops=2250.0, fp8_tflops=4500.0, nvlink_gb_s=900.0),
    "gb200": Gpu("GB200 186GB", 184.0, per_node=4, host_memory_gib=960.0, hbm_tb_s=8.0, bf16_tflops=2500.0, fp8_tflops=5000.0,
                 nvlink_gb_s=900.0, host_link_gb_s=225.0, nvlink_domain=72),
}
