"""The three command lines' --help (every command documents its options, defaults and exit codes) and the
modes of the files they write (0666 less the umask, 0777 less the umask for scripts, as any tool)."""

from __future__ import annotations

import argparse
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from uniap.cli import build_parser as uniap_parser
from uniap.cli import main as uniap_main
from uniap.errors import (
    EXIT_INFEASIBLE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    exit_codes_epilog,
)
from uniap.io import new_file_mode, write_json_atomic, write_text_atomic

from uniap_deepspeed.cli import build_parser as deepspeed_parser
from uniap_deepspeed.cli import main as deepspeed_main
from uniap_deepspeed.profile import build_parser as deepspeed_profile_parser
from uniap_megatron.cli import build_parser as megatron_parser
from uniap_megatron.cli import main as megatron_main
from uniap_megatron.planning import plan_megatron
from uniap_megatron.profile import build_parser as megatron_profile_parser

MAINS: dict[str, Callable] = {"uniap": uniap_main, "uniap-deepspeed": deepspeed_main, "uniap-megatron": megatron_main}
EVERY_COMMAND_CODES = {EXIT_OK, EXIT_INTERNAL, EXIT_INVALID_INPUT, EXIT_INTERRUPTED}
TOP_LEVEL_CODES = EVERY_COMMAND_CODES | {EXIT_INFEASIBLE}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands() -> list[tuple[str, tuple[str, ...], argparse.ArgumentParser]]:
    """(CLI, command words, parser) of every parser of the three CLIs: top level, each subcommand, and the
    adapters' `profile`, whose parser is built by the profiler module (the subcommand is a stub)."""
    found = []
    for cli, build, profile in (
        ("uniap", uniap_parser, None),
        ("uniap-deepspeed", deepspeed_parser, deepspeed_profile_parser),
        ("uniap-megatron", megatron_parser, megatron_profile_parser),
    ):
        top = build()
        found.append((cli, (), top))
        for name, sub in _subparsers(top).items():
            if name == "profile" and profile is not None:
                sub = profile(f"{cli} profile")
            found.append((cli, (name,), sub))
    return found


COMMANDS = _commands()


def _params():
    return [pytest.param(cli, words, parser, id=" ".join((cli, *words))) for cli, words, parser in COMMANDS]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.help != argparse.SUPPRESS
        and not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
    ]


def _exit_codes(help_text: str) -> set[int]:
    """The codes listed one a line under `exit codes:` in the epilog."""
    lines = help_text.splitlines()
    assert "exit codes:" in lines, help_text
    codes = set()
    for line in lines[lines.index("exit codes:") + 1 :]:
        m = re.match(r"^\s+(\d+)\s+\S", line)
        if not m:
            break
        codes.add(int(m.group(1)))
    return codes


# --- --help ------------------------------------------------------------------------------------------


def test_exit_codes_epilog_lists_each_code_once_a_line():
    text = exit_codes_epilog()
    assert _exit_codes(text) == TOP_LEVEL_CODES | {4}
    assert _exit_codes(exit_codes_epilog((EXIT_OK, EXIT_INVALID_INPUT), note="more")) == {0, 2}
    assert text.splitlines()[0] == "exit codes:"


@pytest.mark.parametrize(("cli", "words", "parser"), _params())
def test_help_exits_0_and_prints_usage(capsys, cli, words, parser):
    capsys.readouterr()
    try:
        rc = MAINS[cli]([*words, "--help"])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc in (0, None), err
    assert out.startswith(f"usage: {' '.join((cli, *words))}"), out
    assert "Traceback" not in out + err


@pytest.mark.parametrize(("cli", "words", "parser"), _params())
def test_every_option_has_help(cli, words, parser):
    missing = [a.dest for a in _options(parser) if not (a.help or "").strip()]
    assert not missing, f"{cli} {' '.join(words)}: options without help: {missing}"


@pytest.mark.parametrize(("cli", "words", "parser"), _params())
def test_every_option_says_its_default_and_choices(cli, words, parser):
    """Optional arguments name their default ("default" in the help, %(default)s or a phrase); those with
    choices list them (%(choices)s or each spelled out)."""
    text = parser.format_help()  # expands %(default)s and %(choices)s; must not raise
    bad = []
    for a in _options(parser):
        if a.option_strings and not a.required and "default" not in a.help.lower():
            bad.append(f"{a.option_strings[0]}: no default in {a.help!r}")
        if a.choices and not ("%(choices)s" in a.help or all(str(c) in a.help for c in a.choices)):
            bad.append(f"{a.option_strings[0] if a.option_strings else a.dest}: choices not listed in {a.help!r}")
    assert not bad, f"{cli} {' '.join(words)}:\n" + "\n".join(bad)
    assert text


