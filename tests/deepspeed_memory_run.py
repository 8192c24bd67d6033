"""Per-rank program (test-only): measure the model-state bytes DeepSpeed 0.19.8 keeps while training, on CPU
processes joined by gloo; tests/test_deepspeed_memory.py launches it and compares with uniap's accounting.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc-per-node 2 tests/deepspeed_memory_run.py \
        --configs CONFIGS.json --out-dir DIR

CONFIGS.json maps a name to a DeepSpeed config (the test writes them: uniap's ZeRO section, bf16 or fp32, AdamW).
The configurations run one after the other in the same processes (importing DeepSpeed and loading its FusedAdam
op once); each gets a fresh model and engine, counted on its own (old engines that linger in DeepSpeed's
registries are not reachable from the new one), and the engine is destroyed before the next one starts.

The model is a stack of LAYERS x nn.Linear(HIDDEN, HIDDEN), residual tanh blocks (1,056,768 parameters): many
parameters of equal size, so that every gradient fits a small reduce bucket (ZeRO-1/2 send a gradient larger
than reduce_bucket_size past their contiguous bucket, runtime/zero/stage_1_and_2.py) while the buckets stay small
next to the model, and the ZeRO-1/2 partitions of two ranks end on a layer boundary.

Each configuration runs STEPS training steps of its gradient_accumulation_steps micro-batches (engine(x),
engine.backward(loss), engine.step() per micro-batch, as tests/ds_train.py does). DIR/<name>.rank<R>.json holds:
- snapshots, in the last step (the first step creates Adam's moments; from the second on the states are steady),
  after each micro-batch's backward (before its engine.step()) and after the step:
  - held: the bytes of the distinct tensor storages (deduplicated by storage) reachable from the engine: the
    module's parameters, their .grad and the tensors ZeRO-3 hangs on them (ds_tensor), the module's buffers, the
    optimizer wrapper, the basic optimizer and the engine, walked through containers and deepspeed/torch objects;
  - unreached: the bytes of any other tensor alive (gc), leaving out those alive before the configuration
    started (earlier engines linger in DeepSpeed's registries); a snapshot waits for gloo's worker thread to let
    go of a finished collective's tensors, so this is normally 0;
  - breakdown: bytes by the first attribute path that reaches a storage (digits dropped; "<gc>" for unreached);
- step: the last boundary engine.step() (the one that runs the optimizer) under torch.profiler with
  profile_memory=True, started before the model is built: the CPU bytes allocated at the step's start, the
  highest and the final bytes within it (running sum of the allocation events) and the op in which the highest
  point fell. The profiler records the free of a storage only if it recorded its allocation (c10's
  ProfiledCPUMemoryReporter), hence the early start; it also misses what gloo's worker threads allocate or free
  (the profiler's state is thread-local), which is why the held bytes come from the storages, not from this sum,
  and why the test checks that the step's final - start equals the change of the held bytes across the step;
- what DeepSpeed runs (optimizer wrapper, basic optimizer, ZeRO stage, skipped steps) and the numbers the test
  needs for what does not scale with the model (parameters, the largest one, ZeRO-3's persistent parameters).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HIDDEN, LAYERS, MICRO, STEPS = 128, 64, 4, 2
SEED = 1234


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


class Storages:
    """Distinct tensor storages, each counted once, labelled by the first path that reaches it."""

    SKIP = ("torch.distributed", "torch._C", "torch.utils", "torch.profiler", "torch.autograd")

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, int]] = {}

    def add(self, label: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.seen:
            self.seen[storage.data_ptr()] = (label, storage.nbytes())

    def add_tensor(self, label: str, tensor) -> None:
        """The tensor, its .grad and the tensors in its __dict__ (ZeRO-3's ds_tensor and the like)."""
        self.add(label, tensor)
        if tensor.is_leaf and tensor.grad is not None:
            self.add(label + ".grad", tensor.grad)
        for key, value in vars(tensor).items():
            if isinstance(value, torch.Tensor):
                self.add(f"{label}.{key}", value)

    def walk(self, root, label: str, max_depth: int = 8) -> None:
        visited: set[int] = set()
        frontier = [(root, label)]
        for _ in range(max_depth):
            following = []
            for obj, path in frontier:
                if id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, complex, type(None))):
                    continue
                visited.add(id(obj))
                if isinstance(obj, torch.Tensor):
                    self.add_tensor(path, obj)
                elif isinstance(obj, dict):
                    following += [
                        (v, f"{path}[{k}]" if isinstance(k, (str, int)) else f"{path}[.]") for k, v in list(obj.items())
                    ]
                    following += [(k, f"{path}[key]") for k in list(obj) if isinstance(k, torch.Tensor)]
                elif isinstance(obj, (list, tuple, set, frozenset)):
                    following += [(v, f"{path}[{i}]") for i, v in enumerate(list(obj))]
                else:
                    module = type(obj).__module__ or ""
                    if module.startswith(("deepspeed", "torch", "collections")) and not module.startswith(self.SKIP):
                        following += [(v, f"{path}.{k}") for k, v in list(getattr(obj, "__dict__", {}).items())]
                        if isinstance(obj, torch.optim.Optimizer):
                            following.append((obj.state, f"{path}.state"))
            frontier = following

    def breakdown(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for label, nbytes in self.seen.values():
            key = "".join(c for c in label if not c.isdigit())  # one entry per attribute, not per index
            out[key] = out.get(key, 0) + nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def live_storages() -> set[int]:
    return {
        obj.untyped_storage().data_ptr()
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta"
    }


def model_states(engine, earlier: set[int]) -> dict:
    """Bytes of the distinct storages reachable from the engine (held), and of the other tensors alive (gc) but
    those alive before the configuration started (`earlier`: what earlier engines left in DeepSpeed's
    registries) (unreached)."""
    gc.collect()
    s = Storages()
    for p in engine.module.parameters():
        s.add_tensor("module.param", p)
    for b in engine.module.buffers():
        s.add("module.buffer", b)
    s.walk(engine.optimizer, "optimizer")
    s.walk(getattr(engine, "basic_optimizer", None), "basic_optimizer")
    s.walk(engine, "engine")
    held = sum(nbytes for _, nbytes in s.seen.values())
    for obj in gc.get_objects():
        if (
            isinstance(obj, torch.Tensor)
            and obj.device.type != "meta"
            and obj.untyped_storage().data_ptr() not in earlier
        ):
            s.add_tensor("<gc>", obj)
    return {"held": held, "unreached": sum(nbytes for _, nbytes in s.seen.values()) - held, "breakdown": s.breakdown()}


def settled_states(engine, earlier: set[int], tries: int = 20) -> dict:
    """model_states once nothing outside the engine holds a tensor any more: gloo's worker thread lets go of a
    finished collective's tensors a moment after the collective returns (seen after the last backward, one
    reduce bucket's flattened copy), so wait for it, up to `tries` times 50 ms."""
    for _ in range(tries):
        states = model_states(engine, earlier)
        if not states["unreached"]:
            break
        time.sleep(0.05)
    return states


def allocation_timeline(prof, marks: tuple[str, ...]):
    """All allocation events of the profile in time order with the op each fell in, and the (start, end)
    times of the records whose name starts with one of `marks`."""
    from torch._C._profiler import _EventType

    events, records = [], []

    def visit(nodes, op):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, op))
                continue
            if node.name.startswith(marks):
                records.append((node.name, node.start_time_ns, node.end_time_ns))
                visit(node.children, op)
            else:
                visit(node.children, node.name)

    visit(prof.profiler.kineto_results.experimental_event_tree(), "<top>")
    events.sort(key=lambda e: e[0])
    return events, records


