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
from dataclasses import replace

from uniap.cluster.spec import ClusterSpec
from uniap.cluster.spec import device_cluster as detected_cluster
from uniap.errors import SpecError, UniapError
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan
from uniap.calibrate import RunDescription, TrainingRun, calibrated, run_plan
from uniap.profile.harness import RunSchedule, memory_in_use, time_iterations
from uniap.profile.runner import CalibrationSettings
from uniap.profile.schema import Profile

from .environment import fused_kernels_available
from .capability import MEGATRON
from .modules import DEFAULT_LR, build_gpt_model, choose_kernels, megatron_optimizer, optimizer_name, wrap_for_training
from .runtime import (
    harness_device,
    cuda_calls_on_cpu,
    current_device_on_cpu,
    device_description,
    free_cached_memory,
    mcore_version,
    on_cuda,
    seed_all,
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


def _iteration(ddp, optimizer, batches: list, positions):
    """One iteration as Megatron-LM's train_step runs it with the no-pipelining schedule
    (megatron/training/training.py train_step; megatron-core 0.16.1 pipeline_parallel/schedules.py
    forward_backward_no_pipelining), for uniap.profile.harness.time_iterations: zero the gradient buffer and the
    optimizer; per micro-batch the loss averaged over its tokens and divided by the micro-batch count, scaled
    by the optimizer's loss scale and back-propagated, every micro-batch but the last under no_sync();
    finalize_model_grads; the optimizer step. (loss, whether the step updated the weights)."""
    import torch
    from megatron.core.distributed import finalize_model_grads

    def iteration() -> tuple[float, bool]:
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
        return float(torch.stack(step_losses).sum()), bool(updated)

    return iteration


def training_plan(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    schedule: RunSchedule,
    cluster: ClusterSpec,
    recompute: str = "none",
) -> Plan:
    """The plan run_training prices its run with (uniap.calibrate.run_plan on one GPU), with the fused kernels
    this process has; SpecError for a model the run cannot build."""
    reduced_model(model, model.num_layers)  # the architecture checks
    job = replace(training, fused_kernels=fused_kernels_available())
    return run_plan(model, job, profile, cluster, MEGATRON.name, schedule, recompute=recompute)


def run_training(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    schedule: RunSchedule,
    lr: float = DEFAULT_LR,
    cluster: ClusterSpec | None = None,
    recompute: str = "none",
) -> TrainingRun:
    """Train `model` as it is (cut it first with reduced_model) on fixed, seeded micro-batches as `schedule`
    says, every transformer layer with `recompute` (none or full), and price its plan with `profile`. Needs
    torch.distributed with world size 1 and no model-parallel state; torch.OutOfMemoryError propagates."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    micro_batch_size, micro_batches = schedule.micro_batch_size, schedule.micro_batches
    if dist.get_world_size() != 1:
        raise SpecError(f"the calibration run needs one process (world size {dist.get_world_size()})")
    plan = training_plan(model, training, profile, schedule, cluster or device_cluster(), recompute)
    job = plan.training
    device = harness_device()
    free_cached_memory()  # the allocator's peaks below are this run's alone
    before = memory_in_use(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    ddp = optimizer = None
    try:
        seed_all()
        gpt, config = build_gpt_model(model, job, recompute=recompute)
        ddp = wrap_for_training(gpt, config)
        del gpt
        optimizer = megatron_optimizer(ddp, config, lr)
        seq, vocab = training.seq_length, model.vocab_size
        batches = [
            (
                torch.randint(0, vocab, (micro_batch_size, seq), device=device.name),
                torch.randint(0, vocab, (micro_batch_size, seq), device=device.name),
            )
            for _ in range(micro_batches)
        ]
        positions = torch.arange(seq, device=device.name).unsqueeze(0).expand(micro_batch_size, -1)
        ddp.train()
        with current_device_on_cpu():
            iteration = _iteration(ddp, optimizer, batches, positions)
            measured = time_iterations(iteration, schedule, device, before)
        return TrainingRun.measured(plan, optimizer_name(optimizer), measured)
    finally:
        del ddp, optimizer
        parallel_state.destroy_model_parallel()
        free_cached_memory()


def calibrate(
    profile: Profile, model: ModelSpec, training: TrainingSpec, settings: CalibrationSettings, report: list[str]
) -> Profile:
    """`profile` with a Calibration fitted to one whole-model run of `model` cut to `settings.layers`
    transformer layers (run_training), its lines added to `report`. Skipped with a note with several ranks
    (every rank must call it; none runs). A run that cannot be made (architecture, out of memory, a failure in
    megatron-core) or fitted (a time the compute scale range cannot explain) leaves the profile uncalibrated,
    with a warning and a note: the layer timings already measured are kept (uniap.calibrate.calibrated)."""
    import torch
    import torch.distributed as dist

    layers = settings.layers
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
            run = run_training(small, training, profile, settings.schedule)
        except UniapError as exc:  # an architecture GPTModel cannot build, a plan that does not fit
            problem = f"not calibrated: {exc.message}"
        except torch.OutOfMemoryError:
            problem = f"not calibrated: the {layers}-layer model ran out of memory"
        except Exception as exc:
            log.warning("the calibration run failed", exc_info=True)
            problem = f"not calibrated: the run failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    kernels = choose_kernels(training.flash_attention)
    what = f"megatron-core GPTModel of {layers} layer(s), {settings.schedule}"
    shape = f"{settings.schedule.micro_batch_size}x{settings.schedule.micro_batches}"
    wrappers = "Float16Module + " if on_cuda() and training.precision != "fp32" else ""
    described = RunDescription(
        label=f"megatron {model.name}-{layers}l mbs {shape}",
        what=what,
        source=f"uniap-megatron profile: megatron-core {mcore_version()} run of {what}",
        note=(
            f"calibration: whole-model run of {what} ({kernels.spec_label}, attention {kernels.attention}; "
            f"{wrappers}DistributedDataParallel with fp32 gradient buffer + {{optimizer}})"
        ),
    )
    return calibrated(profile, run, problem, described, report, rank_zero=dist.get_rank() == 0)
