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
import contextlib
import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, TypeVar

from uniap.errors import EXIT_OK, ProfileError, SpecError
from uniap.model.graph import CROSS_TRANSFORMER, EMBEDDING, HEAD, TRANSFORMER, TRANSFORMER_KINDS, Layer, build_graph
from uniap.model.loaders import load_model
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.planner import training_spec
from uniap.profile import collectives, harness
from uniap.profile.harness import ACTIVATION_NOTE, CPU_NOTE, Device
from uniap.profile.options import profiler_parser
from uniap.profile.runner import (
    check_common_args,
    default_single_process_env,
    print_summary,
    run_profiler_cli,
)
from uniap.profile.schema import CollectiveBandwidth, LayerTiming, OptimizerTiming, Profile

log = logging.getLogger("uniap.deepspeed.profile")
T = TypeVar("T")

# Set by torchrun / the deepspeed launcher, or by MPI launchers DeepSpeed can discover.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# Timed optimizer steps and calibration iterations at least: both are short, and a median of two is a mean.
OPTIMIZER_MIN_STEPS = 5
CALIBRATION_MIN_ITERATIONS = 3
# The AdamW the optimizer timing and the calibration run step with (a typical pretraining setting).
ADAMW_PARAMS: dict[str, Any] = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


# ==================================================================================================
# Layer modules
# ==================================================================================================


def build_layer_module(model: ModelSpec, training: TrainingSpec, layer: Layer):
    """A torch module computing `layer` of the graph (one instance, dropout 0) with `example_inputs(b,
    device, dtype)`; None for a layer kind this profiler does not know."""
    from . import layers  # imports torch

    flash = training.flash_attention
    s = training.seq_length
    s_dec = training.decoder_seq_length or s
    arch = model.architecture
    if arch == "vit":
        s = model.vit_seq_length
    base = layer.name.split(".")[0]
    if layer.kind == TRANSFORMER:
        return layers.TransformerLayer(model, s, causal=arch == "decoder", flash=flash)
    if layer.kind == CROSS_TRANSFORMER:
        return layers.CrossTransformerLayer(model, s_dec, s, flash=flash)
    if layer.kind == EMBEDDING:
        if base == "patch_embedding":
            return layers.PatchEmbedding(model)
        return layers.Embedding(model, s_dec if base == "decoder_embedding" else s)
    if layer.kind == HEAD:
        if base == "lm_head":
            return layers.LMHead(model, s_dec if arch == "encoder_decoder" else s)
        if base == "mlm_head":
            return layers.MLMHead(model, s)
        if base == "cls_head":
            return layers.ClsHead(model, s)
    return None


# ==================================================================================================
# Runtime helpers
# ==================================================================================================


@dataclass(frozen=True)
class _Runtime:
    device_kind: str  # 'cuda', 'cpu', ...
    device: str  # torch device string of this rank
    dtype: Any  # compute dtype of layers and collectives
    ds_precision: str  # 'bf16', 'fp16' or 'fp32': the DeepSpeed config's precision section
    rank: int
    world_size: int

    @property
    def harness_device(self) -> Device:
        """This rank's device as uniap.profile.harness measures on it."""
        return Device(self.device, self.device_kind, _accelerator().synchronize)


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _quiet_deepspeed(verbose: bool) -> None:
    with contextlib.suppress(ImportError, AttributeError):  # pragma: no cover - logging only
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)


def init_distributed() -> tuple[int, int, str]:
    """deepspeed.init_distributed with the accelerator's backend (gloo on the CPU accelerator unless
    oneCCL is installed); (rank, world size, backend)."""
    import deepspeed
    import deepspeed.comm as dist
    import torch.distributed as tdist

    acc = _accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return dist.get_rank(), dist.get_world_size(), str(tdist.get_backend())


def _runtime(precision: str) -> _Runtime:
    import deepspeed.comm as dist
    import torch

    acc = _accelerator()
    kind = acc.device_name()
    device = acc.current_device_name() if kind != "cpu" else "cpu"
    ds_precision = "fp32"
    if kind != "cpu":
        if precision == "bf16" and acc.is_bf16_supported():
            ds_precision = "bf16"
        elif precision in ("bf16", "fp16") and acc.is_fp16_supported():
            ds_precision = "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ds_precision]
    return _Runtime(kind, device, dtype, ds_precision, dist.get_rank(), dist.get_world_size())


def device_description() -> str:
    """The GPU's name, another accelerator's kind, or 'cpu (<processor>)'."""
    return harness.device_description(_accelerator().device_name())


def _ds_config(rt: _Runtime, micro_batch_size: int) -> dict[str, Any]:
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


def time_layer(module, rt: _Runtime, micro_batch_size: int, warmup: int, repeats: int) -> LayerTiming:
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
        _free_cached_memory()


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