def allocated_at(events, t: int) -> int:
    return sum(size for when, size, _ in events if when < t)


def window(events, start: int, end: int) -> dict:
    cur = allocated_at(events, start)
    out = {"start": cur, "peak": cur, "peak_op": None}
    for when, size, op in events:
        if start <= when <= end:
            cur += size
            if cur > out["peak"]:
                out["peak"], out["peak_op"] = cur, op
    out["end"] = cur
    return out


def run_config(name: str, config: dict, rank: int) -> dict:
    import deepspeed
    from torch.profiler import ProfilerActivity, profile, record_function

    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    gas = config["gradient_accumulation_steps"]
    report: dict = {"name": name, "rank": rank, "config": config, "snapshots": {}}
    gc.collect()
    earlier = live_storages()
    t0 = time.monotonic()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(SEED)
        model = Stack()
        report["nparam"] = sum(p.numel() for p in model.parameters())
        report["largest_param"] = max(p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        del model
        g = torch.Generator().manual_seed(SEED + rank)
        for step in range(1, STEPS + 1):
            for micro in range(gas):
                x = torch.randn(MICRO, HIDDEN, generator=g).to(dtype)
                loss = engine(x).float().pow(2).mean()
                engine.backward(loss)
                del x, loss
                if step < STEPS:
                    engine.step()
                    continue
                report["snapshots"][f"micro{micro}_backward"] = settled_states(engine, earlier)
                if engine.is_gradient_accumulation_boundary():
                    gc.disable()  # no collection of unrelated garbage inside the measured window
                    with record_function("uniap::step"):
                        engine.step()
                    gc.enable()
                else:
                    engine.step()
        report["snapshots"]["after_step"] = settled_states(engine, earlier)
        params = list(engine.module.parameters())
        report.update(
            zero_stage=engine.zero_optimization_stage(),
            wrapper=type(engine.optimizer).__name__,
            basic_optimizer=type(engine.basic_optimizer).__name__,
            dp_world_size=engine.dp_world_size,
            gradient_accumulation_steps=engine.gradient_accumulation_steps(),
            skipped_steps=engine.skipped_steps,
            global_steps=engine.global_steps,
            persistent_numel=sum(p.ds_numel for p in params if getattr(p, "ds_persist", False)),
        )
        engine.destroy()
        del engine, params
    seconds = time.monotonic() - t0
    events, records = allocation_timeline(prof, ("uniap::step",))
    report["step"] = window(events, *records[-1][1:])
    report["seconds"] = {"run": round(seconds, 2), "profile": round(time.monotonic() - t0 - seconds, 2)}
    return report


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--configs", required=True, help="JSON: {name: DeepSpeed config}")
    cli.add_argument("--out-dir", required=True)
    cli.add_argument("--local_rank", "--local-rank", type=int, default=None)
    opts = cli.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    gc.collect()
    gc.freeze()  # what the imports made is left out of every later collection and gc scan (faster snapshots)
    rank = deepspeed.comm.get_rank()
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, config in json.loads(Path(opts.configs).read_text()).items():
        report = run_config(name, config, rank)
        report["world_size"] = deepspeed.comm.get_world_size()
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(report, indent=1))
        deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
