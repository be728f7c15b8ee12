"""A compare-plans document as Markdown for RESULTS.md: arms with parameters, per-seed finals, intervals, paired
differences, corrected p-values, minimum detectable effects, collapse counts, convergence and the verdict.

    python benchmarks/comparison_table.py benchmarks/results/compare_plans_minilm_2026-12-01.json [--no-memory]
    python benchmarks/comparison_table.py COMPARISON_WITH_BUDGETS.json [--full]  # the budget curve's two tables
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _signed(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def _shape(document: dict, arm: str) -> str:
    layers = [layer for layer in document["plan_documents"][arm]["layers"] if layer["experts"] > 0]
    experts = [layer["experts"] for layer in layers]
    ranks = [layer["rank"] for layer in layers]
    top_k = max(layer["top_k"] for layer in layers)
    experts_text = (f"{experts[0]} expert{'s' if experts[0] > 1 else ''}" if len(set(experts)) == 1
                    else f"experts {','.join(map(str, experts))}")
    ranks_text = f"rank {ranks[0]}" if len(set(ranks)) == 1 else f"ranks {','.join(map(str, ranks))}"
    return f"{experts_text}, {ranks_text}, top-{top_k}"


def markdown(document: dict, memory: bool = True) -> str:
    metric = document["metric"]
    lines = [f"| arm | kind | structure per layer | trainable | active/token | {metric}: mean (95 % CI) | "
             "minus baseline (95 % CI) | p (Holm) | MDE 80 % | collapsed |", "|" + "---|" * 10]
    for row in document["arms"]:
        interval = f"{_num(row['mean'])} ({_num(row['ci95_low'])}–{_num(row['ci95_high'])})"
        diff = (f"{_signed(row.get('diff_vs_baseline'))} ({_signed(row.get('diff_ci95_low'))} to "
                f"{_signed(row.get('diff_ci95_high'))})" if row.get("diff_vs_baseline") is not None else "")
        if row.get("testable") is False:
            diff = f"not testable: {row.get('not_testable')}"
        p = row.get("p_holm") if row["kind"] == "strategy" else row.get("p_value")
        p_text = "" if row.get("diff_vs_baseline") is None else (
            f"{_num(p, 3)}" + ("" if row["kind"] == "strategy" else " (unadjusted)"))
        versus = f" vs {row['baseline']}" if row.get("baseline") else ""
        lines.append(f"| {row['arm']}{versus} | {row['kind']} | {_shape(document, row['arm'])} | "
                     f"{row['trainable']:,} | {row['active_per_token']:,} | {interval} | {diff} | {p_text} | "
                     f"{_num(row.get('mde80')) if row.get('mde80') is not None else ''} | "
                     f"{row['collapsed']}/{row['n']} |")
    seeds = document["seeds"]
    lines += ["", f"Per seed ({', '.join(map(str, seeds))}), test {metric}:", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for row in document["arms"]:
        lines.append(f"| {row['arm']} | " + " | ".join(_num(v) for v in row["finals"]) + " |")
    if memory:
        lines += ["", "Seconds per step (mean over seeds) and the run's own peak memory:", "",
                  "| arm | s/step | peak MiB |", "|---|---|---|"]
        for row in document["arms"]:
            lines.append(f"| {row['arm']} | {row['seconds_per_step']:.3f} | {row['peak_memory_mib']:.0f} |")
    else:
        lines += ["", "Seconds per step (mean over seeds): " + ", ".join(
            f"{row['arm']} {row['seconds_per_step']:.3f}" for row in document["arms"]) + "."]
    lines += ["", "Baseline validation curves (mean over seeds):", ""]
    for name, facts in document["baseline_convergence"].items():
        lines.append(f"* {name}: {_num(facts['validation_start'])} → {_num(facts['validation_at_75pct'])} at 75 % "
                     f"→ {_num(facts['validation_end'])}; last quarter {_signed(facts['last_quarter_change'])} of "
                     f"{_signed(facts['whole_change'])} — {'flattened' if facts['flattened'] else 'NOT flattened'}")
    chosen = document["learning_rate"]
    sweep = ", ".join(f"{k} → {v:.4f}" for k, v in chosen.get("validation_mean", {}).items())
    rate = f"{chosen['chosen']:g}" if chosen.get("chosen") is not None else "per budget"
    lines += ["", f"Learning rate {rate} ({chosen['why']}{'; validation: ' + sweep if sweep else ''}).",
              "", f"Verdict: *{document['verdict']}*"]
    if document.get("dense_verdict"):
        lines += ["", f"Mixture vs dense: *{document['dense_verdict']}*"]
    return "\n".join(lines)


def curve_markdown(document: dict) -> str:
    """A budget curve as two tables: each uniform baseline's metric by budget (does capacity bind?), and each
    strategy minus its baseline by budget (does allocation pay there?)."""
    metric = document["metric"]
    rows = document["arms"]
    labels = [b["label"] for b in document["budgets"]["budgets"]]
    lines = [f"| budget | parameters | baseline | structure per layer | trainable | test {metric}: mean (95 % CI) | "
             "collapsed |", "|" + "---|" * 7]
    params = {b["label"]: b["params"] for b in document["budgets"]["budgets"]}
    for label in labels:
        for row in rows:
            if row["budget"] == label and row["kind"] == "baseline":
                lines.append(f"| {label} | {params[label]:,} | {row['arm'].rsplit('@', 1)[0]} ({row['trainer']}) | "
                             f"{_shape(document, row['arm'])} | {row['trainable']:,} | {_num(row['mean'])} "
                             f"({_num(row['ci95_low'])}–{_num(row['ci95_high'])}) | {row['collapsed']}/{row['n']} |")
    lines += ["", f"| budget | strategy | structure per layer | trainable | test {metric} | minus baseline (95 % CI) | "
              "p (Holm, within the budget) | MDE 80 % | s/step |", "|" + "---|" * 9]
    for label in labels:
        for row in rows:
            if row["budget"] == label and row["kind"] in ("strategy", "dense"):
                diff = (f"{_signed(row.get('diff_vs_baseline'))} ({_signed(row.get('diff_ci95_low'))} to "
                        f"{_signed(row.get('diff_ci95_high'))})" if row.get("testable") else
                        f"not testable: {row.get('not_testable')}")
                shape = _shape(document, row["arm"]) if row["trainer"] != "adalora" else (
                    f"ranks learned (final params {row.get('adalora_final_params', 0):,}, "
                    f"held {row['trainable_in_model']:,})")
                lines.append(f"| {label} | {row['family']} vs {row['baseline'].rsplit('@', 1)[0]} | {shape} | "
                             f"{row['trainable']:,} | {_num(row['mean'])} | {diff} | {_num(row.get('p_holm'), 3)} | "
                             f"{_num(row.get('mde80'))} | {row['seconds_per_step']:.2f} |")
    for note in document["budgets"].get("left_out", []):
        lines += ["", f"Left out at {note['budget']}: {note['arm']} — {note['why']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    document = json.loads(Path(sys.argv[1]).read_text())
    if document.get("budgets") and "--full" not in sys.argv:
        print(curve_markdown(document))
    else:
        print(markdown(document, memory="--no-memory" not in sys.argv))
