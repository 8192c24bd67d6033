"""`uniap convert megatron` on launch scripts written as people write them (issue 13 item 1): Megatron-LM's
example style (bash arrays, variables, continuations, a GPT-3 175B multi-node torchrun) and a Llama-2-70B Slurm
batch file (srun, #SBATCH directives, a string variable of model arguments). The current configuration is
priced, the plan written back where each flag is written, the original byte-identical; Megatron-LM's own
validate_args accepts the converted command line."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import megatron_lm
import pytest

from uniap.cli import main as uniap_main
from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK
from uniap_megatron.args import job_from_args
from uniap.conversion import converted_path
from uniap.launch import read_launch
from uniap_megatron.merge import explicit_settings

GPT3_TEMPLATE = """#!/bin/bash
# GPT-3 {name} in the style of Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh
export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=8
NUM_NODES={nodes}
MASTER_ADDR=${{MASTER_ADDR:-localhost}}
CHECKPOINT_PATH="/data/my checkpoints"   # a path with a space
TP={tp}

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --master_addr $MASTER_ADDR
    --master_port 6000
)

GPT_MODEL_ARGS=(
    --num-layers {layers}
    --hidden-size {hidden}
    --num-attention-heads {heads}
    --seq-length 2048
    --max-position-embeddings 2048
    --vocab-size 50257
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size {batch}
    --train-iters 500000
    --lr 6.0e-5 --bf16
)

MODEL_PARALLEL_ARGS=(
\t--tensor-model-parallel-size $TP
\t--pipeline-model-parallel-size {pp}
)

torchrun ${{DISTRIBUTED_ARGS[@]}} pretrain_gpt.py \\
    ${{GPT_MODEL_ARGS[@]}} \\
    ${{TRAINING_ARGS[@]}} \\
    ${{MODEL_PARALLEL_ARGS[@]}} \\
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000 2>&1 | tee log.txt
"""


def gpt3(name, layers, hidden, heads, nodes, tp, pp, batch) -> str:
    return GPT3_TEMPLATE.format(
        name=name, layers=layers, hidden=hidden, heads=heads, nodes=nodes, tp=tp, pp=pp, batch=batch
    )


GPT3_175B = gpt3("175B", 96, 12288, 96, nodes=16, tp=8, pp=16, batch=1536)
GPT3_1B = gpt3("1.3B", 24, 2048, 16, nodes=2, tp=2, pp=2, batch=256)  # quick to plan: the CLI's behaviours
GPT3_13B_ONE_NODE = gpt3("13B", 40, 5120, 40, nodes=1, tp=1, pp=1, batch=512)

LLAMA2_SLURM = """#!/bin/bash
#SBATCH --job-name=llama2-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --time=48:00:00

# Llama-2-70B on Slurm, one task per GPU
MEGATRON=/opt/Megatron-LM
DATA="/lustre/data/llama tokens_text_document"

LLAMA_ARGS="--num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672 --num-attention-heads 64 \\
  --group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 4096 \\
  --swiglu --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights \\
  --disable-bias-linear --vocab-size 32000"

srun --cpu-bind=none python $MEGATRON/pretrain_gpt.py \\
    $LLAMA_ARGS \\
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 8 \\
    --sequence-parallel \\
    --micro-batch-size 1 --global-batch-size 1024 \\
    --recompute-activations \\
    --bf16 --lr 3e-4 --train-iters 250000 \\
    --data-path "$DATA" --tokenizer-type NullTokenizer \\
    --save /lustre/ckpt/llama2-70b --save-interval 1000 --log-interval 10
