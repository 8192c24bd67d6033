"""Whole-model calibration for `uniap-megatron profile`: train a GPTModel of the real dimensions with a few
layers the way Megatron-LM trains it, and fit the profile's Calibration to what the iterations took.

- The model: megatron-core's GPTModel with `layers` transformer layers of the profiled model's dimensions,
  the layer spec and core attention of uniap_megatron.modules.choose_kernels (what the profile timed),
  the vocabulary padded as Megatron-LM pads it, embeddings tied as the ModelSpec says.
- The wrappers, as Megatron-LM's get_model and setup_model_and_optimizer apply them
  (megatron/training/training.py): Float16Module for bf16/fp16 on a GPU (fp32 on the CPU), megatron-core
  DistributedDataParallel with an fp32 gradient buffer and the distributed optimizer's layout, and the
  optimizer from get_megatron_optimizer(OptimizerConfig(optimizer='adam', use_distributed_optimizer=True)).
- The iteration, as Megatron-LM's train_step runs it: zero the gradient buffer and the optimizer; for each
  micro-batch forward (the loss averaged over its tokens and divided by the micro-batch count), loss
  scaling and backward, all but the last micro-batch under the DDP's no_sync(); finalize_model_grads; the
  optimizer step. The loop is written out here rather than taken from get_forward_backward_func: the
  schedules allocate on "cuda" (megatron-core 0.16.1 megatron/core/pipeline_parallel/schedules.py), and
  this one is the no-pipelining schedule's (forward_backward_no_pipelining) step for step.
- The measurement: seconds per iteration (CUDA-synchronised; the median of the timed iterations after
  warm-up) and on a GPU the peak reserved and allocated bytes over the timed iterations.
- The plan: uniap.planner.configure of that exact job (the model cut to `layers` layers, one GPU of the
  detected kind, tp 1, pp 1, ZeRO 0 (the distributed optimizer at DP 1 shards nothing), no recompute),
  priced with the profile just measured; uniap.calibrate.fit turns the measurement into the
  Calibration.

It runs with one process only (world size 1): with several ranks the calibration is skipped with a note,
since megatron-core's process groups would make it a data-parallel run over every rank. Decoder (GPT)
models only.

On the CPU (tests), megatron-core 0.16.1's DDP and optimizers stop at a few CUDA-only calls;
`cuda_calls_on_cpu` redirects exactly those, around their construction and the optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from dataclasses import replace

from uniap.cluster.spec import ClusterSpec
from uniap.cluster.spec import device_cluster as detected_cluster
from uniap.errors import ProfileError, SpecError, UniapError
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan
from uniap.planner import configure
from uniap.calibrate import TrainingRun, fit, report_lines
from uniap.profile.schema import Profile

from .environment import fused_kernels_available
from .modules import DEFAULT_LR, build_gpt_model, choose_kernels, megatron_optimizer, optimizer_name, wrap_for_training
from .runtime import (
    cuda_calls_on_cpu,
    current_device,
    current_device_on_cpu,
    device_description,
    free_cached_memory,
    mcore_version,
    on_cuda,
    seed_all,
    synchronize,
)

log = logging.getLogger("uniap.megatron.training_run")


# ==================================================================================================
# The cluster and the model
# ==================================================================================================


def device_cluster() -> ClusterSpec:
    """One GPU of the device this process drives (uniap.cluster.spec.device_cluster); on the CPU the processor
    and the host's memory."""
    import torch

    if on_cuda():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return detected_cluster(device_description(), total)


def reduced_model(model: ModelSpec, layers: int) -> ModelSpec:
    """`model` with `layers` transformer layers; SpecError for what the calibration run cannot build."""
    if layers < 1:
        raise SpecError(f"a calibration model needs at least one transformer layer (got {layers})")
    if model.architecture != "decoder":
        raise SpecError(f"the calibration run trains a GPTModel: decoder models only (this is {model.architecture})")
    if model.position_embedding not in ("learned", "rope"):
        raise SpecError(f"GPTModel has no '{model.position_embedding}' position embedding")
    return replace(model, name=f"{model.name}-{layers}l", num_layers=layers)


