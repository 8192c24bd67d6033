"""`uniap-deepspeed profile`: measure layer times, the optimizer step and collective bandwidths through
DeepSpeed's runtime, and calibrate them against a whole-model training run.

Layers: for every distinct layer signature of the model's graph (the profile key, see
uniap.model.graph), a faithful torch module of that layer is built from the ModelSpec (uniap_deepspeed.layers:
pre-norm attention with grouped K/V heads, causal for a decoder, RoPE, MLP or SwiGLU, LayerNorm or RMSNorm,
optional biases, dropout 0), wrapped with `deepspeed.initialize` (ZeRO stage 0, bf16/fp16 on a GPU,
fp32 on the CPU) and timed as engine forward + `engine.backward` for each micro-batch size: the
median of `repeats` iterations after `warmup`. Embedding and head layers are timed too, so a plan
built from the profile can say `compute measured`. DeepSpeed has no tensor parallelism of its own,
so every timing is at tp=1.

Collectives (world size >= 2): uniap.profile.collectives through `deepspeed.comm`: all_reduce,
all_gather, reduce_scatter and all_to_all over the whole world, plus P2P send/recv (ping-pong between
rank 0 and rank 1, and with the first rank of the next node when there is one); bus bandwidth in the
NCCL-tests convention, the best over the message sizes. On several nodes the collectives are also
measured inside each node.

Optimizer: one `engine.step()` over the parameters of a transformer layer (the layer module itself),
ZeRO 0, the layers' precision, an AdamW optimizer section (DeepSpeed's FusedAdam on a GPU,
torch.optim.AdamW via `torch_adam` on the CPU or where FusedAdam does not build): the median step
after a warm-up step, and on CUDA the memory the step allocates beyond what was allocated before it.

Calibration (--calibration-layers N, default 2): a whole model of the real dimensions with N
transformer layers trained through DeepSpeed with the config uniap emits for it, every rank a
data-parallel replica; its time per iteration (and peak memory on CUDA) fitted into the profile's
Calibration (see uniap_deepspeed.training_run).

Run it single-process (`python -m uniap_deepspeed.profile ...`) or under torchrun / the deepspeed
launcher; rank 0 writes the profile JSON atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from uniap.errors import SpecError
from uniap.model.graph import TRANSFORMER_KINDS, Layer, build_graph
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.profile import collectives, harness
from uniap.profile.harness import ACTIVATION_NOTE, CPU_NOTE, layer_line, optimizer_measured, unless_out_of_memory
from uniap.profile.options import profiler_parser
from uniap.profile.runner import (
    CALIBRATION_MIN_ITERATIONS,
    profiled_job,
    default_single_process_env,
    run_profiler,
    run_profiler_cli,
)
from uniap.profile.schema import CollectiveBandwidth, LayerTiming, OptimizerTiming, Profile

from . import training_run
from .runtime import (
    Runtime,
    accelerator,
    all_ranks_ok,
    device_description,
    free_cached_memory,
    init_distributed,
    optimizer_name,
    optimizer_section,
    quiet_deepspeed,
    runtime_of,
    use_torch_adam,
)

log = logging.getLogger("uniap.deepspeed.profile")
T = TypeVar("T")

# Set by torchrun / the deepspeed launcher, or by MPI launchers DeepSpeed can discover.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# Timed optimizer steps at least: they are short, and a median of two is a mean.
OPTIMIZER_MIN_STEPS = 5


def _ds_config(rt: Runtime, micro_batch_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        # engine.backward needs an optimizer; plain SGD adds no state and is never stepped here.
        "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if rt.ds_precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif rt.ds_precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def _scalar(out):
    return out if out.dim() == 0 else out.mean()


def time_layer(module, rt: Runtime, micro_batch_size: int, warmup: int, repeats: int) -> LayerTiming:
    """Wrap `module` in a DeepSpeed engine and time engine forward + engine.backward: medians over
    `repeats` iterations after `warmup`. Gradient reduction across ranks is off (engine.no_sync),
    so the times are compute only; DP communication is costed from the collective bandwidths."""

    def measure(engine) -> tuple[float, float, float | None]:
        inputs = module.example_inputs(micro_batch_size, rt.device, rt.dtype)
        with engine.no_sync():
            return harness.time_passes(
                partial(_loss, engine, inputs),
                engine.backward,
                partial(_drop_grads, inputs),
                warmup,
                repeats,
                rt.harness_device,
            )

    fwd, bwd, act = _with_engine(module, _ds_config(rt, micro_batch_size), measure)
    return LayerTiming(tp=1, micro_batch_size=micro_batch_size, forward_ms=fwd, backward_ms=bwd, activation_bytes=act)


def _with_engine(module, config: dict[str, Any], measure: Callable[[Any], T]) -> T:
    """`measure(engine)` of a DeepSpeed engine wrapping `module`; the engine is torn down and its cached memory
    given back afterwards, even when `measure` raises."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    try:
        return measure(engine)
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        free_cached_memory()


