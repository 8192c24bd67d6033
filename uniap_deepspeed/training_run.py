"""Whole-model calibration for `uniap-deepspeed profile`: train a short model of the real dimensions through
DeepSpeed, with the config uniap emits for it, and fit the profile's Calibration to what the iterations took.

- The model: the profiled model cut to `layers` transformer layers (each stack of an encoder-decoder),
  assembled from the profiler's own layer modules: embedding, transformer layers, head with its loss;
  weights tied where the layer graph ties them (uniap.model.graph), so the parameters are the plan's.
- The plan: uniap.planner.configure at tp=1, pp=1, ZeRO 0, no recompute, data parallel over every rank,
  priced with the profile just measured (layer times, optimizer step, collectives).
- The engine: `deepspeed.initialize` with uniap_deepspeed.config.deepspeed_config(plan) plus the
  profiler's AdamW section (the emitted config has none), its precision the one the profiler computes in.
- The measurement: seconds per iteration (gradient_accumulation_steps micro-batches of engine forward,
  engine.backward, engine.step; synchronised; the median of the timed iterations after warm-up, the
  slowest rank's) and on CUDA the peak reserved and allocated bytes over the timed iterations (the
  largest over ranks); uniap.calibrate.fit turns it into the profile's Calibration.

With several ranks every rank trains (one data-parallel replica per rank, nodes as the profiler's node
layout); the cluster is the detected GPU's, shaped nodes x ranks per node. A layout with unequal nodes
is not calibrated (a note says so).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cache, partial
from typing import Any

from uniap.cluster.spec import ClusterSpec
from uniap.cluster.spec import device_cluster as detected_cluster
from uniap.errors import SpecError
from uniap.model.graph import CROSS_TRANSFORMER, EMBEDDING, HEAD, TRANSFORMER, build_graph
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan
from uniap.calibrate import RunDescription, TrainingRun, calibrated, run_plan
from uniap.profile.harness import RunSchedule, memory_in_use, time_iterations
from uniap.profile.runner import CalibrationSettings
from uniap.profile.schema import Profile

from .capability import DEEPSPEED
from .config import deepspeed_config
from .runtime import (
    Runtime,
    accelerator,
    all_ranks_ok,
    device_description,
    free_cached_memory,
    max_over_ranks,
    node_layout,
    optimizer_name,
    optimizer_section,
    runtime_of,
    use_torch_adam,
)

log = logging.getLogger("uniap.deepspeed.training_run")

SEED = 1234


# ==================================================================================================
# The cluster and the model
# ==================================================================================================


def device_cluster(nodes: int = 1, gpus_per_node: int = 1) -> ClusterSpec:
    """`nodes` x `gpus_per_node` of the device this process drives (uniap.cluster.spec.device_cluster); on the
    CPU accelerator the processor and the host's memory."""
    acc = accelerator()
    total = acc.total_memory(acc.current_device()) if acc.device_name() != "cpu" else acc.total_memory()
    return detected_cluster(device_description(), total, nodes, gpus_per_node)


def world_cluster(rt: Runtime) -> ClusterSpec:
    """device_cluster shaped as the ranks are placed (every rank must call it); SpecError for a layout
    whose nodes hold different numbers of ranks."""
    nodes = node_layout(rt.world_size) if rt.world_size > 1 else [[0]]
    sizes = {len(ranks) for ranks in nodes}
    if len(sizes) != 1:
        raise SpecError(f"nodes hold different numbers of ranks ({sorted(len(r) for r in nodes)})")
    return device_cluster(len(nodes), sizes.pop())


def reduced_model(model: ModelSpec, layers: int) -> ModelSpec:
    """`model` with `layers` transformer layers (an encoder-decoder: `layers` in each stack)."""
    if layers < 1:
        raise SpecError(f"a calibration model needs at least one transformer layer (got {layers})")
    return replace(
        model,
        name=f"{model.name}-{layers}l",
        num_layers=layers,
        num_decoder_layers=layers if model.architecture == "encoder_decoder" else 0,
    )