# ==================================================================================================
# The run
# ==================================================================================================


def _train(ddp, optimizer, batches: list, positions, warm: int, iterations: int):
    """`warm` + `iterations` iterations as Megatron-LM's train_step runs them with the no-pipelining schedule
    (megatron/training/training.py train_step; megatron-core 0.16.1 pipeline_parallel/schedules.py
    forward_backward_no_pipelining): zero the gradient buffer and the optimizer; per micro-batch the loss
    averaged over its tokens and divided by the micro-batch count, scaled by the optimizer's loss scale and
    back-propagated, every micro-batch but the last under no_sync(); finalize_model_grads; the optimizer step.
    On a GPU the peak memory statistics restart after the warm-up. (losses, seconds, skipped steps)."""
    import torch
    from megatron.core.distributed import finalize_model_grads

    cuda = on_cuda()
    losses: list[float] = []
    times: list[float] = []
    skipped = 0
    for i in range(warm + iterations):
        synchronize()
        if i == warm and cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        step_losses = []
        for k, (tokens, labels) in enumerate(batches):
            sync = contextlib.nullcontext() if k == len(batches) - 1 else ddp.no_sync()
            with sync:
                per_token = ddp(tokens, positions, None, labels=labels)
                loss = per_token.float().mean() / len(batches)
                optimizer.scale_loss(loss).backward()
            step_losses.append(loss.detach())
        finalize_model_grads([ddp])
        with cuda_calls_on_cpu():
            updated, _grad_norm, _zeros = optimizer.step()
        synchronize()
        seconds = time.perf_counter() - t0
        losses.append(float(torch.stack(step_losses).sum()))
        if i >= warm:
            times.append(seconds)
            skipped += 0 if updated else 1
    return losses, times, skipped


def training_plan(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    micro_batch_size: int,
    micro_batches: int,
    cluster: ClusterSpec,
    recompute: str = "none",
) -> Plan:
    """The plan run_training prices its run with: one GPU, TP 1, PP 1, no ZeRO, `micro_batches` micro-batches of
    `micro_batch_size`, the fused kernels this process has."""
    reduced_model(model, model.num_layers)  # the architecture checks
    job = replace(training, global_batch_size=micro_batch_size * micro_batches, fused_kernels=fused_kernels_available())
    return configure(
        model,
        cluster,
        job,
        target="megatron",
        tp=1,
        pp=1,
        micro_batch_size=micro_batch_size,
        zero=0,
        recompute=recompute,
        profile=profile,
    )[0]


