"""A self-contained HTML report: summary, warnings, plots, plans and the tables as CSV."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from layerscope.errors import LayerscopeError
from layerscope.export import export_plan
from layerscope.outputs import write_files
from layerscope.planning.explain import explain_table
from layerscope.spectral.coverage import depth_description
from layerscope.spectral.esd import gram_eigenvalues
from layerscope.spectral.scan import layer_summary
from layerscope.viz import plots
from layerscope.viz.experts import has_experts, outlier_html, plot_expert_heatmap

LOW_ALPHA, HIGH_ALPHA = plots.REFERENCE_ALPHAS
MAX_ESD_PLOTS = 8

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .6rem 0; }
div.table { max-width: 100%; overflow-x: auto; }
p.verdict { font-size: 1.05rem; font-weight: 600; color: #111; border-left: 4px solid #4C72B0; padding-left: .7rem; }
th, td { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: .4rem 0; }
.warn { color: #9a3412; } .ok { color: #166534; } .muted { color: #666; font-size: .85rem; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: .8rem; }
code { background: #f4f4f4; padding: 0 .25rem; }
"""


def _table_html(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    def cell(value) -> str:
        if value is None or value is pd.NA or value is pd.NaT:
            return ""  # a missing value is an empty cell, never the word "None"
        if isinstance(value, float):
            return "" if math.isnan(value) else float_format.format(value)
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    # Wide tables scroll inside their box instead of running off the page's right edge.
    return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def warnings_table(table: pd.DataFrame) -> pd.DataFrame:
    """Matrices that are not analysable, or whose alpha is outside [2, 6]."""
    rows = []
    for row in table.itertuples(index=False):
        if row.status != "ok":
            rows.append({"matrix": row.name, "issue": row.status, "alpha": math.nan})
        elif "alpha" in table.columns and math.isfinite(row.alpha) and not LOW_ALPHA <= row.alpha <= HIGH_ALPHA:
            issue = f"alpha < {LOW_ALPHA:g} (very heavy tail)" if row.alpha < LOW_ALPHA else \
                f"alpha > {HIGH_ALPHA:g} (under-trained?)"
            rows.append({"matrix": row.name, "issue": issue, "alpha": row.alpha})
    return pd.DataFrame(rows, columns=["matrix", "issue", "alpha"])


def _esd_choices(table: pd.DataFrame) -> list[str]:
    """The lowest- and highest-alpha matrices, then one per layer, up to MAX_ESD_PLOTS."""
    ok = table[(table["status"] == "ok") & table["kind"].isin(["projection", "expert"])]
    if ok.empty:
        return []
    column = "alpha" if "alpha" in ok.columns else "alpha_hill"
    chosen = [ok.loc[ok[column].idxmin(), "name"], ok.loc[ok[column].idxmax(), "name"]]
    for _, group in ok.groupby("layer"):
        chosen.append(group.iloc[0]["name"])
    unique = list(dict.fromkeys(chosen))
    return unique[:MAX_ESD_PLOTS]


def esd_eigenvalues(source, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, Gram eigenvalues in float64) of the named matrices of ``source`` (a checkpoint path, a model in
    memory or a state dict), read one at a time."""
    from layerscope.spectral.single import named_matrix

    for name in names:
        weight = named_matrix(source, name.split(":")[0] if "[" not in name else name)
        yield name, gram_eigenvalues(weight[None], torch.float64)[0][0]


def _in_memory(source) -> bool:
    from collections.abc import Mapping

    return isinstance(source, (torch.nn.Module, Mapping))


def build_report(table: pd.DataFrame, out: str | Path, *, model_path: str | Path | None = None,
                 activations: pd.DataFrame | None = None, plans: dict | None = None,
                 comparison: pd.DataFrame | None = None, title: str | None = None,
                 plan_comparison: dict | None = None, progress: bool = False, model=None) -> Path:
    """Write ``index.html`` with its PNGs and CSVs into ``out``; returns the index path.

    The ESD section reads its matrices from ``model`` (a model in memory or a state dict), else ``model_path``,
    else the path the scan recorded; a table scanned from a model in memory draws them from ``model=`` only, and
    says so when it is not given.  ``plan_comparison``: a ``layerscope.plan-comparison/2`` document
    (``compare-plans``) to show.  ``progress``: a bar on stderr over the figures, each counted when drawn and when
    written."""
    out = Path(out)
    plans = plans or {}
    attrs = table.attrs
    title = title or default_title(table, model_path)
    source = model if model is not None else model_path or attrs.get("path")
    readable = source is not None and (_in_memory(source) or Path(str(source)).exists())
    esd_names = _esd_choices(table) if readable else []
    figures = (2 + len(esd_names) + (activations is not None) + (comparison is not None) + bool(plans)
               + (plan_comparison is not None) * (1 + bool((plan_comparison or {}).get("budgets"))))
    with tqdm(total=2 * figures, unit="step", desc="report", disable=(not progress) or None) as bar:
        files = _ReportFiles(out, bar)  # every file is written at the end, as one output set
        return _write(table, files, title=title, source=source, esd_names=esd_names, activations=activations,
                      plans=plans, comparison=comparison, plan_comparison=plan_comparison)


def _write(table: pd.DataFrame, files: _ReportFiles, *, title: str | None, source, esd_names: list[str],
           activations: pd.DataFrame | None, plans: dict, comparison: pd.DataFrame | None,
           plan_comparison: dict | None) -> Path:
    attrs, out = table.attrs, files.out
    layers = layer_summary(table)
    warnings = warnings_table(table)
    files.text("scan.csv", table.to_csv(index=False))
    files.text("scan.layers.csv", layers.to_csv(index=False))
    files.text("warnings.csv", warnings.to_csv(index=False))

    sections = [f"<h1>{html.escape(title or 'layerscope report')}</h1>",
                f"<p class='muted'>{html.escape(str(attrs.get('path', '')))}</p>", _summary(table, layers)]
    sections.append(_warnings_section(warnings))

    files.figure(plots.plot_alphas_by_layer(table), "alphas_by_layer")
    files.figure(plots.plot_norms_by_layer(table), "norms_by_layer")
    sections.append("<h2>Spectral metrics by layer</h2>"
                    "<p>Each dot is one projection; the black line is the layer mean over its projections and "
                    "experts (layer_summary; a plan's v_i averages only the modules the plan adapts, see explain). "
                    "Dashed lines mark α = 2 and α = 6.</p>"
                    "<img src='img/alphas_by_layer.png' alt='alphas by layer'>"
                    "<img src='img/norms_by_layer.png' alt='norm metrics by layer'>"
                    + _table_html(layers))

    if has_experts(table):
        files.figure(plot_expert_heatmap(table), "experts_alpha")
        sections.append("<h2>Experts</h2><p>Each cell is one expert of one layer: its α, the mean over its "
                        "projections.  An expert that stands out from its siblings is listed below.</p>"
                        "<img src='img/experts_alpha.png' alt='alpha per layer and expert'>" + outlier_html(table))

    if not esd_names:
        why = ("this table was scanned from a model in memory: pass it as build_report(..., model=MODEL) to draw "
               "them" if str(source or "").startswith("<") else
               f"the matrices cannot be read again ({html.escape(str(source))} is not there); pass model_path= or "
               "model=")
        sections.append(f"<h2>Empirical spectral densities</h2><p class='muted'>Not drawn: {why}.</p>")
    if esd_names:
        figures = []
        for name, eigs in esd_eigenvalues(source, esd_names):
            stem = "esd_" + plots.safe_stem(name)
            files.figure(plots.plot_esd(eigs, name), stem)
            figures.append(f"<img src='img/{stem}.png' alt='ESD of {html.escape(name)}'>")
        sections.append("<h2>Empirical spectral densities</h2><p>The lowest- and highest-α matrices and one per "
                        "layer: log-log ESD with the fitted power law from xmin, lin-lin ESD, and the KS scan "
                        "(D and α against xmin; look for several minima — 'fingers').</p>" + "".join(figures))

    if activations is not None:
        files.figure(plots.plot_near_zero(activations), "near_zero_by_layer")
        flat = activations.drop(columns=[c for c in ("hist_log10",) if c in activations.columns])
        files.text("activations.csv", flat.to_csv(index=False))
        sections.append("<h2>Activations</h2><p>Share of output entries near zero on the calibration text "
                        f"({html.escape(str(activations.attrs.get('calibration', '')))}): HILO's signal for "
                        "layers that need little adapter capacity.</p>"
                        "<img src='img/near_zero_by_layer.png' alt='near-zero fraction by layer'>"
                        "<p><a href='activations.csv'>activations.csv</a></p>")

    if comparison is not None:
        from layerscope.spectral.compare import compare_layers

        changes = compare_layers(comparison)
        names = (model_display_name(comparison.attrs.get("base", "base")),
                 model_display_name(comparison.attrs.get("other", "other")))
        files.figure(plots.plot_compare(changes, names), "compare_alphas")
        shown = [c for c in ("layer", "changed_matrices", "alpha_base", "alpha_other", "delta_alpha",
                             "alpha_hill_base", "alpha_hill_other", "delta_alpha_hill", "delta_log_norm")
                 if c in changes.columns]
        sections.append("<h2>Fine-tune comparison</h2>"
                        f"<p>{html.escape(str(comparison.attrs.get('base', 'base')))} → "
                        f"{html.escape(str(comparison.attrs.get('other', 'other')))}: "
                        f"{int((comparison['diff_status'] != 'zero_matrix').sum())} of {len(comparison)} matrices "
                        "changed.  α before (base) and after (other) by layer:</p>"
                        "<img src='img/compare_alphas.png' alt='alpha before and after by layer'>"
                        + _table_html(changes[shown]))

    if plan_comparison is not None:
        sections.append(_plan_comparison_section(plan_comparison, files))

    if plans:
        files.figure(plots.plot_allocations(plans), "allocations")
        parts = ["<h2>Allocation plans</h2><img src='img/allocations.png' alt='allocations by layer'>"]
        for name, plan in plans.items():
            stem = plots.safe_stem(name)  # plan.json stays plan.json; alphalora becomes plan_alphalora.json
            stem = stem if stem.startswith("plan") else f"plan_{stem}"
            files.text(f"{stem}.json", plan.to_json())
            links = [f"<a href='{stem}.json'>{stem}.json</a>"]
            for fmt, suffix in _export_formats(plan):
                try:
                    files.text(f"{stem}{suffix}", export_plan(plan, fmt))
                    links.append(f"<a href='{stem}{suffix}'>{fmt} export</a>")
                except LayerscopeError as exc:  # a refusal specific to this plan (e.g. PEFT on a Mamba mixer)
                    links.append(f"<span class='muted'>{fmt}: {html.escape(str(exc).split(': ', 1)[-1])}</span>")
            parts.append(f"<h3>{html.escape(name)} <span class='muted'>({html.escape(_plan_kind(plan))})</span></h3>"
                         f"<p>{html.escape(_plan_sizes(plan))} " + " · ".join(links) + "</p>"
                         + _table_html(explain_table(plan)))
        sections.append("".join(parts))

    sections.append("<h2>Tables</h2><p><a href='scan.csv'>scan.csv</a> (per matrix) · "
                    "<a href='scan.layers.csv'>scan.layers.csv</a> (per layer) · "
                    "<a href='warnings.csv'>warnings.csv</a></p>")
    document = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title or 'layerscope')}"
                f"</title><style>{STYLE}</style></head><body>{''.join(sections)}"
                "<p class='muted'>Generated by layerscope.</p></body></html>\n")
    files.text("index.html", document)
    files.commit()
    return out / "index.html"


GENERIC_FOLDER_NAMES = frozenset({"model", "models", "checkpoint", "checkpoints", "weights", "hf", "final", "main",
                                  "snapshot", "snapshots", "output", "out", "merged", "base"})


def model_display_name(path: str | Path) -> str:
    """The name people know a model by: ``org/name`` of a hub cache entry, else the folder name (with its parent's
    when the folder is called something like ``model`` or is a snapshot hash)."""
    parts = Path(str(path)).resolve().parts if path else ()
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    names = [p for p in parts if p not in ("/", "")]
    if not names:
        return "model"
    name = names[-1].removesuffix(".safetensors")
    if (name.lower() in GENERIC_FOLDER_NAMES or _is_hash(name)) and len(names) > 1:
        return f"{names[-2]}/{name}"
    return name


def _is_hash(name: str) -> bool:
    return len(name) >= 32 and all(c in "0123456789abcdef" for c in name.lower())


def default_title(table: pd.DataFrame, model_path: str | Path | None) -> str:
    attrs = table.attrs
    name = model_display_name(model_path or attrs.get("path", ""))
    architecture = attrs.get("architecture") or attrs.get("model_type")
    return f"layerscope report: {name}" + (f" ({architecture})" if architecture else "")


class _ReportFiles:
    """The report's files, gathered in memory and committed as one output set (all new, or the old report)."""

    def __init__(self, out: Path, bar=None):
        self.out, self.bar = out, bar
        self.writers: dict[Path, object] = {}

    def text(self, relative: str, text: str) -> None:
        self.writers[self.out / relative] = lambda tmp: tmp.write_text(text, encoding="utf-8")

    def figure(self, figure, stem: str) -> None:
        def save(tmp: Path) -> None:
            plots.save_to(figure, tmp)
            self._step(f"wrote {stem}")

        self.writers[self.out / "img" / f"{stem}.png"] = save
        self._step(f"drew {stem}")

    def _step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update()

    def commit(self) -> None:
        (self.out / "img").mkdir(parents=True, exist_ok=True)
        write_files(self.writers)


PLAN_COMPARISON_COLUMNS = ("arm", "kind", "budget", "trainer", "baseline", "n", "mean", "ci95_low", "ci95_high", "diff_vs_baseline",
                           "diff_ci95_low", "diff_ci95_high", "p_holm", "mde80", "collapsed", "trainable",
                           "active_per_token", "seconds_per_step", "peak_memory_mib")
PLAN_COMPARISON_SCHEMA = "layerscope.plan-comparison/2"


def _export_formats(plan) -> list[tuple[str, str]]:
    """The trainer exports a plan can have: MoLA's per-layer counts for LoRA experts, PEFT for one adapter per
    module.  MoR experts have neither (they train with layerscope.runtime)."""
    if plan.document["expert_type"] != "lora":
        return []
    mixture = any(layer["experts"] > 1 for layer in plan.layers)
    return [("mola", ".mola.txt")] + ([] if mixture else [("peft", ".peft.json")])


def _plan_kind(plan) -> str:
    """``hilo`` for LoRA experts, ``hilo, MoR experts`` otherwise; says which trainer consumes it."""
    kind = plan.strategy["name"]
    if plan.document["expert_type"] != "lora":
        expert_type = {"mor": "MoR"}.get(plan.document["expert_type"], plan.document["expert_type"])
        kind += f", {expert_type} experts: train with layerscope.runtime"
    elif any(layer["experts"] > 1 for layer in plan.layers):
        kind += ", mixture: MoLA export or layerscope.runtime (PEFT has one adapter per module)"
    return kind


def _plan_sizes(plan) -> str:
    """Trainable and active parameters against the plan's own baselines (their experts, rank and top-k)."""
    acct = plan.accounting
    ratios, moe, single = acct["ratios"], acct["baselines"]["uniform_moe"], acct["baselines"]["single_lora"]
    return (f"trainable {acct['trainable']['total']:,} params ({ratios['trainable_adapters_vs_uniform_moe']:.3f}× "
            f"uniform {moe['experts']}×r{moe['rank']} adapters); active per token "
            f"{acct['active_per_token']['total']:,} ({ratios['active_adapters_vs_single_lora']:.3f}× one "
            f"rank-{single['rank']} LoRA).")


def _plan_comparison_section(document: dict, files: _ReportFiles) -> str:
    if document.get("schema") != PLAN_COMPARISON_SCHEMA:
        raise LayerscopeError(f"--plan-comparison: not a compare-plans document (schema {PLAN_COMPARISON_SCHEMA}; "
                              f"this one says {document.get('schema')!r})")
    files.figure(plots.plot_eval_curves(document), "plan_comparison_curves")
    curve = ""
    if document.get("budgets"):
        files.figure(plots.plot_budget_curves(document), "plan_comparison_budgets")
        left_out = "".join(f"<li>{html.escape(n['arm'])} at {html.escape(n['budget'])}: {html.escape(n['why'])}</li>"
                           for n in document["budgets"].get("left_out", []))
        curve = ("<img src='img/plan_comparison_budgets.png' alt='test metric against trainable parameters per arm'>"
                 + (f"<p>Not fitted:</p><ul>{left_out}</ul>" if left_out else ""))
    files.text("plan_comparison.json", json.dumps(document, indent=1) + "\n")
    rows = pd.DataFrame(document["arms"])
    shown = rows[[c for c in PLAN_COMPARISON_COLUMNS if c in rows.columns]]
    task = document["task"]
    dense = f"<p class='muted'>Mixture vs dense: {html.escape(document['dense_verdict'])}</p>" \
        if document.get("dense_verdict") else ""
    return ("<h2>Do the plans pay? Each strategy against the uniform plan of its own structure</h2>"
            f"<p class='verdict'>{html.escape(document['verdict'])}</p>{dense}"
            f"<p>{html.escape(document['metric'])} on {task['eval_rows']} test rows of {html.escape(task['source'])} "
            f"({task['kind']}), seeds {', '.join(map(str, document['seeds']))}, {document['settings']['steps']} steps "
            f"at learning rate {_rates(document)} ({html.escape(document['learning_rate']['why'])}); "
            "mean over seeds with its 95 % interval, each strategy minus its baseline seed by seed (paired t-test, "
            "Holm-corrected), and the minimum detectable effect at 80 % power.  Curves: validation rows.</p>"
            + curve + "<img src='img/plan_comparison_curves.png' alt='validation curves per arm'>"
            + _table_html(shown) + "<p><a href='plan_comparison.json'>plan_comparison.json</a></p>")


def _rates(document: dict) -> str:
    per_budget = document["learning_rate"].get("per_budget")
    if per_budget:
        return ", ".join(f"{entry['chosen']:g} at {html.escape(label)}" for label, entry in per_budget.items())
    return f"{document['settings']['learning_rate']:g}"


def _summary(table: pd.DataFrame, layers: pd.DataFrame) -> str:
    attrs = table.attrs
    ok = table[table["status"] == "ok"]
    facts = {
        "architecture": attrs.get("architecture") or attrs.get("model_type") or "unknown",
        "naming scheme": attrs.get("naming"),
        "depth": depth_description(attrs),
        "matrices analysed": f"{len(ok)} of {len(table)}",
        "mean alpha (projections)": f"{layers['alpha'].mean():.3f}" if "alpha" in layers else "",
        "mean alpha_hill": f"{layers['alpha_hill'].mean():.3f}" if "alpha_hill" in layers else "",
        "header fingerprint": str(attrs.get("fingerprint", ""))[:16] + "…",
    }
    rows = "".join(f"<tr><th class='l'>{html.escape(k)}</th><td class='l'>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items())
    return f"<h2>Model</h2><table>{rows}</table>"


def _warnings_section(warnings: pd.DataFrame) -> str:
    if warnings.empty:
        return "<h2>Warnings</h2><p class='ok'>Every matrix was analysed and every α is within [2, 6].</p>"
    return (f"<h2>Warnings</h2><p class='warn'>{len(warnings)} matrices are not analysable or have α outside "
            f"[{LOW_ALPHA:g}, {HIGH_ALPHA:g}].</p>" + _table_html(warnings))
