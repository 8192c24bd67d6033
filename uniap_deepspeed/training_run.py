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

import gc
import logging
import statistics
import time
from dataclasses import replace
from functools import cache
from typing import Any

from uniap.cluster.spec import ClusterSpec
from uniap.cluster.spec import device_cluster as detected_cluster
from uniap.errors import ProfileError, SpecError
from uniap.model.graph import CROSS_TRANSFORMER, EMBEDDING, HEAD, TRANSFORMER, build_graph
from uniap.model.spec import ModelSpec, TrainingSpec
from uniap.plan import Plan
from uniap.planner import configure
from uniap.calibrate import Measurement, TrainingRun, fit, report_lines
from uniap.profile.schema import Profile

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


def training_plan(
    model: ModelSpec,
    training: TrainingSpec,
    profile: Profile | None,
    micro_batch_size: int,
    micro_batches: int,
    cluster: ClusterSpec,
    world_size: int = 1,
) -> Plan:
    """The plan run_training prices its run with: TP 1, PP 1, ZeRO 0, one data-parallel replica per rank, each
    training `micro_batches` micro-batches of `micro_batch_size`."""
    job = replace(training, global_batch_size=micro_batch_size * micro_batches * world_size)
    return configure(
        model,
        cluster,
        job,
        target="deepspeed",
        tp=1,
        pp=1,
        micro_batch_size=micro_batch_size,
        zero=0,
        recompute="none",
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
    cluster: ClusterSpec | None = None,
) -> TrainingRun:
    """Train `model` as it is (reduce it first with reduced_model) on fixed, seeded micro-batches for
    max(warmup, 1) + `iterations` iterations through DeepSpeed with the config uniap emits for tp=1, pp=1,
    ZeRO 0 and `micro_batches` micro-batches of `micro_batch_size` per rank. Every rank must call it;
    `cluster` defaults to world_cluster. torch.OutOfMemoryError propagates."""
    import deepspeed
    import torch

    if micro_batch_size < 1 or micro_batches < 1 or iterations < 1 or warmup < 0:
        raise SpecError("micro-batch size, micro-batches and iterations must be >= 1, warm-up >= 0")
    rt = runtime_of(training.precision)
    acc = accelerator()
    cluster = cluster or world_cluster(rt)
    cuda = rt.device_kind == "cuda"
    free_cached_memory()  # the peaks below count this run's memory alone
    before_allocated = float(acc.memory_allocated()) if cuda else None
    before_reserved = float(acc.memory_reserved()) if cuda else None
    plan = training_plan(model, training, profile, micro_batch_size, micro_batches, cluster, rt.world_size)
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
        warm = max(warmup, 1)
        losses: list[float] = []
        times: list[float] = []
        skipped_before = 0
        for i in range(warm + iterations):
            acc.synchronize()
            if i == warm:
                skipped_before = engine.skipped_steps
                if cuda:
                    acc.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step_losses = []
            for batch in batches:
                loss = engine(*batch)
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.detach())
            acc.synchronize()
            seconds = time.perf_counter() - t0
            losses.append(float(torch.stack(step_losses).float().mean()))
            if i >= warm:
                times.append(seconds)
        reserved = allocated = None
        if cuda:
            reserved = max_over_ranks(float(acc.max_memory_reserved()) - before_reserved, rt)
            allocated = max_over_ranks(float(acc.max_memory_allocated()) - before_allocated, rt)
        return TrainingRun(
            plan=plan,
            config=config,
            optimizer=optimizer_name(engine),
            losses=tuple(losses),
            iteration_times_s=tuple(times),
            time_per_iteration_s=max_over_ranks(statistics.median(times), rt),
            peak_reserved_bytes=reserved,
            peak_allocated_bytes=allocated,
            skipped_steps=engine.skipped_steps - skipped_before,
            memory_before_bytes=before_allocated,
        )
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine, module, batches
        gc.collect()
        acc.empty_cache()


def _fit(measurement: Measurement, profile: Profile, source: str) -> tuple[Profile, str | None]:
    """The fitted profile; where only the memory ratio falls outside the Calibration's range, the time alone
    and why memory is not fitted. ProfileError when the time cannot be fitted."""
    try:
        return fit([measurement], profile, source=source).profile, None
    except ProfileError as exc:
        if measurement.peak_reserved_bytes is None and measurement.peak_allocated_bytes is None:
            raise
        timed = replace(measurement, peak_reserved_bytes=None, peak_allocated_bytes=None)
        return fit([timed], profile, source=source).profile, f"memory not fitted ({exc.message})"


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
    layers (see run_training), and the run. Every rank trains; rank 0 fits (the others get `profile`
    back). A run that cannot be made (unequal nodes, out of memory on any rank) or fitted (a time the
    compute scale range cannot explain) leaves the profile uncalibrated, with a warning and a note."""
    import deepspeed
    import torch

    rt = runtime_of(training.precision)
    small = reduced_model(model, layers)
    report = report if report is not None else []
    run, problem = None, None
    try:
        cluster = world_cluster(rt)
    except SpecError as exc:
        problem = f"not calibrated: {exc.message}"
    if problem is None:
        try:
            run = run_training(small, training, profile, micro_batch_size, micro_batches, warmup, iterations, cluster)
        except torch.OutOfMemoryError:
            problem = f"not calibrated: the {layers}-layer model ran out of memory"
        except SpecError as exc:  # the same on every rank: the configuration is the same
            problem = f"not calibrated: {exc.message}"
        if not all_ranks_ok(run is not None, rt):
            gc.collect()
            accelerator().empty_cache()
            run, problem = None, problem or f"not calibrated: the {layers}-layer model failed on another rank"
    if run is not None and rt.rank == 0:
        what = (
            f"{small.name}, micro-batch {micro_batch_size} x {micro_batches}, {rt.world_size} rank(s), "
            f"{iterations} iterations after {max(warmup, 1)} warmup"
        )
        source = f"uniap-deepspeed profile: DeepSpeed {deepspeed.__version__} run of {what}"
        measurement = run.measurement(f"deepspeed {small.name} mbs {micro_batch_size}x{micro_batches}")
        try:
            fitted, memory_problem = _fit(measurement, profile, source)
        except ProfileError as exc:
            problem = f"not calibrated: {exc.message}"
        else:
            report += report_lines(fitted.calibration, what, run.skipped_steps)
            note = f"calibration: whole-model run of {what} ({run.optimizer}), config as uniap emits it"
            notes = [profile.notes, note]
            if memory_problem:
                report.append(f"calibration: {memory_problem}")
                notes.append(f"calibration {memory_problem}")
            profile = replace(fitted, notes="; ".join(n for n in notes if n))
    if problem is not None:
        if rt.rank == 0:
            log.warning("%s", problem)
        profile = replace(profile, notes="; ".join(n for n in (profile.notes, problem) if n))
    return profile, run
