"""Tiny Megatron-LM command lines the adapter tests share."""

from __future__ import annotations

# A 4-layer GPT of hidden size 64 with 4 heads.
TINY_SHAPE = ("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4")
# The smallest command line job_from_args plans from: shape, sequence and global batch.
SMALLEST_ARGV = (*TINY_SHAPE, "--seq-length", "32", "--global-batch-size", "8")
# A tiny bf16 GPT job with the vocabulary and positions a launch needs.
TINY_JOB_ARGV = [
    *TINY_SHAPE,
    *("--seq-length", "128", "--max-position-embeddings", "128", "--vocab-size", "1000"),
    *("--global-batch-size", "8", "--bf16"),
]