def run_training(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    micro_batch_size: int,
    micro_batches: int,
    warmup: int,
    iterations: int,
    lr: float = DEFAULT_LR,
    cluster: ClusterSpec | None = None,
    recompute: str = "none",
) -> TrainingRun:
    """Train `model` as it is (cut it first with reduced_model) on fixed, seeded micro-batches for
    max(warmup, 1) + `iterations` iterations of `micro_batches` micro-batches of `micro_batch_size`, every
    transformer layer with `recompute` (none or full), and price its plan with `profile`. Needs
    torch.distributed with world size 1 and no model-parallel state; torch.OutOfMemoryError propagates."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    if micro_batch_size < 1 or micro_batches < 1 or iterations < 1 or warmup < 0:
        raise SpecError("micro-batch size, micro-batches and iterations must be >= 1, warm-up >= 0")
    if dist.get_world_size() != 1:
        raise SpecError(f"the calibration run needs one process (world size {dist.get_world_size()})")
    plan = training_plan(
        model, training, profile, micro_batch_size, micro_batches, cluster or device_cluster(), recompute
    )
    job = plan.training
    cuda = on_cuda()
    free_cached_memory()  # the allocator's peaks below are this run's alone
    before_allocated = float(torch.cuda.memory_allocated()) if cuda else None
    before_reserved = float(torch.cuda.memory_reserved()) if cuda else None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    ddp = optimizer = None
    try:
        seed_all()
        gpt, config = build_gpt_model(model, job, recompute=recompute)
        ddp = wrap_for_training(gpt, config)
        del gpt
        optimizer = megatron_optimizer(ddp, config, lr)
        device, seq, vocab = current_device(), training.seq_length, model.vocab_size
        batches = [
            (
                torch.randint(0, vocab, (micro_batch_size, seq), device=device),
                torch.randint(0, vocab, (micro_batch_size, seq), device=device),
            )
            for _ in range(micro_batches)
        ]
        positions = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch_size, -1)
        ddp.train()
        with current_device_on_cpu():
            losses, times, skipped = _train(ddp, optimizer, batches, positions, max(warmup, 1), iterations)
        reserved = float(torch.cuda.max_memory_reserved()) - before_reserved if cuda else None
        allocated = float(torch.cuda.max_memory_allocated()) - before_allocated if cuda else None
        return TrainingRun(
            plan=plan,
            optimizer=optimizer_name(optimizer),
            losses=tuple(losses),
            iteration_times_s=tuple(times),
            time_per_iteration_s=statistics.median(times),
            peak_reserved_bytes=reserved,
            peak_allocated_bytes=allocated,
            skipped_steps=skipped,
            memory_before_bytes=before_allocated,
        )
    finally:
        del ddp, optimizer
        parallel_state.destroy_model_parallel()
        free_cached_memory()


def calibrate(
    profile: Profile,
    model: ModelSpec,
    training: TrainingSpec,
    layers: int,
    micro_batch_size: int,
    micro_batches: int,
    warmup: int,
    iterations: int,
    report: list[str] | None = None,
) -> tuple[Profile, TrainingRun | None]:
    """`profile` with a Calibration fitted to one whole-model run of `model` cut to `layers` transformer
    layers (run_training), and the run. Skipped with a note with several ranks (every rank must call it;
    none runs). A run that cannot be made (architecture, out of memory, a failure in megatron-core) or fitted
    (a time the compute scale range cannot explain) leaves the profile uncalibrated, with a warning and a
    note: the layer timings already measured are kept."""
    import torch
    import torch.distributed as dist

    report = report if report is not None else []
    run, problem = None, None
    world = dist.get_world_size()
    if world > 1:
        problem = (
            f"not calibrated: the calibration run needs one process (world size {world}); run the "
            f"profiler single-process for it"
        )
    else:
        try:
            small = reduced_model(model, layers)
            run = run_training(small, training, profile, micro_batch_size, micro_batches, warmup, iterations)
        except UniapError as exc:  # an architecture GPTModel cannot build, a plan that does not fit
            problem = f"not calibrated: {exc.message}"
        except torch.OutOfMemoryError:
            problem = f"not calibrated: the {layers}-layer model ran out of memory"
        except Exception as exc:
            log.warning("the calibration run failed", exc_info=True)
            problem = f"not calibrated: the run failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    if run is not None:
        kernels = choose_kernels(training.flash_attention)
        what = (
            f"megatron-core GPTModel of {layers} layer(s), micro-batch {micro_batch_size} x {micro_batches}, "
            f"{iterations} iterations after {max(warmup, 1)} warmup"
        )
        source = f"uniap-megatron profile: megatron-core {mcore_version()} run of {what}"
        try:
            fitted = fit(
                [run.measurement(f"megatron {small.name} mbs {micro_batch_size}x{micro_batches}")],
                profile,
                source=source,
            ).profile
        except ProfileError as exc:
            problem = f"not calibrated: {exc.message}"
        else:
            report += report_lines(fitted.calibration, what, run.skipped_steps)
            wrappers = "Float16Module + " if on_cuda() and training.precision != "fp32" else ""
            note = (
                f"calibration: whole-model run of {what} ({kernels.spec_label}, attention {kernels.attention}; "
                f"{wrappers}DistributedDataParallel with fp32 gradient buffer + {run.optimizer})"
            )
            profile = replace(fitted, notes="; ".join(n for n in (profile.notes, note) if n))
    if problem is not None:
        if dist.get_rank() == 0:
            log.warning("%s", problem)
        profile = replace(profile, notes="; ".join(n for n in (profile.notes, problem) if n))
    return profile, run