def _free_cached_memory() -> None:
    gc.collect()
    _accelerator().empty_cache()


def _all_ranks_ok(ok: bool, rt: _Runtime) -> bool:
    """uniap.profile.harness.all_ranks_ok through deepspeed.comm."""
    import deepspeed.comm as dist

    return harness.all_ranks_ok(ok, dist, rt.harness_device)


def _max_over_ranks(value: float, rt: _Runtime) -> float:
    """uniap.profile.harness.max_over_ranks through deepspeed.comm."""
    import deepspeed.comm as dist

    return harness.max_over_ranks(value, dist, rt.harness_device)


# ==================================================================================================
# Layers
# ==================================================================================================


def profile_layers(
    model: ModelSpec, training: TrainingSpec, micro_batch_sizes: list[int], warmup: int, repeats: int
) -> dict[str, list[LayerTiming]]:
    """Timings per layer signature (every rank times; rank 0's numbers are returned). A micro-batch
    size that runs out of memory on any rank is skipped with the larger ones for that layer."""
    import torch

    rt = _runtime(training.precision)
    graph = build_graph(model, training)
    first: dict[str, Layer] = {}
    for layer in graph.layers:
        first.setdefault(layer.signature, layer)
    out: dict[str, list[LayerTiming]] = {}
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
            timing, ok = None, True
            try:
                timing = time_layer(module, rt, mbs, warmup, repeats)
            except torch.OutOfMemoryError:
                ok = False
            del module
            if not _all_ranks_ok(ok, rt):
                log.warning("%s: micro-batch size %d ran out of memory; larger ones skipped", signature, mbs)
                _free_cached_memory()
                break
            timings.append(timing)
            if rt.rank == 0:
                log.info(
                    "%-60s mbs %3d  fwd %9.3f ms  bwd %9.3f ms", signature, mbs, timing.forward_ms, timing.backward_ms
                )
        if timings:
            out[signature] = timings
    return out


# ==================================================================================================
# Optimizer step
# ==================================================================================================


@cache
def _fused_adam_problem(device_kind: str) -> str | None:
    """Why DeepSpeed's FusedAdam cannot step here (None when it can). On a GPU, FusedAdam is what an
    `"optimizer": {"type": "AdamW"}` section builds (DeepSpeed 0.19.8 deepspeed/runtime/engine.py
    get_optimizer_configuration); its op is prebuilt or JIT-compiled by FusedAdamBuilder().load(). On the CPU
    accelerator that op is a C++ build of its own (deepspeed/ops/op_builder/cpu/fused_adam.py), so the CPU
    path steps with torch.optim.AdamW (`torch_adam`) instead of paying for a compiler run."""
    if device_kind == "cpu":
        return "the CPU accelerator steps with torch.optim.AdamW (torch_adam)"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 - a missing compiler or CUDA toolkit: whatever the build raises
        first = (str(exc).splitlines() or [""])[0]
        return f"DeepSpeed FusedAdam unavailable ({type(exc).__name__}: {first})"
    return None


def use_torch_adam(rt: _Runtime) -> bool:
    """Whether the AdamW section needs `torch_adam` (FusedAdam does not load on some rank); all ranks agree."""
    problem = _fused_adam_problem(rt.device_kind)
    ok = _all_ranks_ok(problem is None, rt)
    if not ok and rt.device_kind != "cpu" and rt.rank == 0:
        log.warning("%s; stepping with torch.optim.AdamW", problem or "FusedAdam failed on another rank")
    return not ok


def optimizer_section(torch_adam: bool) -> dict[str, Any]:
    """The DeepSpeed config's optimizer section uniap's measurements step with: AdamW with ADAMW_PARAMS,
    DeepSpeed's FusedAdam, or torch.optim.AdamW when `torch_adam` (DeepSpeed 0.19.8
    deepspeed/runtime/engine.py _configure_basic_optimizer)."""
    params = dict(ADAMW_PARAMS)
    if torch_adam:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def optimizer_name(engine) -> str:
    """What engine.step() runs: the basic optimizer and the precision wrapper DeepSpeed put around it."""
    import torch

    basic = getattr(engine, "basic_optimizer", None) or engine.optimizer
    cls = type(basic)
    if cls.__name__ == "FusedAdam" and cls.__module__.startswith("deepspeed"):
        name = "DeepSpeed FusedAdam"
    elif isinstance(basic, torch.optim.Optimizer) and cls.__module__.startswith("torch.optim"):
        foreach = basic.defaults.get("foreach")
        if foreach is None:  # torch's default: foreach when every tensor is on a CUDA device
            foreach = all(p.is_cuda for group in basic.param_groups for p in group["params"])
        name = f"torch.optim.{cls.__name__} ({'foreach' if foreach else 'for-loop'})"
    else:
        name = f"{cls.__module__}.{cls.__name__}"
    if engine.optimizer is not basic:
        name += f" in DeepSpeed {type(engine.optimizer).__name__}"
    return name