def _loss(engine, inputs):
    return _scalar(engine(*inputs))


def _drop_grads(inputs) -> None:
    for x in inputs:
        x.grad = None


def _leave_gradients(engine, inputs) -> None:
    """A forward and backward that leave fresh gradients for the step."""
    _drop_grads(inputs)
    engine.backward(_loss(engine, inputs))


def _counted_step(engine) -> bool:
    """engine.step(); whether it stepped (the fp16 loss scaler skips a step that overflows)."""
    skipped = engine.skipped_steps
    engine.step()
    return engine.skipped_steps == skipped


# ==================================================================================================
# Layers
# ==================================================================================================


def profile_layers(
    model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], warmup: int, repeats: int
) -> dict[str, list[LayerTiming]]:
    """Timings per layer signature (every rank times; rank 0's numbers are returned). A micro-batch
    size that runs out of memory on any rank is skipped with the larger ones for that layer."""
    import torch

    from .layers import build_layer_module

    rt = runtime_of(training.precision)
    graph = build_graph(model, training)
    first: dict[str, Layer] = {}
    for layer in graph.layers:
        first.setdefault(layer.signature, layer)
    out: dict[str, list[LayerTiming]] = {}
    agree = partial(all_ranks_ok, rt=rt)
    for signature, layer in first.items():
        timings = []
        for mbs in sorted(set(micro_batch_sizes)):
            torch.manual_seed(1234)
            device_ctx = torch.device(rt.device) if rt.device_kind != "cpu" else torch.device("cpu")
            with device_ctx:
                module = build_layer_module(model, training, layer)
            if module is None:
                log.warning("no module for layer kind '%s' (%s); it stays estimated", layer.kind, signature)
                break
            timing = unless_out_of_memory(
                partial(time_layer, module, rt, mbs, warmup, repeats), agree, free_cached_memory
            )
            del module
            if timing is None:
                log.warning("%s: micro-batch size %d ran out of memory; larger ones skipped", signature, mbs)
                break
            timings.append(timing)
            if rt.rank == 0:
                log.info("%s", layer_line(signature, timing))
        if timings:
            out[signature] = timings
    return out


# ==================================================================================================
# Optimizer step
# ==================================================================================================


def time_optimizer_step(
    module, rt: Runtime, micro_batch_size: int, warmup: int, repeats: int, torch_adam: bool
) -> OptimizerTiming:
    """One engine.step() over `module`'s parameters as DeepSpeed runs it (ZeRO 0, the runtime's precision,
    the AdamW of optimizer_section): after a forward/backward that leaves gradients, the median step time of
    `repeats` steps after max(warmup, 1) (the first step creates the Adam moments). On CUDA also the most
    allocated during a step beyond what was allocated before it. A step the fp16 loss scaler skips (an
    overflow) is not kept. Timed by uniap.profile.harness.time_steps."""
    config = _ds_config(rt, micro_batch_size)
    config["optimizer"] = optimizer_section(torch_adam)
    if rt.ds_precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 1.0}  # static: no overflow-skipped steps to time

    def measure(engine) -> OptimizerTiming:
        inputs = module.example_inputs(micro_batch_size, rt.device, rt.dtype)
        step_ms, extra = harness.time_steps(
            partial(_counted_step, engine),
            warmup,
            repeats,
            rt.harness_device,
            prepare=partial(_leave_gradients, engine, inputs),
        )
        return OptimizerTiming(
            implementation=optimizer_name(engine),
            num_params=sum(p.numel() for p in module.parameters()),
            step_ms=step_ms,
            extra_peak_bytes=extra,
        )

    return _with_engine(module, config, measure)


