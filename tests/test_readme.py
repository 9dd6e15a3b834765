"""The README's "Prune your own multi-task model" example works when pasted."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_prune_your_own_model_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text.split("## Prune your own multi-task model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    kept = float(re.search(r"MACs kept: ([0-9.]+)", out).group(1))
    assert abs(kept - 0.5) <= 0.01
    assert (tmp_path / "twotask.mtp").is_file() and "seg+depth" in out