@pytest.mark.parametrize(("cli", "words", "parser"), _params())
def test_epilog_lists_the_exit_codes(cli, words, parser):
    codes = _exit_codes(parser.format_help())
    want = TOP_LEVEL_CODES if not words else EVERY_COMMAND_CODES
    assert want <= codes, f"{cli} {' '.join(words)}: exit codes {sorted(codes)}, want at least {sorted(want)}"


@pytest.mark.parametrize(("cli", "words", "parser"), _params())
def test_description_is_whole_sentences(cli, words, parser):
    """The description is there and not cut mid-sentence (`__doc__.splitlines()[0]` was)."""
    description = (parser.description or "").strip()
    assert description, f"{cli} {' '.join(words)} has no description"
    assert description.endswith((".", ")", "`")) or description.splitlines()[-1].startswith("  "), description


@pytest.mark.parametrize("cli", ["uniap", "uniap-deepspeed", "uniap-megatron"])
def test_top_level_help_summarises_every_command(cli):
    top = next(p for c, w, p in COMMANDS if c == cli and not w)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {a.dest: a.help for a in sub._choices_actions}
    assert set(summaries) == set(sub.choices)
    assert all(h and h.strip() for h in summaries.values()), summaries
    text = top.format_help()
    for name in sub.choices:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", text, re.M), f"{cli} --help does not summarise {name}"


# --- file modes ---------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_file_mode(path: Path, umask: int, executable: bool = False) -> None:
    want = (0o777 if executable else 0o666) & ~umask
    assert _mode(path) == want, f"{path.name}: {oct(_mode(path))}, want {oct(want)} (umask {oct(umask)})"


JOB = ["--model", "gpt3-1.3b", "--nodes", "1", "--gpus-per-node", "8", "--global-batch-size", "16"]
MEGATRON_JOB = [
    *("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128"),
    *("--max-position-embeddings", "128", "--vocab-size", "1000", "--global-batch-size", "8", "--bf16"),
]


def test_new_file_mode_follows_the_umask(umask):
    assert new_file_mode() == 0o666 & ~umask
    assert new_file_mode(executable=True) == 0o777 & ~umask
    assert os.umask(umask) == umask  # reading it left it as it was


def test_atomic_writes_take_the_umask_mode_also_over_an_existing_file(tmp_path, umask):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    assert_file_mode(path, umask)
    path.chmod(0o600)
    write_json_atomic(path, {"a": 2})
    assert_file_mode(path, umask)
    script = tmp_path / "run.sh"
    write_text_atomic(script, "#!/bin/sh\n", executable=True)
    assert_file_mode(script, umask, executable=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_uniap_plan_output_mode(tmp_path, umask, capsys):
    out = tmp_path / "plan.json"
    assert uniap_main(["plan", *JOB, "-o", str(out)]) == 0
    assert_file_mode(out, umask)
    out.chmod(0o600)
    assert uniap_main(["plan", *JOB, "-o", str(out), "--force"]) == 0
    assert_file_mode(out, umask)


def test_deepspeed_config_and_launch_modes(tmp_path, umask, capsys):
    config, plan = tmp_path / "ds.json", tmp_path / "plan.json"
    assert deepspeed_main(["config", *JOB, "-o", str(config), "--save-plan", str(plan)]) == 0
    assert_file_mode(config, umask)
    assert_file_mode(plan, umask)
    out = tmp_path / "launch"
    argv = ["launch", str(plan), "--hosts", "node1", "--script", "train.py", "--output-dir", str(out)]
    assert deepspeed_main(argv) == 0
    assert_file_mode(out / "ds_config.json", umask)
    assert_file_mode(out / "hostfile", umask)
    assert_file_mode(out / "launch.sh", umask, executable=True)
    for name in ("ds_config.json", "hostfile", "launch.sh"):
        (out / name).chmod(0o600)
    assert deepspeed_main([*argv, "--force"]) == 0
    assert_file_mode(out / "ds_config.json", umask)
    assert_file_mode(out / "hostfile", umask)
    assert_file_mode(out / "launch.sh", umask, executable=True)


def test_megatron_script_and_slurm_modes(tmp_path, umask, capsys):
    plan = tmp_path / "plan.json"
    plan_megatron(MEGATRON_JOB, 1, 2).save(plan)
    assert_file_mode(plan, umask)
    script = tmp_path / "run.sh"
    assert megatron_main(["script", str(plan), "-o", str(script), "--", "pretrain_gpt.py", *MEGATRON_JOB]) == 0
    assert_file_mode(script, umask, executable=True)
    sbatch, plan_out = tmp_path / "job.sbatch", tmp_path / "plan-out.json"
    argv = ["run", "--plan", str(plan), "--slurm", str(sbatch), "--plan-out", str(plan_out)]
    assert megatron_main([*argv, "--", "pretrain_gpt.py", *MEGATRON_JOB]) == 0
    assert_file_mode(sbatch, umask, executable=True)
    assert_file_mode(plan_out, umask)
