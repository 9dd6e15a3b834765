"""Kill and resume of ``mtprune prune`` with ``allocator: pagcp``: a run stopped after a PAGCP round (in process)
or SIGKILLed at seeded random moments (real processes) and resumed with ``--resume`` continues from the last
completed round, never reruns a saved round or a fine-tuning epoch, and ends bit-identical to an uninterrupted
run. The statistics use augmented data, so a round whose random draws depended on the rounds run before it in
the same process would decide differently.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mtprune.engine.trainer as trainer_module
import mtprune.pruning.pagcp.rounds as pagcp_module
from helpers import tiny_run
from mtprune.cli import main
from test_reliability_resume import (
    assert_same_tensors,
    epochs_logged,
    finish,
    kill_after_progress,
    launch,
    snapshot,
    temporaries,
)

PAGCP = {"criterion": "taylor", "allocator": "pagcp", "target_macs": 0.2, "stats_batches": 1, "stats_batch_size": 6,
         "finetune": {"epochs": 2, "batch_size": 6},
         "pagcp": {"rounds": 3, "held_out_batches": 1, "budget": 1.5, "ratios": [0.25, 0.5, 0.75]}}


pytestmark = pytest.mark.filterwarnings("ignore:pagcp. target_macs=0.2 was not reached")


class Killed(BaseException):  # not an Exception: the command does not catch it, like a SIGKILL
    pass


def write_config(path: Path) -> Path:
    cfg = tiny_run(prune=PAGCP)
    cfg["train"]["epochs"] = 1
    path.write_text(yaml.safe_dump(cfg))
    return path


def prune(cfg: Path, out: Path, *extra: str) -> int:
    return main(["--quiet", "prune", str(cfg), "--out", str(out), *extra])


def state(run: Path) -> dict:
    return json.loads((run / "prune" / "pagcp.json").read_text())


def without_seconds(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k != "seconds"}
    out["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in report["rounds"]]
    return out


def assert_same_run(ref: Path, run: Path) -> None:
    assert_same_tensors(load_file(str(ref / "model.mtp")), load_file(str(run / "model.mtp")))
    a, b = json.loads((ref / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    assert without_seconds(a["pagcp"]) == without_seconds(b["pagcp"])  # same decisions, round by round
    assert a["trajectory"] == b["trajectory"]
    rounds = len(a["pagcp"]["rounds"])
    for sub in [*(f"rounds/{r}" for r in range(1, rounds)), "finetune"]:
        assert epochs_logged(run / "prune" / sub / "metrics.jsonl") == [1, 2], sub
    assert not temporaries(run)


def test_pagcp_resumes_after_a_round_and_mid_finetuning_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = write_config(tmp_path / "pagcp.yaml")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert prune(cfg, ref) == 0
    assert len(state(ref)["report"]["rounds"]) >= 2  # the later rounds run after the resume

    write_state = pagcp_module._write_state

    def die_after_round_1(path, records, report):
        write_state(path, records, report)
        if report is not None and len(report.rounds) == 1:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(pagcp_module, "_write_state", die_after_round_1)
        with pytest.raises(Killed):
            prune(cfg, run)
    assert len(state(run)["report"]["rounds"]) == 1
    assert not (run / "prune" / "rounds" / "2").exists()
    round_1 = snapshot(run / "prune" / "rounds" / "1")

    save_checkpoint = trainer_module.save_checkpoint

    def die_mid_round_2(path, payload):  # after round 2's first fine-tuning epoch
        save_checkpoint(path, payload)
        if Path(path).parent.parent.name == "2" and Path(path).name == "last.pt":
            raise Killed

    torch.manual_seed(999)  # a fresh process: the global RNG is elsewhere
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "save_checkpoint", die_mid_round_2)
        with pytest.raises(Killed):
            prune(cfg, run, "--resume")
    assert len(state(run)["report"]["rounds"]) == 1
    log_2 = run / "prune" / "rounds" / "2" / "metrics.jsonl"
    assert epochs_logged(log_2) == [1]
    epoch_1 = log_2.read_text()  # with its wall time: a rerun of the epoch would log another one

    torch.manual_seed(12345)
    assert prune(cfg, run, "--resume") == 0
    assert snapshot(run / "prune" / "rounds" / "1") == round_1  # round 1 was neither pruned nor trained again
    assert log_2.read_text().startswith(epoch_1)  # round 2's fine-tuning went on from its checkpoint
    assert_same_run(ref, run)


@pytest.mark.slow
def test_pagcp_prune_survives_sigkill_bit_exactly(tmp_path, env):
    cfg = write_config(tmp_path / "pagcp.yaml")
    ref, run, log = tmp_path / "ref", tmp_path / "run", tmp_path / "stderr.log"
    assert prune(cfg, ref) == 0
    n = len(state(ref)["report"]["rounds"])
    span = (ref / "prune" / "rounds" / str(n) / "model.mtp").stat().st_mtime - (ref / "dense.mtp").stat().st_mtime

    rng = random.Random(5)
    prune_dir = run / "prune"
    mid_rounds, saved = 0, {}
    for attempt in range(2):
        before = snapshot(prune_dir)
        proc = launch(env, log, "prune", cfg, "--out", run, *(["--resume"] if attempt else []))
        if attempt == 0:  # after round 0's record: somewhere in the rounds (probing, pruning, fine-tuning)
            def progressed():
                return (prune_dir / "pagcp.json").is_file()
        else:  # after the resumed process wrote new work
            def progressed(b=before):
                return bool(snapshot(prune_dir).items() - b.items())
        if not kill_after_progress(proc, progressed, rng.uniform(0.0, 0.6 * span)):
            break
        report = state(run)["report"]
        done = len(report["rounds"]) if report else 0
        mid_rounds += done < n
        saved = {r: snapshot(prune_dir / "rounds" / str(r)).get("model.mtp") for r in range(1, done + 1)}
    assert mid_rounds >= 1, "no kill landed during the PAGCP rounds"
    finish(launch(env, log, "prune", cfg, "--out", run, "--resume"), log)

    for r, stamp in saved.items():  # the rounds saved before the last kill were not run again
        assert snapshot(prune_dir / "rounds" / str(r))["model.mtp"] == stamp
    assert_same_run(ref, run)
