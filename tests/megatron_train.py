"""Per-rank program (test-only): one real megatron-core training iteration on CPU with gloo, configured
by the Megatron-LM arguments uniap emitted for a plan.

    python -m torch.distributed.run --nproc-per-node N tests/megatron_train.py \
        --args-json ARGS.json --out-dir DIR

ARGS.json holds {"argv": [...]}: `megatron_launch(plan).args + model_args(model, training)`, and optionally
"reinit_by_name": true (TP = 1 only: after building, every matrix is redrawn from a seed derived from its
global parameter name, so a pipelined run and a single-process run of the same model start from the same
weights and must compute the same loss). This program
parses the flags it needs with its own argparse (Megatron-LM's training package is not installed),
initializes megatron-core's model-parallel groups, builds megatron-core's GPTModel for its pipeline
stage with the split exactly as emitted (`--decoder-first/last-pipeline-num-layers` ->
`num_layers_in_first/last_pipeline_stage`, `--pipeline-model-parallel-layout` ->
`pipeline_model_parallel_layout`), and runs one forward/backward through megatron-core's own schedule
(`get_forward_backward_func()`) on a fixed seeded batch, then one SGD step.

Writes DIR/rank<R>.json on every rank (its TP/PP/DP ranks, the number of transformer layers it built
and their global layer numbers, the squared gradient norm of its parameters) and DIR/loss.json on the
first rank of the last stage (the mean LM loss over the micro-batches, and num_microbatches).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import zlib
from pathlib import Path

import megatron_cpu_shim
import torch
import torch.distributed as dist
import torch.nn.functional as F

SEED = 1234


def megatron_flags(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False)
    a = p.add_argument
    a("--tensor-model-parallel-size", type=int, default=1)
    a("--pipeline-model-parallel-size", type=int, default=1)
    a("--micro-batch-size", type=int, required=True)
    a("--global-batch-size", type=int, required=True)
    a("--sequence-parallel", action="store_true")
    a("--decoder-first-pipeline-num-layers", type=int)
    a("--decoder-last-pipeline-num-layers", type=int)
    a("--pipeline-model-parallel-layout")
    a("--recompute-granularity", choices=("full", "selective"))
    a("--recompute-method", choices=("uniform", "block"))
    a("--recompute-num-layers", type=int)
    a("--bf16", action="store_true")
    a("--fp16", action="store_true")
    a("--num-layers", type=int, required=True)
    a("--hidden-size", type=int, required=True)
    a("--num-attention-heads", type=int, required=True)
    a("--group-query-attention", action="store_true")
    a("--num-query-groups", type=int, default=1)
    a("--ffn-hidden-size", type=int)
    a("--kv-channels", type=int)
    a("--seq-length", type=int, required=True)
    a("--max-position-embeddings", type=int, required=True)
    a("--vocab-size", type=int, required=True)
    a("--swiglu", action="store_true")
    a("--untie-embeddings-and-output-weights", action="store_true")
    a("--normalization", default="LayerNorm")
    a("--position-embedding-type", default="learned_absolute")
    a("--disable-bias-linear", action="store_true")
    ns, _unknown = p.parse_known_args(argv)  # DDP / optimizer flags do not change one iteration here
    return ns


def reinit_by_global_name(model, layer_numbers: list[int]) -> None:
    """Redraw every matrix from a seed that depends only on its global name (stage-local layer index ->
    global layer number), so the weights do not depend on how the layers are split into stages."""
    local = re.compile(r"^decoder\.layers\.(\d+)\.")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue  # norm weights keep their initialization (ones)
            name = local.sub(lambda m: f"decoder.layers.{layer_numbers[int(m.group(1))] - 1}.", name)
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.02)


def main() -> int:
    cli = argparse.ArgumentParser()
    cli.add_argument("--args-json", required=True)
    cli.add_argument("--out-dir", required=True)
    opts = cli.parse_args()
    spec = json.loads(Path(opts.args_json).read_text())
    ns = megatron_flags(spec["argv"])
    out = Path(opts.out_dir)

    megatron_cpu_shim.install()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    tp, pp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    dp = parallel_state.get_data_parallel_world_size()
    assert dp == world // (tp * pp), (dp, world, tp, pp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    first, last = pp_rank == 0, pp_rank == pp - 1
    # Megatron's micro-batch count (num_microbatches_calculator): GBS / (MBS * DP), exactly divisible.
    assert ns.global_batch_size % (ns.micro_batch_size * dp) == 0
    num_microbatches = ns.global_batch_size // (ns.micro_batch_size * dp)

    dtype = torch.bfloat16 if ns.bf16 else torch.float16 if ns.fp16 else torch.float32
    config = TransformerConfig(
        num_layers=ns.num_layers,
        hidden_size=ns.hidden_size,
        num_attention_heads=ns.num_attention_heads,
        num_query_groups=ns.num_query_groups if ns.group_query_attention else None,
        ffn_hidden_size=ns.ffn_hidden_size,
        kv_channels=ns.kv_channels,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=ns.sequence_parallel,
        num_layers_in_first_pipeline_stage=ns.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=ns.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=ns.pipeline_model_parallel_layout,
        recompute_granularity=ns.recompute_granularity,
        recompute_method=ns.recompute_method,
        recompute_num_layers=ns.recompute_num_layers,
        bf16=ns.bf16,
        fp16=ns.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gated_linear_unit=ns.swiglu,
        activation_func=F.silu if ns.swiglu else F.gelu,
        normalization=ns.normalization,
        add_bias_linear=not ns.disable_bias_linear,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deterministic_mode=True,
    )

    torch.manual_seed(SEED)  # same on every rank: the CPU-initialized master weights agree across TP
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=ns.normalization),
        vocab_size=ns.vocab_size,
        max_sequence_length=ns.max_position_embeddings,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
        position_embedding_type="rope" if ns.position_embedding_type == "rope" else "learned_absolute",
    )
    layer_numbers = [layer.layer_number for layer in model.decoder.layers]
    if spec.get("reinit_by_name"):
        assert tp == 1, "reinit_by_name draws whole (unsharded) matrices"
        reinit_by_global_name(model, layer_numbers)

    # A fixed batch: this data-parallel rank's GBS/DP samples, the same on every TP and PP rank.
    seq, mbs = ns.seq_length, ns.micro_batch_size
    gen = torch.Generator().manual_seed(SEED + 1)
    data = torch.randint(0, ns.vocab_size, (ns.global_batch_size, seq + 1), generator=gen)
    data = data.view(dp, num_microbatches, mbs, seq + 1)[dp_rank]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    position_ids = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
    batches = iter([{"tokens": mb[:, :-1].contiguous(), "labels": mb[:, 1:].contiguous()} for mb in data])

    def forward_step(data_iterator, model_):
        batch = next(data_iterator)
        output = model_(batch["tokens"], position_ids, causal, labels=batch["labels"])

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    model.train()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=False,
    )
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_sq = float(sum((g.float() ** 2).sum() for g in grads)) if grads else 0.0
    with torch.no_grad():  # one plain SGD step (one iteration: forward, backward, update)
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-3)

    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "tp_rank": tp_rank,
                "pp_rank": pp_rank,
                "dp_rank": dp_rank,
                "dp": dp,
                "num_layers_built": len(model.decoder.layers),
                "layer_numbers": layer_numbers,
                "num_microbatches": num_microbatches,
                "grad_sq": grad_sq,
                "sequence_parallel": config.sequence_parallel,
                "pre_process": first,
                "post_process": last,
            }
        )
    )
    if last and tp_rank == 0 and dp_rank == 0:
        values = [float(d["lm loss"]) for d in losses]
        assert len(values) == num_microbatches, (len(values), num_microbatches)
        mean = sum(values) / len(values)
        (out / "loss.json").write_text(
            json.dumps(
                {
                    "loss": mean,
                    "per_microbatch": values,
                    "num_microbatches": num_microbatches,
                    "finite": math.isfinite(mean),
                }
            )
        )
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
