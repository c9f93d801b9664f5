"""Benchmark: a sweep of 8 LoRA trials on the demo task in one kernel (one cached base, a view per trial) vs
the same 8 configs as 8 fresh `nbtune run` processes; and what the median pruner saves.

    python bench/sweep.py [--steps 3 10] [--trials 8]

Reported: wall time of each way and their ratio (target <= 0.6), the in-kernel sweep's peak RSS against
one fresh run's (target <= 1.3x; the fresh processes' peak is the largest of them, each measured by the
kernel as its child's VmHWM), and, for a TPE sweep of the same size with `pruner: median` vs `pruner: none`
(seeded alike, evaluating at half and full steps), optimizer steps trained in all, wall time, and the best
eval loss found.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report, run_child, versions, vmhwm_mb, write_result

LRS = (5e-4, 1e-3, 2e-3, 4e-3)
RANKS = (4, 8)
BASE = {"method": "lora", "data": "demo", "batch_size": 4, "metric": "none", "save": False,
        "gradient_checkpointing": True}


def in_kernel(steps: int, trials: int, folder: Path) -> dict[str, float]:
    """The grid as one sweep, in a fresh child process (its own peak RSS)."""
    return run_child(__file__, ["--child", "grid", "--steps", str(steps), "--trials", str(trials),
                                "--folder", str(folder)])


def fresh_processes(steps: int, trials: int, folder: Path) -> dict[str, float]:
    """The same configs, one `nbtune run` process each, one after another."""
    started = time.perf_counter()
    peaks = []
    for i, (lr, r) in enumerate(itertools.islice(itertools.product(LRS, RANKS), trials)):
        config = folder / f"trial{i}.json"
        config.write_text(json.dumps({**BASE, "name": f"fresh{i}", "steps": steps, "lr": lr, "r": r}))
        # `nbtune run` itself, in a fresh interpreter that reports its own peak (VmHWM) when it ends: the
        # largest-child figure of RUSAGE_CHILDREN would include the one-kernel sweep run before.
        code = ("import sys; from nbtune.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
                "sys.exit(rc)")
        done = subprocess.run([sys.executable, "-c", code, "run", str(config), "--json"], capture_output=True,
                              text=True, cwd=folder, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        peaks.append(int(done.stdout.rsplit("PEAK_KB", 1)[1].strip().strip("[]'")) / 1024)
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": round(max(peaks), 1)}


def child(kind: str, steps: int, trials: int, folder: Path) -> None:
    import warnings

    import nbtune

    warnings.simplefilter("ignore")
    os.chdir(folder)
    if kind == "grid":
        space = {"lr": list(LRS), "r": list(RANKS), "trials": trials, "sampler": "grid",
                 "objective": {"eval_loss": "min"}}
    else:  # the pruner comparison: TPE over the same ranges, with or without the median pruner
        space = {"lr": {"log_uniform": [LRS[0], LRS[-1]]}, "r": list(RANKS), "trials": trials, "sampler": "tpe",
                 "objective": {"eval_loss": "min"}, "pruner": kind}
    # The grid evaluates once at the end, as the fresh runs do; the pruner needs eval points: two per trial.
    eval_steps = 0 if kind == "grid" else max(1, steps // 2)
    started = time.perf_counter()
    sweep = nbtune.finetune({**BASE, "name": f"sweep-{kind}", "steps": steps, "eval_steps": eval_steps,
                             "sweep": space})
    wall = time.perf_counter() - started
    records = sweep.records
    report({"wall_s": round(wall, 1), "peak_rss_mb": round(vmhwm_mb(), 1),
            "steps_trained": sum(r["steps"] for r in records), "best": sweep.best["value"],
            "statuses": [r["status"] for r in records]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[10],
                        help="trial length(s); the grid comparison runs at each, the pruner at the longest")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--child")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps[0], args.trials, Path(args.folder))
        return
    by_steps = []
    with tempfile.TemporaryDirectory(prefix="nbtune-bench-sweep-") as tmp:
        folder = Path(tmp)
        # Each phase is printed when it ends: a run cut short by a timeout still says what it measured.
        for steps in args.steps:
            by_steps.append(grid_against_processes(steps, args.trials, folder / f"steps{steps}"))
        steps = max(args.steps)
        pruned = run_child(__file__, ["--child", "median", "--steps", str(steps), "--trials", str(args.trials),
                                      "--folder", str(folder)])
        print(f"median pruner: {pruned}", flush=True)
        unpruned = run_child(__file__, ["--child", "none", "--steps", str(steps), "--trials", str(args.trials),
                                        "--folder", str(folder)])
    result = {"trials": args.trials, "by_steps": by_steps,
              "pruner": {"steps": steps, "median": pruned, "none": unpruned,
                         "steps_ratio": round(pruned["steps_trained"] / unpruned["steps_trained"], 3),
                         "wall_ratio": round(pruned["wall_s"] / unpruned["wall_s"], 3)},
              "versions": versions("optuna")}
    print(f"median pruner: {pruned['steps_trained']} steps, {pruned['wall_s']} s, best {pruned['best']:.4f} "
          f"({pruned['statuses']}); none: {unpruned['steps_trained']} steps, {unpruned['wall_s']} s, best "
          f"{unpruned['best']:.4f}")
    write_result("sweep", result)


def grid_against_processes(steps: int, trials: int, folder: Path) -> dict:
    folder.mkdir()
    sweep = in_kernel(steps, trials, folder)
    print(f"{steps} steps, one kernel: {sweep}", flush=True)
    fresh = fresh_processes(steps, trials, folder)
    print(f"{steps} steps, fresh processes: {fresh}", flush=True)
    row = {"steps": steps, "sweep": sweep, "fresh_processes": fresh,
           "wall_ratio": round(sweep["wall_s"] / fresh["wall_s"], 3),
           "peak_rss_ratio": round(sweep["peak_rss_mb"] / fresh["peak_rss_mb"], 3)}
    print(f"{steps} steps, {trials} trials: one kernel {sweep['wall_s']} s, peak {sweep['peak_rss_mb']} MB; "
          f"{trials} processes {fresh['wall_s']} s, one run's peak {fresh['peak_rss_mb']} MB; wall ratio "
          f"{row['wall_ratio']}, peak RSS ratio {row['peak_rss_ratio']}", flush=True)
    return row

if __name__ == "__main__":
    main()
