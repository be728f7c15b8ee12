"""Can an allocation pay at all on a task?  Each layer group's value, and the oracle bound, on a real model and task.

    python benchmarks/bench_layer_value.py minilm            # value: 6 groups x (add, drop) + U, 3 seeds (39 runs)
    python benchmarks/bench_layer_value.py minilm --oracle   # value plan vs its uniform plan, 8 fresh seeds (16 runs)
    python benchmarks/bench_layer_value.py smollm2           # 6 groups of 5 layers, 3 seeds (39 runs)
    python benchmarks/bench_layer_value.py smollm2 --oracle  # 10 fresh seeds (20 runs)
    python benchmarks/bench_layer_value.py code --curve      # the harder task's budget curve: U at 1/16 and 1
    ... --dry-run   lists the runs and what the archive already holds

Protocol.  The value is estimated with seeds 100, 101, 102 on the validation rows only (``layer-value``); the
oracle (``compare-plans --plans value:value.json``) is trained with seeds 0.. and scored on the test rows, so it
is never tested on the seeds or rows it was estimated on.  The settings are the comparisons' (RESULTS §11d–§11h):
MiniLM at 1/8 of the default budget (80 steps, lr 1e-3), SmolLM2 at the default budget (120 steps, lr 3e-4).
``code`` is the harder causal-LM task (``benchmarks/tasks.py stdlib-code-lm``: SmolLM2 completes a standard-library
function's body, about 60 tokens, from its ``def`` line and docstring).  It qualifies for a value measurement when
the uniform plan gains at least 5 % of its validation loss across the 16x budget span (``--curve``, 2 seeds).
Runs are copied to and from ``benchmarks/results/runs/value-<setup>`` so a measurement longer than one session
resumes in the next.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compare_plans import DATA, model_path, sync_runs, task_files  # noqa: E402
from common import machine, today  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VALUE_SEEDS = [100, 101, 102]

SETUPS = {
    "minilm": dict(task="debian-sections", kind="classification", budget=0.125, steps=80, batch_size=16,
                   eval_every=40, max_length=32, lr=1e-3, oracle_seeds=8, validation_rows=None, test_rows=None,
                   groups=None),
    "smollm2": dict(task="debian-sections-lm", kind="causal-lm", budget=1.0, steps=120, batch_size=8, eval_every=30,
                    max_length=48, lr=3e-4, oracle_seeds=10, validation_rows=64, test_rows=256, groups=6),
    "code": dict(task="stdlib-code-lm", kind="causal-lm", budget=1.0, steps=120, batch_size=8, eval_every=30,
                 max_length=128, lr=3e-4, oracle_seeds=10, validation_rows=64, test_rows=256, groups=6,
                 curve=[1 / 16, 1], curve_seeds=[0, 1]),
}
QUALIFIES = 0.05  # the curve's relative gain at which a task binds enough to measure value on


def curve(model, task, setup: dict, settings, out: Path) -> dict:
    """U (one uniform LoRA rank per module, the largest within each budget) at every budget of the setup's curve,
    with its seeds; the validation loss per budget and the relative gain from the smallest to the largest."""
    from layerscope.experiments import PlanSettings
    from layerscope.experiments.store import Log, RunStore
    from layerscope.experiments.value import uniform_arm

    store, log = RunStore(out / "runs", str(model), task), Log(True, name="curve")
    points = []
    for budget in setup["curve"]:
        arm = uniform_arm(str(model), budget, "ranks", PlanSettings())
        runs = [store.run(arm, seed, settings, log, f"curve {budget:g}") for seed in setup["curve_seeds"]]
        validation = [r["final_validation"] for r in runs]
        points.append({"budget": budget, "arm": arm.name, "rank": arm.plan.layers[0]["rank"],
                       "trainable": arm.trainable, "validation": validation, "test": [r["final"] for r in runs],
                       "start": runs[0]["curve"][0][1], "mean_validation": sum(validation) / len(validation),
                       "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs)})
    gain = (points[0]["mean_validation"] - points[-1]["mean_validation"]) / points[0]["mean_validation"]
    span = points[-1]["trainable"] / points[0]["trainable"]
    return {"task": task.describe(), "metric": "eval_loss (validation rows)", "seeds": setup["curve_seeds"],
            "settings": settings.__dict__, "points": points, "relative_gain": gain, "span": span,
            "qualifies": gain >= QUALIFIES,
            "verdict": f"uniform gains {gain:.1%} of its validation loss across {span:.0f}x the parameters "
                       f"({'qualifies' if gain >= QUALIFIES else 'does not qualify'}: the bar is {QUALIFIES:.0%})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setup", choices=sorted(SETUPS))
    parser.add_argument("--oracle", action="store_true", help="The oracle comparison (needs the value measured first).")
    parser.add_argument("--seeds", type=int, help="Oracle seeds (default: 8 for minilm, 10 for smollm2).")
    parser.add_argument("--curve", action="store_true", help="The setup's budget curve of U (the harder task's test).")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    setup = SETUPS[args.setup]

    from layerscope.experiments import Settings, compare_plans, load_task, planned_runs, prepare_model
    from layerscope.experiments.value import layer_value, planned_value_runs

    files = task_files(setup, DATA / setup["task"])
    task = load_task(files["train"], setup["kind"], validation_path=files["validation"], eval_path=files["test"],
                     prompt_column="prompt" if setup["kind"] == "causal-lm" else None)
    settings = Settings(steps=setup["steps"], batch_size=setup["batch_size"], eval_every=setup["eval_every"],
                        max_length=setup["max_length"], device="cpu", learning_rate=setup["lr"])
    name = f"value-{args.setup}{'-oracle' if args.oracle else '-curve' if args.curve else ''}"
    out, archive = DATA / name, RESULTS / "runs" / name
    sync_runs(archive, out / "runs")
    model = prepare_model(model_path(args.setup), out)
    value_file = RESULTS / f"layer_value_{args.setup}.json"
    started = time.perf_counter()
    if args.curve:
        result = curve(model, task, setup, settings, out)
        sync_runs(out / "runs", archive)
        (RESULTS / f"budget_curve_{args.setup}_{today()}.json").write_text(json.dumps(
            {**result, "machine": machine(), "date": today()}, indent=1) + "\n")
        print(result["verdict"])
    elif args.oracle:
        if not value_file.is_file():
            raise SystemExit(f"{value_file}: measure the value first (without --oracle)")
        seeds = list(range(args.seeds or setup["oracle_seeds"]))
        arguments = dict(seeds=seeds, settings=settings, out=out)
        if args.dry_run:
            print(planned_runs(model, task, [f"value:{value_file}"], **arguments).drop(
                columns=["key", "path", "seconds_per_step"]).to_string(index=False))
            return
        document = compare_plans(model, task, [f"value:{value_file}"], **arguments)
        sync_runs(out / "runs", archive)
        target = RESULTS / f"oracle_{args.setup}_{today()}.json"
        shutil.copyfile(out / "comparison.json", target)
        print(document["verdict"])
    else:
        arguments = dict(budget=setup["budget"], seeds=VALUE_SEEDS, settings=settings, out=out,
                         groups=setup["groups"])
        if args.dry_run:
            print(planned_value_runs(model, task, **arguments).to_string(index=False))
            return
        document = layer_value(model, task, **arguments)
        sync_runs(out / "runs", archive)
        value_file.write_text(json.dumps(document, indent=1) + "\n")
        shutil.copyfile(out / "value.png", RESULTS / f"layer_value_{args.setup}.png")
        print(document["verdict"])
    print(json.dumps({"benchmark": name, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
                      "date": today()}, indent=1))


if __name__ == "__main__":
    main()
