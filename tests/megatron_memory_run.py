"""Per-rank program (test-only): measure the model-state bytes megatron-core 0.16.1 keeps while training,
on CPU processes joined by gloo, wrapped the way Megatron-LM (core_v0.16.1) trains.

    python -m torch.distributed.run --nproc-per-node D tests/megatron_memory_run.py \
        --precision bf16|fp16|fp32 [--distributed-optimizer] --out-dir DIR

Builds a tiny GPTModel (2 layers, hidden 160, FFN 448, SwiGLU, RMSNorm, RoPE, untied, vocab 1000, local spec;
the norms' 160 elements are not a multiple of 64, so the distributed optimizer's buffers get padded) in the
precision's dtype, wraps it like megatron/training/training.py does (Float16Module for bf16/fp16, then
megatron-core's DistributedDataParallel with grad_reduce_in_fp32 for bf16, as Megatron-LM's arguments.py
sets accumulate_allreduce_grads_in_fp32 for --bf16, and get_megatron_optimizer(OptimizerConfig(adam, ...,
use_distributed_optimizer))), and runs two training steps exactly as Megatron-LM's train_step does:
zero_grad_buffer + optimizer.zero_grad, forward and backward through megatron-core's schedule (whose
finalize_model_grads_func finishes the gradient reduction), optimizer.step().

Writes DIR/rank<R>.json:
- nparam: this rank's model parameters, unpadded;
- param_buffer_numel / grad_buffer_numel: numel of the DDP param-and-grad buffers (padded with the
  distributed optimizer, megatron/core/distributed/param_and_grad_buffer.py; no param buffer without it);
- optimizer_numel: the parameters this rank's torch optimizer steps (N, or this rank's shard of the
  buffer without its padding with the distributed optimizer), and optimizer_group_numel per param group;
- state_bytes / state_breakdown: the bytes of all distinct tensor storages (deduplicated by storage) held by
  the model's parameters (weights, main_grad, grad), the DDP buffers and the optimizer (its torch state and
  every tensor reachable from the Megatron wrapper's attributes), before the first step and after the second
  (steady state: Adam's moments exist from the first step on);
- step_peak_bytes / step_end_bytes: from torch.profiler(profile_memory=True) allocation events during the
  second optimizer.step(): the highest and the final CPU bytes allocated relative to its start;
  inner_step_peak_bytes: the same within torch's AdamW.step alone (its "Optimizer.step#AdamW.step" record).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import megatron_cpu_shim
import torch
import torch.distributed as dist
import torch.nn.functional as F

SEED = 1234
VOCAB, SEQ, MBS = 1000, 32, 2


def _to_cpu(device):
    return torch.device("cpu") if isinstance(device, int) or str(device).startswith("cuda") else device


def install_optimizer_redirections() -> None:
    """Test-only redirections, on top of tests/megatron_cpu_shim.py, that megatron-core's optimizers need on
    a CPU; none changes what is allocated, only where."""
    # 1. Float16OptimizerWithFloat16Params and the DistributedOptimizer sort parameters by
    #    `param.type()` and refuse anything but 'torch.cuda.{Half,BFloat16,Float}Tensor'
    #    (megatron/core/optimizer/optimizer.py, distrib_optimizer.py): CPU tensors report the CUDA name.
    type_ = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        name = type_(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type_name

    # 2. The optimizers, the gradient scaler and the norm/clip helpers create their small flags and scalars
    #    (found_inf, the loss scale, overflow buffers) with `torch.tensor/zeros/...(device="cuda")`:
    #    make them on the CPU.
    def on_cpu(factory):
        def make(*args, device=None, **kwargs):
            return factory(*args, device=_to_cpu(device), **kwargs)

        return make

    for name in ("tensor", "zeros", "empty", "ones", "full"):
        setattr(torch, name, on_cpu(getattr(torch, name)))


class Storages:
    """Distinct tensor storages, each counted once (the first category that reaches it names it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] = self.bytes.get(category, 0) + storage.nbytes()

    def add_reachable(self, category: str, obj, visited: set[int], depth: int = 0) -> None:
        """Every tensor (and its .grad) reachable from obj through containers and the attributes of
        megatron-core / torch.optim objects; modules are not entered (the model is counted on its own)."""
        if isinstance(obj, torch.Tensor):
            self.add(category, obj)
            if obj.is_leaf and obj.grad is not None:
                self.add(category, obj.grad)
            return
        if depth > 12 or id(obj) in visited or isinstance(obj, (torch.nn.Module, str, bytes, int, float)):
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            items = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        elif type(obj).__module__.startswith(("megatron.", "torch.optim")) and hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            self.add_reachable(category, item, visited, depth + 1)


def inner_optimizers(opt) -> list:
    chained = getattr(opt, "chained_optimizers", [opt])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]


def model_states(model, ddp, opt) -> dict[str, int]:
    s = Storages()
    params = list(model.parameters())
    for p in params:
        s.add("weights", p)
    for buf in ddp.buffers + ddp.expert_parallel_buffers:
        s.add("weights", buf.param_data)  # None without the distributed optimizer
        s.add("grad_buffer", buf.grad_data)
    for p in params:
        s.add("grad_buffer", getattr(p, "main_grad", None))
        s.add("model_grad", p.grad)
    for inner in inner_optimizers(opt):
        for group in inner.param_groups:
            for p in group["params"]:
                s.add("main_params", p)
                s.add("main_grads", p.grad)
        for state in inner.state.values():
            for value in state.values():
                s.add("adam_state", value)
    s.add_reachable("optimizer_other", opt, set())
    return s.bytes


