"""A command line that explains itself (issue 15): help for everything, suites and merge methods listed,
--version, progress lines and whole tables when the output is not a terminal, no unused dependency."""

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import tiny_run
from mtprune.bench import DESCRIPTIONS, SUITES
from mtprune.cli import _parser, main
from mtprune.commands import print_summary

ROOT = Path(__file__).resolve().parents[1]


def all_parsers(parser: argparse.ArgumentParser, name: str = "mtprune"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_every_option_and_positional_has_help_text():
    missing = []
    seen = 0
    for name, parser in all_parsers(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            seen += 1
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 40 and not missing, missing


def test_bench_help_lists_every_suite_on_its_own_line(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for suite in SUITES:
        assert DESCRIPTIONS[suite]
        assert any(ln.split() and ln.split()[0] == suite and DESCRIPTIONS[suite] in ln for ln in lines), suite
    assert "{small,cpu,gpu}" in out


def test_merge_help_names_both_methods_and_where_their_settings_live(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "pam" in out and "PAM, He et al." in out and "mfis" in out and "MFIS, Cheng et al." in out
    assert "merge.method" in out and "merge.*" in out and "docs/merging.md" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mtprune {version}"


def test_typer_is_not_a_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    assert "torch" in deps and "typer" not in deps.lower()


def test_progress_line_per_epoch_when_output_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    """pytest's captured stdout is not a terminal, as a file or a CI log is: one line per epoch, with metrics."""
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run()))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ": epoch " in ln]
    assert [ln.split(": epoch ")[1].split(" ")[0] for ln in lines] == ["1", "2"]
    assert all("train_loss seg=" in ln and "val seg.miou=" in ln and "depth.abs_err=" in ln for ln in lines)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert f"seg.miou={records[1]['val']['seg']['miou']:.4g}" in lines[1]
    assert main(["--quiet", "train", str(cfg), "--out", str(tmp_path / "quiet")]) == 0
    assert ": epoch " not in capsys.readouterr().out  # --quiet: none


def test_wide_tables_are_not_cut_to_80_columns(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    tasks = {f"task_with_a_long_name_{i}": {"metric_with_a_long_name": {}} for i in range(4)}
    row = {"metrics": {t: {"metric_with_a_long_name": 12.345678} for t in tasks}, "delta_m": 1.5,
           "params": 1.2e6, "macs": 3.4e7, "latency_ms": 5.6}
    summary = {"name": "wide", "criterion": "task_taylor", "schedule": "iterative", "tasks": tasks,
               "models": [{"name": "dense", **row}, {"name": "pruned", **row}]}
    print_summary(summary)
    out = capsys.readouterr().out
    assert "…" not in out and max(map(len, out.splitlines())) > 80  # wider than 80 columns, nothing cut
    for t in tasks:
        assert t in out  # each header whole (it may wrap at a space)
    assert out.count("metric_with_a_long_name") == 4 and out.count("12.35") == 8 and "latency ms" in out


@pytest.mark.parametrize("text", ["a,b", "0,0", "-1", ""])
def test_bench_seeds_refuses_malformed_lists(text, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "criteria", "--seeds", text])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_bench_seeds_refused_by_a_suite_without_seeds(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["bench", "speed", "--scale", "small", "--out", str(out), "--seeds", "0"]) == 2
    assert "bench speed: this suite has no --seeds option" in capsys.readouterr().err
    assert not (out / "entries" / "speed_small.json").exists()  # refused before any entry ran


def test_bench_pools_refused_by_a_suite_without_pools_and_unknown_pools_named(tmp_path, capsys):
    assert main(["bench", "speed", "--scale", "small", "--out", str(tmp_path / "speed"), "--pools", "all"]) == 2
    assert "bench speed: this suite has no --pools option" in capsys.readouterr().err
    out = tmp_path / "criteria"
    assert main(["bench", "criteria", "--scale", "small", "--out", str(out), "--pools", "heads"]) == 2
    assert "unknown candidate pool(s) ['heads']" in capsys.readouterr().err
    assert not list(out.rglob("*.json"))  # refused before any entry ran


def test_bench_seeds_runs_only_those_seeds(tmp_path, monkeypatch):
    from mtprune.bench import criteria

    seen = []

    class Stop(Exception):
        pass

    def fake_setup(cfg, runs):
        seen.append(cfg.seed)
        raise Stop

    monkeypatch.setattr(criteria, "_Setup", fake_setup)
    main(["bench", "criteria", "--out", str(tmp_path / "c"), "--seeds", "2,1"])  # the CLI reports Stop, exit 1
    assert seen == [2]  # the first of the requested seeds, not the scale's seed 0
