"""Files that are not uniap's (issue 22): it writes only regular files and new paths, never one of the files a
command reads, never two outputs onto one file, and two runs racing for one new file do not both succeed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cli import run_main

from uniap.errors import EXIT_INVALID_INPUT, EXIT_OK, SpecError
from uniap.io import check_output_path, write_text_atomic
from uniap_deepspeed.cli import main as deepspeed_main

SMALL = ["plan", "--model", "gpt3-1.3b", "--nodes", "1", "--global-batch-size", "16", "--seq-length", "512"]
SPEC = (
    "name: tiny\narchitecture: decoder\nnum_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n"
    "ffn_hidden_size: 128\nvocab_size: 100\nmax_position_embeddings: 64\n"
)


def test_a_link_is_never_replaced(capsys, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("mine")
    link = tmp_path / "plan.json"
    link.symlink_to(target)
    rc, _, err = run_main(capsys, *SMALL, "-o", str(link), "--force")
    assert rc == EXIT_INVALID_INPUT and "symbolic link" in err
    assert link.is_symlink() and target.read_text() == "mine"


@pytest.mark.parametrize("name, said", [("", "needs a file name"), ("newdir/", "names a folder")])
def test_an_empty_or_folder_name_is_refused(capsys, tmp_path, monkeypatch, name, said):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(capsys, *SMALL, "-o", name)
    assert rc == EXIT_INVALID_INPUT and said in err
    assert list(tmp_path.iterdir()) == []


def test_a_device_is_never_written_even_with_force(tmp_path):
    with pytest.raises(SpecError, match="not a regular file"):
        check_output_path("/dev/null", force=True)


def test_the_output_is_never_an_input(capsys, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    rc, _, err = run_main(
        capsys, "plan", "--model", str(spec), "--nodes", "1", "--global-batch-size", "8", "-o", str(spec), "--force"
    )
    assert rc == EXIT_INVALID_INPUT and "never writes over its inputs" in err
    assert spec.read_text() == SPEC


def test_deepspeed_config_never_writes_over_its_base_or_twice_onto_one_file(capsys, tmp_path):
    base = tmp_path / "mine.json"
    base.write_text('{"train_micro_batch_size_per_gpu": 1}')
    job = ["config", "--model", "gpt3-1.3b", "--nodes", "1", "--global-batch-size", "16"]
    capsys.readouterr()
    assert deepspeed_main([*job, "--base", str(base), "-o", str(base), "--force"]) == EXIT_INVALID_INPUT
    assert "never writes over its inputs" in capsys.readouterr().err
    assert base.read_text() == '{"train_micro_batch_size_per_gpu": 1}'
    same = tmp_path / "same.json"
    assert deepspeed_main([*job, "-o", str(same), "--save-plan", str(same)]) == EXIT_INVALID_INPUT
    assert "are the same file" in capsys.readouterr().err and not same.exists()


def test_a_new_file_another_writer_made_meanwhile_is_not_overwritten(tmp_path):
    path = tmp_path / "plan.json"
    check_output_path(path, force=False)  # free when the command started
    path.write_text("theirs")  # another run wrote it while this one planned
    with pytest.raises(SpecError, match="appeared while uniap was working"):
        write_text_atomic(path, "ours")
    assert path.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


@pytest.mark.slow
def test_four_concurrent_plans_onto_one_path_one_succeeds_the_others_say_why(tmp_path):
    path = tmp_path / "plan.json"
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "uniap.cli", *SMALL, "-o", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes.count(EXIT_OK) == 1 and codes.count(EXIT_INVALID_INPUT) == 3, results
    assert all("exists" in err or "appeared while uniap was working" in err for code, err in results if code)
    assert json.loads(path.read_text())["format"]