def time_optimizer_step(
    module, rt: _Runtime, micro_batch_size: int, warmup: int, repeats: int, torch_adam: bool
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

    rt = _runtime(training.precision)
    graph = build_graph(model, training)
    layer = next((x for x in graph.layers if x.kind in TRANSFORMER_KINDS), None)
    if layer is None:  # pragma: no cover - every architecture has transformer layers
        return None
    torch_adam = use_torch_adam(rt)
    torch.manual_seed(1234)
    with torch.device(rt.device):
        module = build_layer_module(model, training, layer)
    timing, ok = None, True
    try:
        timing = time_optimizer_step(module, rt, micro_batch_size, warmup, repeats, torch_adam)
    except torch.OutOfMemoryError:
        ok = False
    del module
    if not _all_ranks_ok(ok, rt):
        log.warning("the optimizer step over %s ran out of memory; it stays estimated", layer.signature)
        _free_cached_memory()
        return None
    if rt.rank == 0:
        log.info(
            "optimizer %s: %.3f ms per step over %d parameters",
            timing.implementation,
            timing.step_ms,
            timing.num_params,
        )
    return timing


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
    rt = _runtime(training.precision)
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


def _node_layout(world: int) -> list[list[int]]:
    """uniap.profile.collectives.node_layout through deepspeed.comm."""
    import deepspeed.comm as dist

    return collectives.node_layout(dist, world)


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
    rt = _runtime(precision)
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
    check_common_args(args)
    if args.no_layers and args.no_collectives:
        raise SpecError("--no-layers and --no-collectives together leave nothing to measure")
    model = load_model(args.model)
    training = training_spec(
        model,
        max(args.micro_batch_sizes),
        args.seq_length,
        precision=args.precision,
        flash_attention=not args.no_flash_attention,
        decoder_seq_length=args.decoder_seq_length,
    )
    return model, training


def main_profile(argv: list[str] | None = None, prog: str = "uniap-deepspeed profile") -> int:
    """`uniap-deepspeed profile ...`: returns the exit code (0 ok, 2 invalid input)."""
    return run_profiler_cli(build_parser(prog), argv, prog, _check_args, _run)


def _run(args, model: ModelSpec, training: TrainingSpec) -> int:
    try:
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise SpecError(f"the profiler needs torch and deepspeed ({exc})", "pip install 'uniap[deepspeed]'") from None
    _quiet_deepspeed(args.verbose)
    default_single_process_env(LAUNCHER_VARS)
    rank, world, backend = init_distributed()
    import deepspeed.comm as dist

    started = time.perf_counter()
    if args.no_layers:
        import deepspeed as ds

        notes = [CPU_NOTE] if _accelerator().device_name() == "cpu" else []
        profile = Profile(
            device=args.device_name or device_description(),
            runtime=f"deepspeed {ds.__version__}",
            backend=backend,
            notes="; ".join(notes + ["collectives only"]),
        )
    else:
        profile = profile_model(model, training, args.micro_batch_sizes, args.warmup, args.repeats, args.device_name)
    report: list[str] = []
    if not args.no_collectives:
        repeats = max(args.repeats, collectives.COLLECTIVE_MIN_REPEATS)
        profile.collectives = profile_collectives(
            args.collective_sizes_mb, args.warmup, repeats, training.precision, report
        )
    if profile.optimizer is not None and rank == 0:
        o = profile.optimizer
        extra = f", {o.extra_peak_bytes / 2**20:.1f} MiB extra" if o.extra_peak_bytes is not None else ""
        report.append(
            f"optimizer {o.implementation}: {o.step_ms:.3f} ms per step over {o.num_params:,} parameters{extra}"
        )
    if not args.no_layers and args.calibration_layers > 0:  # after the collectives: the plan prices DP with them
        from .training_run import calibrate

        profile, _ = calibrate(
            profile,
            model,
            training,
            args.calibration_layers,
            min(args.micro_batch_sizes),
            args.calibration_micro_batches,
            args.warmup,
            max(args.repeats, CALIBRATION_MIN_ITERATIONS),
            report,
        )
    if rank == 0:
        try:
            profile.save(args.output)
        except OSError as exc:
            raise ProfileError(f"cannot write profile {args.output}: {exc.strerror or exc}") from None
        print_summary(
            "uniap-deepspeed profile", profile, report, args.output, world, time.perf_counter() - started, show_tp=False
        )
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    dist.destroy_process_group()  # an orderly teardown of the gloo/nccl pairs before the process exits
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main_profile(sys.argv[1:], prog="python -m uniap_deepspeed.profile"))