def profile_optimizer(
    model: ModelSpec, training: TrainingSpec, micro_batch_size: int, warmup: int, repeats: int
) -> OptimizerTiming | None:
    """The optimizer step over the parameters of the model's first transformer layer (the layer module
    itself), through a DeepSpeed engine; None (with a warning) when it runs out of memory on any rank."""
    import torch

    from .layers import build_layer_module

    rt = runtime_of(training.precision)
    graph = build_graph(model, training)
    layer = next((x for x in graph.layers if x.kind in TRANSFORMER_KINDS), None)
    if layer is None:  # pragma: no cover - every architecture has transformer layers
        return None
    torch_adam = use_torch_adam(rt)
    torch.manual_seed(1234)
    with torch.device(rt.device):
        module = build_layer_module(model, training, layer)
    measure = partial(time_optimizer_step, module, rt, micro_batch_size, warmup, repeats, torch_adam)
    timing = unless_out_of_memory(measure, partial(all_ranks_ok, rt=rt), free_cached_memory)
    del module
    return optimizer_measured(timing, layer.signature, log, rt.rank == 0)


def profile_model(
    model: ModelSpec,
    training: TrainingSpec,
    micro_batch_sizes: list[int],
    warmup: int,
    repeats: int,
    device_name: str | None = None,
    optimizer: bool = True,
) -> Profile:
    """Measure every layer signature of `model` through DeepSpeed, and (`optimizer`) one optimizer step
    over a transformer layer's parameters. Initializes deepspeed.comm if nothing did (a 1-process
    gloo/nccl group without a launcher). Every rank must call it; rank 0's numbers are returned. Add
    collectives with profile_collectives and a calibration with uniap_deepspeed.training_run.calibrate."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    if not micro_batch_sizes or any(not isinstance(b, int) or b < 1 for b in micro_batch_sizes):
        raise SpecError(f"micro-batch sizes must be positive integers (got {micro_batch_sizes!r})")
    if warmup < 0 or repeats < 1:
        raise SpecError(f"warmup must be >= 0 and repeats >= 1 (got warmup={warmup}, repeats={repeats})")
    if not dist.is_initialized():
        default_single_process_env(LAUNCHER_VARS)
        init_distributed()
    rt = runtime_of(training.precision)
    layers = profile_layers(model, training, micro_batch_sizes, warmup, repeats)
    steps = max(repeats, OPTIMIZER_MIN_STEPS)
    timing = profile_optimizer(model, training, min(micro_batch_sizes), warmup, steps) if optimizer else None
    notes = [
        (
            f"DeepSpeed engine (ZeRO 0, {rt.ds_precision} compute), tp=1; median forward/backward ms of "
            f"{repeats} iterations after {warmup} warmup"
        )
    ]
    if rt.device_kind == "cuda":
        notes.append(ACTIVATION_NOTE)
    if timing is not None:
        notes.append(
            f"optimizer: engine.step() of {timing.implementation} over one transformer layer's "
            f"parameters, median of {steps} steps after {max(warmup, 1)} warmup"
        )
    if rt.device_kind == "cpu":
        notes.insert(0, CPU_NOTE)
    if rt.ds_precision != training.precision:
        notes.append(f"signatures say {training.precision}; computed in {rt.ds_precision} on {rt.device_kind}")
    if model.position_embedding == "relative":
        notes.append("T5 relative position bias not modelled in attention")
    return Profile(
        device=device_name or device_description(),
        runtime=f"deepspeed {deepspeed.__version__}",
        layers=layers,
        backend=str(tdist.get_backend()),
        notes="; ".join(notes),
        optimizer=timing,
    )


# ==================================================================================================
# Collectives
# ==================================================================================================


def profile_collectives(
    sizes_mb: list[float] | None, warmup: int, repeats: int, precision: str = "bf16", report: list[str] | None = None
) -> list[CollectiveBandwidth]:
    """uniap.profile.collectives through deepspeed.comm in the layers' dtype (`sizes_mb` None: its defaults;
    empty when the world has one rank). On one node: the collectives over the world (scope intra_node) and
    P2P rank 0 <-> 1. On several nodes: the world (inter_node), each node's ranks concurrently (intra_node),
    P2P inside node 0 and across nodes."""
    import deepspeed.comm as dist

    if not dist.is_initialized():
        default_single_process_env(LAUNCHER_VARS)
        init_distributed()
    rt = runtime_of(precision)
    return collectives.profile_collectives(dist, rt.harness_device, rt.dtype, sizes_mb, warmup, repeats, report)


# ==================================================================================================
# CLI
# ==================================================================================================


def build_parser(prog: str = "uniap-deepspeed profile") -> argparse.ArgumentParser:
    p = profiler_parser(
        prog,
        "uniap_deepspeed.profile",
        "Measure layer times, an optimizer step and collective bandwidths "
        "through DeepSpeed, and a calibration against a short whole-model training run",
        repeats_use=f"layers keep the median, the optimizer the median of max(repeats, {OPTIMIZER_MIN_STEPS}) "
        f"steps, the calibration of max(repeats, {CALIBRATION_MIN_ITERATIONS}) iterations",
        unfused_attention="the unfused attention (s x s scores)",
        launcher_note="\nor under the deepspeed launcher",
        verbose_note=" and DeepSpeed's info",
    )
    p.add_argument(
        "--decoder-seq-length",
        type=int,
        help="target length of an encoder-decoder model (default: the model's maximum; other models: unused)",
    )
    p.add_argument(
        "--no-layers", action="store_true", help="measure collectives only (default: layers, optimizer and collectives)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher adds it
    return p


def _check_args(args) -> tuple[ModelSpec, TrainingSpec]:
    if args.no_layers and args.no_collectives:
        raise SpecError("--no-layers and --no-collectives together leave nothing to measure")
    return profiled_job(args, decoder_seq_length=args.decoder_seq_length)


class DeepSpeedProfiler:
    """uniap.profile.runner.ProfilerAdapter through DeepSpeed's engine and deepspeed.comm."""

    prog = "uniap-deepspeed profile"
    show_tp = False

    def start(self, args) -> tuple[int, int]:
        try:
            import deepspeed  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise SpecError(
                f"the profiler needs torch and deepspeed ({exc})", "pip install 'uniap[deepspeed]'"
            ) from None
        quiet_deepspeed(args.verbose)
        default_single_process_env(LAUNCHER_VARS)
        rank, world, _backend = init_distributed()
        return rank, world

    def measure(self, args, model: ModelSpec, training: TrainingSpec) -> Profile:
        if not args.no_layers:
            return profile_model(model, training, args.micro_batch_sizes, args.warmup, args.repeats, args.device_name)
        import deepspeed
        import torch.distributed as tdist

        notes = [CPU_NOTE] if accelerator().device_name() == "cpu" else []
        return Profile(
            device=args.device_name or device_description(),
            runtime=f"deepspeed {deepspeed.__version__}",
            backend=str(tdist.get_backend()),
            notes="; ".join(notes + ["collectives only"]),
        )

    collectives = staticmethod(profile_collectives)

    calibrate = staticmethod(training_run.calibrate)

    def finish(self, world: int) -> None:
        import deepspeed.comm as dist

        if world > 1:
            dist.barrier()  # nobody leaves while rank 0 still writes
        dist.destroy_process_group()  # an orderly teardown of the gloo/nccl pairs before the process exits


def main_profile(argv: list[str] | None = None, prog: str = "uniap-deepspeed profile") -> int:
    """`uniap-deepspeed profile ...`: returns the exit code (0 ok, 2 invalid input)."""
    return run_profiler_cli(
        build_parser(prog), argv, prog, _check_args, lambda *a: run_profiler(DeepSpeedProfiler(), *a)
    )


if __name__ == "__main__":
    sys.exit(main_profile(sys.argv[1:], prog="python -m uniap_deepspeed.profile"))