"""


def convert(capsys, tmp_path, text: str, *options: str, name: str = "train.sh"):
    """(exit code, --json result, stderr, original path) of `uniap convert megatron` on `text`."""
    path = tmp_path / name
    path.write_text(text)
    rc = uniap_main(["convert", "megatron", str(path), "--json", *options])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == EXIT_OK else None), err, path


def converted_argv(path):
    launch = read_launch(converted_path(path).read_text(), str(path))
    return launch, launch.argv


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """The two realistic launches converted once (planning GPT-3 175B on 128 GPUs takes tens of seconds)."""
    folder = tmp_path_factory.mktemp("realistic")
    out = {}
    for name, text, cluster in (("gpt3.sh", GPT3_175B, "dgx-a100-80g"), ("job.sbatch", LLAMA2_SLURM, "dgx-h100")):
        path = folder / name
        path.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "uniap.cli", "convert", "megatron", str(path), "--cluster", cluster, "--json"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == EXIT_OK, done.stderr
        out[name] = (json.loads(done.stdout), path)
    return out


@pytest.mark.slow
def test_gpt3_example_script_is_priced_planned_and_edited_in_place(realistic):
    result, path = realistic["gpt3.sh"]
    before, after = result["before"], result["after"]
    assert (before["tp"], before["pp"], before["dp"], before["micro_batch_size"]) == (8, 16, 1, 1)
    assert before["fits"] and after["fits"] and result["speedup"] >= 1.0
    assert path.read_text() == GPT3_175B  # the original, byte for byte
    launch, argv = converted_argv(path)
    assert explicit_settings(argv) == explicit_settings(result["arguments"])  # the plan's, where the user wrote
    assert sorted(argv) == sorted(result["arguments"])
    pins = job_from_args(argv).pins
    assert (pins.tp or 1, pins.pipeline_degree or 1, pins.micro_batch_per_replica) == (
        after["tp"],
        after["pp"],
        after["micro_batch_size"],
    )
    # Only lines that carry a strategy flag or its value changed; the rest of the script is the user's.
    old, new = GPT3_175B.splitlines(), converted_path(path).read_text().splitlines()
    assert len(old) == len(new)
    changed = {o for o, n in zip(old, new) if o != n}
    assert changed <= {"TP=8", "    --micro-batch-size 1", "\t--pipeline-model-parallel-size 16", new[-1] and old[-1]}
    assert '--save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH"' in new[-1] and new[-1].endswith("| tee log.txt")


@pytest.mark.slow
def test_slurm_batch_file_takes_its_shape_from_sbatch_and_keeps_every_other_argument(realistic):
    result, path = realistic["job.sbatch"]
    assert result["converted"] == str(path.parent / "job.uniap.sbatch")
    assert result["before"]["tp"] * result["before"]["pp"] * result["before"]["dp"] == 64  # 8 nodes x 8 tasks
    assert result["before"]["recompute"] == "selective"
    launch, argv = converted_argv(path)
    values = dict(zip(argv, argv[1:]))
    assert values["--data-path"] == "/lustre/data/llama tokens_text_document"
    assert values["--save"] == "/lustre/ckpt/llama2-70b" and values["--lr"] == "3e-4"
    assert launch.command.words[0].value == "srun"
    text = converted_path(path).read_text()
    if result["after"]["tp"] > 1:  # the plan's environment, exported before the command
        assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert path.read_text() == LLAMA2_SLURM


@pytest.mark.slow
def test_megatron_lm_accepts_the_converted_command_lines(realistic):
    """Megatron-LM core_v0.16.1's parse_args + validate_args on each converted script's training arguments,
    with the environment the script exports, on the launch's world size: it runs the plan's configuration."""
    megatron_lm.require()
    cases, expected = [], []
    for result, path in realistic.values():
        launch, argv = converted_argv(path)
        env = {n: launch.script.variables[n][0].value for n in launch.script.exported if n in launch.script.variables}
        after = result["after"]
        cases.append((argv, env, after["tp"] * after["cp"] * after["pp"] * after["dp"]))
        expected.append(after)
    reported = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "micro_batch_size")
    for got, after in zip(megatron_lm.validate(cases, report=reported), expected):
        assert "error" not in got, got
        args = got["args"]
        assert (
            args["tensor_model_parallel_size"],
            args["pipeline_model_parallel_size"],
            args["data_parallel_size"],
            args["micro_batch_size"],
        ) == (after["tp"], after["pp"], after["dp"], after["micro_batch_size"])


def test_keep_holds_the_users_choices(capsys, tmp_path):
    rc, result, err, _ = convert(capsys, tmp_path, GPT3_1B, "--keep", "tp,pp")
    assert rc == EXIT_OK, err
    assert (result["after"]["tp"], result["after"]["pp"]) == (2, 2)
    rc, _, err, _ = convert(capsys, tmp_path, GPT3_1B, "--keep", "tp,banana", "--force")
    assert rc == EXIT_INVALID_INPUT and "--keep banana" in err


def test_a_launch_that_does_not_fit_says_by_how_much(capsys, tmp_path):
    path = tmp_path / "big.sh"
    path.write_text(GPT3_13B_ONE_NODE.replace("--micro-batch-size 1", "--micro-batch-size 8"))
    rc = uniap_main(["convert", "megatron", str(path), "--cluster", "dgx-h100"])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    assert "(does not fit)" in out and "GiB per GPU over the usable memory" in out and "speedup" in out


def test_arguments_after_the_separator(capsys):
    argv = shlex.split(
        "pretrain_gpt.py --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 "
        "--max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 256 --bf16 --vocab-size 50304"
    )
    rc = uniap_main(["convert", "megatron", "--gpus-per-node", "8", "--", *argv])
    out, err = capsys.readouterr()
    assert rc == EXIT_OK, err
    assert "converted arguments: pretrain_gpt.py" in out and "current" in out and "planned" in out


@pytest.mark.parametrize(
    "text, words",
    [
        ('A="unclosed\npython pretrain_gpt.py\n', "line 1: a double quote is never closed"),
        ("python pretrain_gpt.py --num-layers $LAYERS --hidden-size 64\n", "line 1: --num-layers uses $LAYERS"),
        ("echo hello\n", "no command runs a .py training script"),
        ("torchrun --nproc_per_node $NGPU pretrain_gpt.py --num-layers 2\n", "--nproc_per_node is ''"),
    ],
)
def test_input_that_cannot_be_read_names_the_line(capsys, tmp_path, text, words):
    rc, _, err, path = convert(capsys, tmp_path, text)
    assert rc == EXIT_INVALID_INPUT and words in err and "Traceback" not in err
    assert path.read_text() == text and not converted_path(path).exists()


def test_never_over_the_original_or_an_existing_output(capsys, tmp_path):
    rc, _, err, path = convert(capsys, tmp_path, GPT3_1B, "-o", str(tmp_path / "train.sh"))
    assert rc == EXIT_INVALID_INPUT and "the original script" in err
    rc, _, err, _ = convert(capsys, tmp_path, GPT3_1B)
    assert rc == EXIT_OK
    rc, _, err, _ = convert(capsys, tmp_path, GPT3_1B)
    assert rc == EXIT_INVALID_INPUT and "exists" in err
    rc, _, err, _ = convert(capsys, tmp_path, GPT3_1B, "--force")
    assert rc == EXIT_OK and path.read_text() == GPT3_1B


def test_uniap_convert_lists_the_converters(capsys):
    with pytest.raises(SystemExit) as exc:
        uniap_main(["convert", "--help"])
    assert exc.value.code == 0 and "Frameworks: deepspeed, megatron" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        uniap_main(["convert"])
    assert exc.value.code == EXIT_INVALID_INPUT and "framework" in capsys.readouterr().err
    assert uniap_main(["convert", "caffe"]) == EXIT_INVALID_INPUT
    assert "no converter for 'caffe' (installed: deepspeed, megatron)" in capsys.readouterr().err


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_the_converted_script_keeps_the_authors_line_endings(capsys, tmp_path, ending):
    path = tmp_path / "train.sh"
    path.write_bytes(GPT3_1B.replace("\n", ending).encode())
    rc = uniap_main(["convert", "megatron", str(path), "--json"])
    assert rc == EXIT_OK, capsys.readouterr().err
    written = converted_path(path).read_bytes()
    assert written.count(ending.encode()) == written.count(b"\n") > 10