@cache
def _training_model_class():
    """The whole-model module class, defined on first use so that importing this file needs no torch."""
    from torch import nn

    class TrainingModel(nn.Module):
        """embedding -> transformer layers [-> decoder embedding -> cross layers reading the encoder's output]
        -> head, whose forward returns the loss."""

        def __init__(self, embedding, encoder, decoder_embedding, decoder, head):
            super().__init__()
            self.embedding, self.encoder = embedding, nn.ModuleList(encoder)
            self.decoder_embedding, self.decoder = decoder_embedding, nn.ModuleList(decoder)
            self.head = head

        def forward(self, inputs, labels, decoder_inputs=None):
            x = self.embedding(inputs)
            for layer in self.encoder:
                x = layer(x)
            if self.decoder_embedding is not None:
                memory, x = x, self.decoder_embedding(decoder_inputs)
                for layer in self.decoder:
                    x = layer(x, memory)
            return self.head(x, labels)

        def example_batch(self, micro_batch_size: int, device, dtype) -> tuple:
            """(inputs, labels[, decoder_inputs]) of one micro-batch from torch's global generator."""
            inputs = self.embedding.example_inputs(micro_batch_size, device, dtype)[0]
            labels = self.head.example_inputs(micro_batch_size, device, dtype)[1]
            if self.decoder_embedding is None:
                return inputs, labels
            return inputs, labels, self.decoder_embedding.example_inputs(micro_batch_size, device, dtype)[0]

    return TrainingModel


def build_training_module(model: ModelSpec, training: TrainingSpec):
    """The whole of `model` as one torch module (`forward(inputs, labels[, decoder_inputs])` -> loss, and
    `example_batch(b, device, dtype)`), made of the profiler's layer modules in the graph's order. A layer
    the graph marks tied shares the first embedding's word embeddings (the LM head's output projection,
    an encoder-decoder's decoder embedding), as the graph counts its parameters."""
    from .layers import build_layer_module

    graph = build_graph(model, training)
    parts: dict[str, list] = {EMBEDDING: [], TRANSFORMER: [], CROSS_TRANSFORMER: [], HEAD: []}
    for layer in graph.layers:
        module = build_layer_module(model, training, layer)
        if module is None or layer.kind not in parts:
            raise SpecError(f"no module for layer '{layer.name}' (kind {layer.kind}); not calibrated")
        parts[layer.kind].append((layer, module))
    (_, embedding), *rest = parts[EMBEDDING]
    decoder_embedding = rest[0][1] if rest else None
    ((head_layer, head),) = parts[HEAD]
    words = getattr(embedding, "word_embeddings", None)
    if words is not None:
        if rest and rest[0][0].tied_weights:
            decoder_embedding.word_embeddings.weight = words.weight
        if head_layer.tied_weights and hasattr(head, "output_layer"):
            head.output_layer.weight = words.weight
    return _training_model_class()(
        embedding, [m for _, m in parts[TRANSFORMER]], decoder_embedding, [m for _, m in parts[CROSS_TRANSFORMER]], head
    )


def training_config(plan: Plan, rt: Runtime, torch_adam: bool) -> dict[str, Any]:
    """The config uniap emits for `plan` with the profiler's AdamW section added and the precision section
    the one this runtime computes in (fp32 on the CPU accelerator)."""
    config = deepspeed_config(plan)
    for key in ("bf16", "fp16"):
        if key != rt.ds_precision:
            config.pop(key, None)
    if rt.ds_precision == "bf16" and "bf16" not in config:
        config["bf16"] = {"enabled": True}
    elif rt.ds_precision == "fp16" and "fp16" not in config:  # a GPU without bf16: fp16 as config.py emits it
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    config["optimizer"] = optimizer_section(torch_adam)
    return config


# ==================================================================================================
# The run
# ==================================================================================================


