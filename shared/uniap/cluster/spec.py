"""The cluster: nodes x GPUs, GPU memory and peak FLOP/s, link bandwidths (datasheet figures).

Datasheet figures are what the analytic estimate starts from; a measured profile replaces them.
How much of each peak a GPU model achieves on a transformer's kernels comes from measurements per GPU
model (uniap.cluster.devices); `matmul_efficiency`, when set, overrides the GEMM part by hand.
`*_node_efficiency` are the fractions of link bandwidth collectives are assumed to achieve.
`gpu_memory_gib` is the capacity PyTorch reports (`total_memory`), `reserved_memory_gib` what the
job holds outside PyTorch's caching allocator (CUDA context, NCCL buffers, library workspaces).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import SpecError, UnknownPresetError
from ..io import check_file_ref, is_file_ref, read_mapping
from ..model.spec import _from_dict, _positive_ints, _require
from .devices import DeviceCoefficients, device_coefficients

GB = 1e9
GiB = 2**30
# The share of a node's host memory offloaded model states may take (pinned): an estimate, leaving the rest to the
# operating system, the data loaders and the page cache.
HOST_MEMORY_USABLE = 0.8
# Fields a cluster may leave out: no hand-set GEMM efficiency, hosts not described, no FP8 tensor cores.
# The most GPUs a cluster may have: over ten times the largest training jobs run today.
MAX_GPUS = 1_048_576
OPTIONAL_FIELDS = ("matmul_efficiency", "host_memory_gib", "peak_fp8_tflops", "peak_fp4_tflops", "nvlink_domain")


@dataclass(frozen=True)
class ClusterSpec:
    """Bandwidths are per GPU, one direction, GB/s (1e9 bytes/s); memory in GiB; peak in TFLOP/s.

    The host, for offloading model states to CPU memory (DeepSpeed's ZeRO-Offload): `host_memory_gib` and
    `host_memory_bandwidth_gbps` (datasheet peak) per node, `host_link_bandwidth_gbps` per GPU between host and
    device (PCIe); DeepSpeedCPUAdam is bound by memory bandwidth, not cores (uniap.cost.model.CostModel.cpu_adam).
    Without `host_memory_gib` uniap does not consider offloading. `peak_fp8_tflops`: the dense FP8 tensor peak
    (None: the GPU has no FP8 tensor cores, like the A100); `peak_fp4_tflops` the dense FP4 (NVFP4) peak.
    `nvlink_domain`: GPUs one NVLink fabric joins when it spans nodes (72 in a GB200 NVL72 rack of 4-GPU trays;
    None: the node): `intra_node_*` figures apply inside it, and tensor, context and data-parallel groups inside
    it use them."""

    name: str
    num_nodes: int
    gpus_per_node: int
    gpu_name: str
    gpu_memory_gib: float
    peak_tflops: float
    hbm_bandwidth_gbps: float
    intra_node_bandwidth_gbps: float
    inter_node_bandwidth_gbps: float
    reserved_memory_gib: float = 4.0
    matmul_efficiency: float | None = None
    intra_node_efficiency: float = 0.55
    inter_node_efficiency: float = 0.8
    collective_latency_us: float = 20.0
    host_memory_gib: float | None = None
    host_memory_bandwidth_gbps: float = 200.0
    host_link_bandwidth_gbps: float = 32.0
    peak_fp8_tflops: float | None = None
    peak_fp4_tflops: float | None = None
    nvlink_domain: int | None = None

    def __post_init__(self) -> None:
        for name in ("name", "gpu_name"):
            value = getattr(self, name)
            _require(
                isinstance(value, str) and bool(value.strip()), name, f"must be a non-empty string (got {value!r})"
            )
        _positive_ints(self, ("num_nodes", "gpus_per_node"))
        _require(
            self.num_nodes * self.gpus_per_node <= MAX_GPUS,
            "num_nodes",
            f"{self.num_nodes:,} nodes of {self.gpus_per_node:,} GPUs are more than the {MAX_GPUS:,} GPUs uniap "
            "plans for",
        )
        for name in (
            "gpu_memory_gib",
            "peak_tflops",
            "hbm_bandwidth_gbps",
            "intra_node_bandwidth_gbps",
            "inter_node_bandwidth_gbps",
            "reserved_memory_gib",
            "matmul_efficiency",
            "intra_node_efficiency",
            "inter_node_efficiency",
            "collective_latency_us",
            "host_memory_gib",
            "host_memory_bandwidth_gbps",
            "host_link_bandwidth_gbps",
            "peak_fp8_tflops",
            "peak_fp4_tflops",
        ):
            v = getattr(self, name)
            if v is None and name in OPTIONAL_FIELDS:
                continue
            _require(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v != float("inf"),
                name,
                f"must be a finite number (got {v!r})",
            )
        for name in (
            "gpu_memory_gib",
            "peak_tflops",
            "hbm_bandwidth_gbps",
            "intra_node_bandwidth_gbps",
            "inter_node_bandwidth_gbps",
            "host_memory_bandwidth_gbps",
            "host_link_bandwidth_gbps",
        ):
            _require(getattr(self, name) > 0, name, f"must be positive (got {getattr(self, name)!r})")
        for name in ("matmul_efficiency", "intra_node_efficiency", "inter_node_efficiency"):
            v = getattr(self, name)
            _require(v is None or 0 < v <= 1, name, f"must be in (0, 1] (got {v!r})")
        _require(
            0 <= self.reserved_memory_gib < self.gpu_memory_gib,
            "reserved_memory_gib",
            "must be >= 0 and below gpu_memory_gib",
        )
        _require(self.collective_latency_us >= 0, "collective_latency_us", "must be >= 0")
        _require(
            self.nvlink_domain is None
            or (
                isinstance(self.nvlink_domain, int)
                and self.nvlink_domain >= self.gpus_per_node
                and self.nvlink_domain % self.gpus_per_node == 0
            ),
            "nvlink_domain",
            f"must be a multiple of gpus_per_node ({self.gpus_per_node}) or absent",
        )
        for name in ("host_memory_gib", "peak_fp8_tflops", "peak_fp4_tflops"):
            v = getattr(self, name)
            _require(v is None or v > 0, name, "must be positive or absent")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def nvlink_gpus(self) -> int:
        """GPUs joined by NVLink (the intra-node bandwidth): the NVLink domain, else one node."""
        return self.nvlink_domain or self.gpus_per_node

    @property
    def coefficients(self) -> DeviceCoefficients:
        """Achieved fractions of peak for this GPU model (measured defaults; matmul_efficiency overrides)."""
        measured = device_coefficients(self.gpu_name)
        return measured if self.matmul_efficiency is None else measured.with_gemm_efficiency(self.matmul_efficiency)

    @property
    def usable_memory_bytes(self) -> float:
        return (self.gpu_memory_gib - self.reserved_memory_gib) * GiB

    @property
    def host_memory_per_gpu_bytes(self) -> float | None:
        """Host memory one GPU's process may fill with offloaded states: its share of the node's, less what
        the operating system, data loaders and the page cache keep (HOST_MEMORY_USABLE); None: unknown."""
        if self.host_memory_gib is None:
            return None
        return self.host_memory_gib * HOST_MEMORY_USABLE * GiB / self.gpus_per_node

    def with_shape(self, nodes: int | None = None, gpus_per_node: int | None = None) -> "ClusterSpec":
        return replace(self, num_nodes=nodes or self.num_nodes, gpus_per_node=gpus_per_node or self.gpus_per_node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClusterSpec":
        return _from_dict(cls, data, "cluster")


# Hosts from NVIDIA's DGX datasheets: DGX A100 80GB, 2 TB DDR4-3200 on 2 x 8 channels (409.6 GB/s, AMD EPYC 7742),
# PCIe Gen4 x16 per GPU (32 GB/s per direction); DGX H100/H200, 2 TB DDR5-4800 on 2 x 8 channels (614 GB/s, Xeon
# Platinum 8480C), PCIe Gen5 x16 (64 GB/s).
DGX_A100_HOST = dict(host_memory_gib=2048.0, host_memory_bandwidth_gbps=409.6, host_link_bandwidth_gbps=32.0)
DGX_H100_HOST = dict(host_memory_gib=2048.0, host_memory_bandwidth_gbps=614.4, host_link_bandwidth_gbps=64.0)
# What NCCL reaches on Hopper and Blackwell systems (nccl-tests bus bandwidth, large messages, as collected in
# stas00/ml-engineering network/README.md and NVIDIA's answer in nccl-tests issue #290): 8x H100/H200 all-gather
# and reduce-scatter 361-363 GB/s of NVLink4's 450 per direction (all-reduce 367 on rings, 473-482 with NVLink
# SHARP), 8x B200 all-reduce 682 of 900 on rings; 46-48 GB/s per 400 Gb/s NIC across nodes.
HOPPER_LINKS = dict(intra_node_efficiency=0.8, inter_node_efficiency=0.9)
BLACKWELL_LINKS = dict(intra_node_efficiency=0.75, inter_node_efficiency=0.9)

CLUSTER_PRESETS: dict[str, ClusterSpec] = {
    c.name: c
    for c in (
        # Memory as PyTorch reports it (total_memory, the "total capacity" of its out-of-memory message): 79.35 GiB
        # for an A100 80GB, 79.11 GiB for an H100 80GB HBM3, 139.8 GiB measured on an H200.
        # DGX A100 80GB: A100 SXM 312 TFLOP/s bf16, 2.0 TB/s HBM, NVLink3 600 GB/s (300 per direction),
        # 8x HDR 200 Gb/s InfiniBand per node = 25 GB/s per GPU.
        ClusterSpec(
            name="dgx-a100-80g",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="A100-SXM-80GB",
            gpu_memory_gib=79.35,
            peak_tflops=312.0,
            hbm_bandwidth_gbps=2039.0,
            intra_node_bandwidth_gbps=300.0,
            inter_node_bandwidth_gbps=25.0,
            **DGX_A100_HOST,
        ),
        # DGX H100: 989 TFLOP/s dense bf16 (1,979 dense FP8), 3.35 TB/s, NVLink4 900 GB/s (450 per direction),
        # 8x NDR 400 Gb/s = 50 GB/s per GPU.
        ClusterSpec(
            name="dgx-h100",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="H100-SXM-80GB",
            gpu_memory_gib=79.11,
            peak_tflops=989.0,
            hbm_bandwidth_gbps=3350.0,
            intra_node_bandwidth_gbps=450.0,
            inter_node_bandwidth_gbps=50.0,
            peak_fp8_tflops=1979.0,
            **DGX_H100_HOST,
            **HOPPER_LINKS,
        ),
        # DGX H200: the H100's chip and links with 141 GB HBM3e at 4.8 TB/s.
        ClusterSpec(
            name="dgx-h200",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="H200-SXM-141GB",
            gpu_memory_gib=139.8,
            peak_tflops=989.0,
            hbm_bandwidth_gbps=4800.0,
            intra_node_bandwidth_gbps=450.0,
            inter_node_bandwidth_gbps=50.0,
            peak_fp8_tflops=1979.0,
            **DGX_H100_HOST,
            **HOPPER_LINKS,
        ),
        # DGX B200 (NVIDIA DGX B200 User Guide, "DGX B200 Component Descriptions"; dense peaks are half the
        # datasheet's sparse 72 PFLOPS FP8 / 8): 2,250 TFLOP/s bf16, 4,500 FP8, 9,000 FP4 (72 PF dense / 8), 180 GB
        # HBM3e (178.35 GiB as
        # PyTorch reports it) at 8 TB/s, NVLink5 1.8 TB/s (900 per direction), 8x ConnectX-7 400 Gb/s; hosts
        # 2x Xeon Platinum 8570 with 2 TB DDR5-5600 on 2 x 8 channels (716.8 GB/s), PCIe Gen5 x16 per GPU.
        ClusterSpec(
            name="dgx-b200",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="B200-SXM-180GB",
            gpu_memory_gib=178.35,
            peak_tflops=2250.0,
            peak_fp8_tflops=4500.0,
            peak_fp4_tflops=9000.0,
            hbm_bandwidth_gbps=8000.0,
            intra_node_bandwidth_gbps=900.0,
            inter_node_bandwidth_gbps=50.0,
            host_memory_gib=2048.0,
            host_memory_bandwidth_gbps=716.8,
            host_link_bandwidth_gbps=64.0,
            **BLACKWELL_LINKS,
        ),
        # GB200 NVL72 (NVIDIA GB200 NVL72 page, rack figures / 72): 2,500 TFLOP/s bf16, 5,000 FP8, 10,000 FP4,
        # 186 GB HBM3e
        # (184.31 GiB in PyTorch) at 8 TB/s; 18 trays of 4 GPUs and 2 Grace CPUs, all 72 GPUs on one NVLink5
        # fabric (900 GB/s per direction per GPU); one ConnectX-7 400 Gb/s per GPU. Hosts: up to 480 GB LPDDR5X
        # at ~512 GB/s per Grace, reached over NVLink-C2C (900 GB/s both ways per Grace, ~225 per GPU and
        # direction).
        ClusterSpec(
            name="gb200-nvl72",
            num_nodes=18,
            gpus_per_node=4,
            nvlink_domain=72,
            gpu_name="GB200",
            gpu_memory_gib=184.31,
            peak_tflops=2500.0,
            peak_fp8_tflops=5000.0,
            peak_fp4_tflops=10000.0,
            hbm_bandwidth_gbps=8000.0,
            intra_node_bandwidth_gbps=900.0,
            inter_node_bandwidth_gbps=50.0,
            host_memory_gib=960.0,
            host_memory_bandwidth_gbps=1024.0,
            host_link_bandwidth_gbps=225.0,
            **BLACKWELL_LINKS,
        ),
        # DGX B300 (Blackwell Ultra; DGX B300 datasheet via secondary sources, not re-read): 2,250 TFLOP/s bf16,
        # 4,500 FP8, 13,500 FP4 (108 PF dense / 8: Blackwell Ultra's FP4 is not half its sparse figure), 288 GB HBM3e
        # (267.69 GiB in PyTorch) at 8 TB/s, NVLink5, 8x ConnectX-8 800 Gb/s (100 GB/s
        # per GPU). Its hosts' memory is not verified: not described.
        ClusterSpec(
            name="dgx-b300",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="B300-SXM-288GB",
            gpu_memory_gib=267.69,
            peak_tflops=2250.0,
            peak_fp8_tflops=4500.0,
            peak_fp4_tflops=13500.0,
            hbm_bandwidth_gbps=8000.0,
            intra_node_bandwidth_gbps=900.0,
            inter_node_bandwidth_gbps=100.0,
            **BLACKWELL_LINKS,
        ),
        # GB300 NVL72 (NVIDIA GB300 NVL72 page via secondary sources: 360 PF dense FP8 / 72): 2,500 TFLOP/s bf16,
        # 5,000 FP8, 15,000 FP4 (1,080 PF dense / 72), ~279 GB HBM3e (276.50 GiB in PyTorch) at 8 TB/s, one 72-GPU
        # NVLink5 fabric, one ConnectX-8
        # 800 Gb/s per GPU. Hosts: 2 Grace CPUs per tray of 4 GPUs (NVIDIA Enterprise Reference Architecture
        # "NVL72 AI Factory", System Hardware & Components), the same Grace as GB200's: up to 480 GB LPDDR5X each
        # over NVLink-C2C, described as GB200's.
        ClusterSpec(
            name="gb300-nvl72",
            num_nodes=18,
            gpus_per_node=4,
            nvlink_domain=72,
            gpu_name="GB300",
            gpu_memory_gib=276.5,
            peak_tflops=2500.0,
            peak_fp8_tflops=5000.0,
            peak_fp4_tflops=15000.0,
            hbm_bandwidth_gbps=8000.0,
            intra_node_bandwidth_gbps=900.0,
            inter_node_bandwidth_gbps=100.0,
            host_memory_gib=960.0,
            host_memory_bandwidth_gbps=1024.0,
            host_link_bandwidth_gbps=225.0,
            **BLACKWELL_LINKS,
        ),
        # 8x A100 80GB PCIe in one server: PCIe Gen4 x16 (32 GB/s per direction), no NVLink;
        # one 100 Gb/s NIC shared by the node = 1.5625 GB/s per GPU.
        ClusterSpec(
            name="pcie-a100-8g",
            num_nodes=1,
            gpus_per_node=8,
            gpu_name="A100-PCIe-80GB",
            gpu_memory_gib=79.35,
            peak_tflops=312.0,
            hbm_bandwidth_gbps=1935.0,
            intra_node_bandwidth_gbps=32.0,
            inter_node_bandwidth_gbps=1.5625,
            intra_node_efficiency=0.7,
            host_memory_gib=1024.0,
            host_memory_bandwidth_gbps=409.6,
            host_link_bandwidth_gbps=32.0,
        ),
    )
}


# GPU family -> the preset whose peak FLOP/s and link bandwidths a detected GPU of that family gets.
PRESET_OF_FAMILY = (
    ("GB300", "gb300-nvl72"),
    ("GB200", "gb200-nvl72"),
    ("B300", "dgx-b300"),
    ("B200", "dgx-b200"),
    ("H200", "dgx-h200"),
    ("H100", "dgx-h100"),
    ("A100", "dgx-a100-80g"),
)
DEFAULT_DEVICE_PRESET = "dgx-h100"


def device_cluster(gpu_name: str, memory_bytes: float, nodes: int = 1, gpus_per_node: int = 1) -> ClusterSpec:
    """`nodes` x `gpus_per_node` of a device a profiler or training run detected: its name and total memory as
    the runtime reports them, peak FLOP/s and bandwidths from the preset of its family, else dgx-h100's."""
    key = gpu_name.upper()
    preset = CLUSTER_PRESETS[next((p for family, p in PRESET_OF_FAMILY if family in key), DEFAULT_DEVICE_PRESET)]
    gib = memory_bytes / GiB
    return replace(
        preset.with_shape(nodes, gpus_per_node),
        name=f"detected {gpu_name}",
        gpu_name=gpu_name,
        gpu_memory_gib=gib,
        reserved_memory_gib=min(preset.reserved_memory_gib, gib / 2),
    )


def cluster_preset(name: str) -> ClusterSpec:
    try:
        return CLUSTER_PRESETS[name]
    except KeyError:
        raise UnknownPresetError.of(
            "cluster preset", name, CLUSTER_PRESETS, "pass one of the presets or a YAML/JSON cluster file"
        ) from None


def load_cluster(ref: str, nodes: int | None = None, gpus_per_node: int | None = None) -> ClusterSpec:
    """A preset name or a YAML/JSON file, reshaped to `nodes` x `gpus_per_node` when given."""
    if ref in CLUSTER_PRESETS:
        base = CLUSTER_PRESETS[ref]
    elif is_file_ref(ref):
        data = read_mapping(Path(ref), "cluster")
        data.setdefault("name", Path(ref).stem)
        base = ClusterSpec.from_dict(data)
    else:
        check_file_ref(ref, "cluster")
        base = cluster_preset(ref)
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise SpecError(f"invalid {name}: must be a positive integer (got {value!r})")
    return base.with_shape(nodes, gpus_per_node)