def allocation_peaks(prof) -> tuple[int, int, int]:
    """(peak, end) of CPU bytes allocated in the profiled window relative to its start, and the highest
    peak inside one torch optimizer step relative to that step's start."""
    from torch._C._profiler import _EventType

    def allocations(nodes, out):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                out.append((node.start_time_ns, node.extra_fields.alloc_size))
            allocations(node.children, out)
        return out

    def peak_end(events):
        cur = peak = 0
        for _, size in sorted(events):
            cur += size
            peak = max(peak, cur)
        return peak, cur

    def step_records(nodes, out):
        for node in nodes:
            if node.name.startswith("Optimizer.step#"):
                out.append(node)
            else:
                step_records(node.children, out)
        return out

    tree = prof.profiler.kineto_results.experimental_event_tree()
    peak, end = peak_end(allocations(tree, []))
    records = step_records(tree, [])
    assert records, "no Optimizer.step# record in the profile"
    inner = max(peak_end(allocations(r.children, []))[0] for r in records)
    return peak, end, inner


def main() -> int:
    cli = argparse.ArgumentParser()
    cli.add_argument("--precision", choices=("bf16", "fp16", "fp32"), required=True)
    cli.add_argument("--distributed-optimizer", action="store_true")
    cli.add_argument("--out-dir", required=True)
    opts = cli.parse_args()
    bf16, fp16 = opts.precision == "bf16", opts.precision == "fp16"
    distopt = opts.distributed_optimizer

    megatron_cpu_shim.install()
    install_optimizer_redirections()
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    dp = parallel_state.get_data_parallel_world_size()
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    config = TransformerConfig(
        num_layers=2,
        hidden_size=160,
        ffn_hidden_size=448,
        num_attention_heads=4,
        bf16=bf16,
        fp16=fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    torch.manual_seed(SEED)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    nparam = sum(p.numel() for p in model.parameters())

    # Megatron-LM's wrapping (megatron/training/training.py get_model / setup_model_and_optimizer).
    if bf16 or fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bf16, use_distributed_optimizer=distopt, overlap_grad_reduce=False
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    # fp16: a dynamic loss scale as Megatron-LM uses, started low enough that no step is skipped for
    # overflow (a skipped first step would never create Adam's moments).
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            weight_decay=0.01,
            clip_grad=1.0,
            bf16=bf16,
            fp16=fp16,
            params_dtype=dtype,
            use_distributed_optimizer=distopt,
            initial_loss_scale=2.0**12,
        ),
        [ddp],
    )
    # Without Transformer Engine or Apex megatron-core steps with torch.optim.AdamW
    # (megatron/core/optimizer/__init__.py). On a GPU torch then takes the foreach path
    # (_default_to_fused_or_foreach in torch/optim/optimizer.py); on a CPU it would take the per-tensor
    # loop, so ask for foreach explicitly to allocate what it allocates on a GPU.
    for inner in inner_optimizers(opt):
        for group in inner.param_groups:
            group["foreach"] = True
    config.grad_scale_func = opt.scale_loss
    config.finalize_model_grads_func = finalize_model_grads

    gen = torch.Generator().manual_seed(SEED + 1 + parallel_state.get_data_parallel_rank())
    data = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]

    def forward_step(_data_iterator, model_):
        output = model_(tokens, position_ids, causal, labels=labels)
        return output, lambda out: (out.float().mean(), {"lm loss": out.detach().float().mean()})

    def train_step(profiled: bool):
        # megatron/training/training.py train_step: zero the grad buffers, forward/backward, step.
        ddp.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=None,
            model=[ddp],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=MBS,
            forward_only=False,
        )
        if not profiled:
            return opt.step()[0], None
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ok = opt.step()[0]
        return ok, allocation_peaks(prof)

    ddp.train()
    before = model_states(model, ddp, opt)
    ok1, _ = train_step(profiled=False)
    ok2, (step_peak, step_end, inner_peak) = train_step(profiled=True)
    after = model_states(model, ddp, opt)

    inners = inner_optimizers(opt)
    group_numel = [sum(p.numel() for p in g["params"]) for inner in inners for g in inner.param_groups]
    rank = dist.get_rank()
    result = {
        "rank": rank,
        "dp": dp,
        "precision": opts.precision,
        "distributed_optimizer": distopt,
        "inner_optimizer": sorted({f"{type(i).__module__}.{type(i).__name__}" for i in inners}),
        "foreach": all(g.get("foreach") for i in inners for g in i.param_groups),
        "steps_successful": [bool(ok1), bool(ok2)],
        "nparam": nparam,
        "param_buffer_numel": sum(b.param_data.numel() for b in ddp.buffers if b.param_data is not None),
        "grad_buffer_numel": sum(b.grad_data.numel() for b in ddp.buffers),
        "optimizer_numel": sum(group_numel),
        "optimizer_group_numel": group_numel,
        "state_bytes_before_first_step": sum(before.values()),
        "state_breakdown_before_first_step": before,
        "state_bytes": sum(after.values()),
        "state_breakdown": after,
        "step_peak_bytes": step_peak,
        "step_end_bytes": step_end,
        "inner_step_peak_bytes": inner_peak,
    }
    Path(opts.out_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
