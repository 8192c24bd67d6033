"""The collective benchmark both adapters' profilers run, through the adapter's communication module:
`torch.distributed` (Megatron-LM) or `deepspeed.comm` (DeepSpeed), which share the calls used here
(all_reduce, all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, send, recv, barrier,
new_group, all_gather_object).

all_reduce, all_gather, reduce_scatter and all_to_all over the world (those the backend runs), and P2P
ping-pong from rank 0; bus bandwidth in the NCCL-tests convention (uniap.profile.schema.bus_factor), the
best over the message sizes; each time the slowest rank's mean over `repeats` calls after `warmup`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .harness import Device, all_ranks_ok, max_over_ranks
from .schema import CollectiveBandwidth, bus_factor

log = logging.getLogger("uniap.profile.collectives")

DEFAULT_SIZES_MB_CPU = (1.0, 4.0)
DEFAULT_SIZES_MB_GPU = (16.0, 64.0, 256.0)
WORLD_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# The profilers' command lines time at least this many calls per message size: a collective call is short.
COLLECTIVE_MIN_REPEATS = 5
# Ranks per node, set by torchrun (LOCAL_WORLD_SIZE) and the deepspeed launcher (LOCAL_SIZE).
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
PROBE_BYTES_PER_RANK = 64  # the tiny message that asks the backend whether it runs an op


def node_layout(comm: Any, world: int) -> list[list[int]]:
    """Ranks per node: contiguous blocks of LOCAL_SIZE_VARS' ranks per node, else grouped by host name (every
    rank must call it)."""
    for key in LOCAL_SIZE_VARS:
        value = os.environ.get(key)
        if value and value.isdigit() and int(value) > 0 and world % int(value) == 0:
            local = int(value)
            return [list(range(start, start + local)) for start in range(0, world, local)]
    names: list[Any] = [None] * world
    comm.all_gather_object(names, socket.gethostname())
    nodes: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        nodes.setdefault(name, []).append(rank)
    return list(nodes.values())


def profile_collectives(
    comm: Any,
    device: Device,
    dtype: Any,
    sizes_mb: list[float] | None,
    warmup: int,
    repeats: int,
    report: list[str] | None = None,
    per_node: bool = True,
) -> list[CollectiveBandwidth]:
    """Bus bandwidths of `dtype` messages of `sizes_mb` MiB (None: DEFAULT_SIZES_MB_CPU on the CPU, else
    DEFAULT_SIZES_MB_GPU), the best per op and scope; empty when the world has one rank. Every rank must call
    it; `report` gets a line per measurement.

    The ops run over the world: scope intra_node on one node, inter_node on several. P2P pairs rank 0 with
    its node's next rank (intra_node) and, on several nodes, with the next node's first rank (inter_node).
    `per_node` also measures each node's ranks concurrently (intra_node) and keeps both P2P pairs; without it
    only the first pair is measured (rank 0 <-> 1 in torchrun's layout)."""
    if sizes_mb is None:
        sizes_mb = list(DEFAULT_SIZES_MB_CPU if device.kind == "cpu" else DEFAULT_SIZES_MB_GPU)
    if any(not s > 0 for s in sizes_mb):
        raise SpecError(f"collective message sizes must be positive (got {sizes_mb!r})")
    world = comm.get_world_size()
    if world < 2:
        return []
    bench = _Bench(
        comm,
        device,
        dtype,
        [max(1, round(s * 2**20)) for s in sizes_mb],
        warmup,
        repeats,
        report if report is not None else [],
    )
    nodes = node_layout(comm, world)
    single_node = len(nodes) == 1
    out = bench.group_collectives([list(range(world))], "intra_node" if single_node else "inter_node")
    local = len(nodes[0])
    if per_node and not single_node and local >= 2 and all(len(n) == local for n in nodes):
        out += bench.group_collectives(nodes, "intra_node")
    peers = [(nodes[0][1], "intra_node")] if local >= 2 else []
    if not single_node:
        peers.append((nodes[1][0], "inter_node"))
    for peer, scope in peers if per_node else peers[:1]:
        out += bench.p2p(peer, scope)
    return out


@dataclass(frozen=True)
class _Bench:
    """One benchmark's settings: the communication module, this rank's device, the message dtype and sizes
    in bytes, the calls per measurement, and the report lines it appends to."""

    comm: Any
    device: Device
    dtype: Any
    sizes: list[int]
    warmup: int
    repeats: int
    report: list[str]

    def group_collectives(self, ranks_per_group: list[list[int]], scope: str) -> list[CollectiveBandwidth]:
        """Every op over groups of equal size running concurrently (one group: the world)."""
        n = len(ranks_per_group[0])
        group = None
        if len(ranks_per_group) > 1:
            rank = self.comm.get_rank()
            for ranks in ranks_per_group:  # every rank creates every group, in the same order
                g = self.comm.new_group(ranks)
                if rank in ranks:
                    group = g
        out = []
        for op in WORLD_OPS:
            if not self._supported(op, n, group):
                continue
            best = 0.0
            for nbytes in self.sizes:
                call = self._collective_call(op, nbytes, n, group)
                seconds = max_over_ranks(self._seconds(call, group, barrier=True), self.comm, self.device)
                busbw = nbytes / seconds * bus_factor(op, n) / 1e9
                self.report.append(
                    f"{op:15s} {scope:10s} n={n:<4d} {nbytes / 2**20:9.2f} MiB "
                    f"{seconds * 1e3:10.3f} ms busbw {busbw:9.3f} GB/s"
                )
                best = max(best, busbw)
            if best > 0 and math.isfinite(best):
                out.append(CollectiveBandwidth(op=op, group_size=n, scope=scope, bus_bandwidth_gbps=best))
        return out

    def p2p(self, peer: int, scope: str) -> list[CollectiveBandwidth]:
        """Ping-pong between rank 0 and `peer`: one-way time = round trip / 2; bandwidth = size / time. Other
        ranks wait at the slowest-rank all-reduce."""
        import torch

        rank = self.comm.get_rank()
        elem = torch.tensor([], dtype=self.dtype).element_size()
        best = 0.0
        for nbytes in self.sizes:
            seconds = 0.0
            if rank in (0, peer):
                buf = torch.ones(max(1, nbytes // elem), dtype=self.dtype, device=self.device.name)
                seconds = self._seconds(self._round_trip(buf, rank, peer), None, barrier=False) / 2
            seconds = max_over_ranks(seconds, self.comm, self.device)
            busbw = nbytes / seconds / 1e9
            self.report.append(
                f"{'p2p':15s} {scope:10s} 0<->{peer:<3d} {nbytes / 2**20:9.2f} MiB "
                f"{seconds * 1e3:10.3f} ms busbw {busbw:9.3f} GB/s"
            )
            best = max(best, busbw)
        if best > 0 and math.isfinite(best):
            return [CollectiveBandwidth(op="p2p", group_size=2, scope=scope, bus_bandwidth_gbps=best)]
        return []

    def _collective_call(self, op: str, nbytes: int, n: int, group) -> Callable[[], None]:
        """A closure running `op` over `group` (None: the world) of `n` ranks on buffers of its own, `nbytes`
        the full tensor: all_reduce's buffer, all_gather's output, reduce_scatter's input, all_to_all's
        per-rank buffer."""
        import torch

        comm, dtype, device = self.comm, self.dtype, self.device.name
        elem = torch.tensor([], dtype=dtype).element_size()
        numel = max(n, nbytes // elem // n * n)
        full = torch.ones(numel, dtype=dtype, device=device)
        if op == "all_reduce":
            return lambda: comm.all_reduce(full, group=group)
        if op == "all_to_all":
            out = torch.empty_like(full)
            return lambda: comm.all_to_all_single(out, full, group=group)
        shard = torch.ones(numel // n, dtype=dtype, device=device)
        if op == "all_gather":
            return lambda: comm.all_gather_into_tensor(full, shard, group=group)
        if op == "reduce_scatter":
            return lambda: comm.reduce_scatter_tensor(shard, full, group=group)
        raise ValueError(op)

    def _round_trip(self, buf, rank: int, peer: int) -> Callable[[], None]:
        """A closure sending `buf` from rank 0 to `peer` and back (on `peer`: receiving from rank 0 first)."""
        comm = self.comm

        def from_rank_0():
            comm.send(buf, peer)
            comm.recv(buf, peer)

        def at_peer():
            comm.recv(buf, 0)
            comm.send(buf, 0)

        return from_rank_0 if rank == 0 else at_peer

    def _supported(self, op: str, n: int, group) -> bool:
        """Whether the backend runs `op` (probed on a tiny tensor; all ranks agree)."""
        ok = True
        try:
            self._collective_call(op, PROBE_BYTES_PER_RANK * n, n, group)()
            self.device.synchronize()
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            log.warning("%s is not supported by this backend (%s); not measured", op, str(exc).splitlines()[0])
            ok = False
        return all_ranks_ok(ok, self.comm, self.device)

    def _seconds(self, call: Callable[[], None], group, barrier: bool) -> float:
        """This rank's mean seconds per `call` over `repeats` after `warmup`; with `barrier`, the group's ranks
        start the timed calls together."""
        for _ in range(self.warmup):
            call()
        self.device.synchronize()
        if barrier:
            self.comm.barrier(group=group)
        t0 = time.perf_counter()
        for _ in range(self.repeats):
            call()
        self.device.synchronize()
        return (time.perf_counter() - t0) / self.repeats
