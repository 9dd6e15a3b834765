"""Suite ``disparse2022``: DiSparse (Sun et al., CVPR 2022) against its baselines at 50/70/90 % sparsity, 3 seeds.

The work is done by ``mtprune.sparsity.benchmark``, which skips the run directories that already finished, so
the suite always resumes.
"""

from __future__ import annotations


def run(scale: str = "cpu", out=None, threads: int | None = 1, **_) -> dict:
    from ..sparsity.benchmark import main

    argv = ["--threads", str(threads or 1)] + (["--out", str(out)] if out else [])
    if scale == "small":
        argv += ["--seeds", "0", "--sparsities", "0.9"]
    main(argv)
    return {"suite": "disparse2022", "scale": scale}