def _iteration(engine, batches: list):
    """One iteration as DeepSpeed trains, for uniap.profile.harness.time_iterations: forward, backward and
    step per micro-batch (the engine steps at the accumulation boundary). (mean loss, whether the fp16 loss
    scaler let the step through)."""
    import torch

    def iteration() -> tuple[float, bool]:
        skipped = engine.skipped_steps
        losses = []
        for batch in batches:
            loss = engine(*batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        return float(torch.stack(losses).float().mean()), engine.skipped_steps == skipped

    return iteration


def run_training(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    schedule: RunSchedule,
    cluster: ClusterSpec | None = None,
) -> TrainingRun:
    """Train `model` as it is (reduce it first with reduced_model) on fixed, seeded micro-batches as
    `schedule` says, through DeepSpeed with the config uniap emits for tp=1, pp=1, ZeRO 0 and its
    micro-batches per rank. Every rank must call it; `cluster` defaults to world_cluster.
    torch.OutOfMemoryError propagates."""
    import deepspeed
    import torch

    micro_batch_size, micro_batches = schedule.micro_batch_size, schedule.micro_batches
    rt = runtime_of(training.precision)
    cluster = cluster or world_cluster(rt)
    free_cached_memory()  # the peaks below count this run's memory alone
    before = memory_in_use(rt.harness_device)
    plan = run_plan(model, training, profile, cluster, DEEPSPEED.name, schedule, replicas=rt.world_size)
    job = plan.training
    config = training_config(plan, rt, use_torch_adam(rt))
    torch.manual_seed(SEED)  # the same weights and batches on every rank
    with torch.device(rt.device):
        module = build_training_module(model, job)
    batches = [module.example_batch(micro_batch_size, rt.device, rt.dtype) for _ in range(micro_batches)]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    try:
        assert engine.gradient_accumulation_steps() == micro_batches, config
        assert engine.train_micro_batch_size_per_gpu() == micro_batch_size, config
        measured = time_iterations(_iteration(engine, batches), schedule, rt.harness_device, before)
        slowest = partial(max_over_ranks, rt=rt)
        return TrainingRun.measured(plan, optimizer_name(engine), measured, config, slowest)
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, module, batches
        free_cached_memory()


def calibrate(
    profile: Profile, model: ModelSpec, training: TrainingSpec, settings: CalibrationSettings, report: list[str]
) -> Profile:
    """`profile` with a Calibration fitted to one whole-model run of `model` cut to `settings.layers`
    transformer layers (see run_training), its lines added to `report`. Every rank trains; rank 0 fits (the others get
    `profile` back). A run that cannot be made (unequal nodes, out of memory on any rank) or fitted (a time
    the compute scale range cannot explain) leaves the profile uncalibrated, with a warning and a note
    (uniap.calibrate.calibrated)."""
    import deepspeed
    import torch

    rt = runtime_of(training.precision)
    layers = settings.layers
    small = reduced_model(model, layers)
    run, problem = None, None
    try:
        cluster = world_cluster(rt)
    except SpecError as exc:
        problem = f"not calibrated: {exc.message}"
    if problem is None:
        try:
            run = run_training(small, training, profile, settings.schedule, cluster)
        except torch.OutOfMemoryError:
            problem = f"not calibrated: the {layers}-layer model ran out of memory"
        except SpecError as exc:  # the same on every rank: the configuration is the same
            problem = f"not calibrated: {exc.message}"
        if not all_ranks_ok(run is not None, rt):
            free_cached_memory()
            run, problem = None, problem or f"not calibrated: the {layers}-layer model failed on another rank"
    what = f"{small.name}, {settings.schedule}, {rt.world_size} rank(s)"
    described = RunDescription(
        label=f"deepspeed {small.name} mbs {settings.schedule.micro_batch_size}x{settings.schedule.micro_batches}",
        what=what,
        source=f"uniap-deepspeed profile: DeepSpeed {deepspeed.__version__} run of {what}",
        note=f"calibration: whole-model run of {what} ({{optimizer}}), config as uniap emits it",
    )
    return calibrated(profile, run, problem, described, report, rank_zero=rt.rank == 0)
