"""MoE experts as their users look at them: the spread of each projection's experts and the ones that stand out."""

from __future__ import annotations

import numpy as np
import pytest

from layerscope import layer_summary, scan
from layerscope.spectral.columns import expert_spread
from tests.builders import matrix_with_spectrum, pareto_eigenvalues, random_matrix, write_checkpoint
from tests.cli_runner import run_cli  # noqa: E402

HIDDEN, FFN, EXPERTS = 64, 96, 8
PLANTED = 5  # layer 1's expert 5: a much heavier tail in its w1 than its siblings


def _mixtral(folder):
    tensors = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = random_matrix(HIDDEN, HIDDEN, seed=layer)
        tensors[f"{prefix}.block_sparse_moe.gate.weight"] = random_matrix(EXPERTS, HIDDEN, seed=50 + layer)
        for j in range(EXPERTS):
            alpha = 1.3 if (layer, j) == (1, PLANTED) else 3.5
            eigs = pareto_eigenvalues(HIDDEN, alpha, seed=100 * layer + j)
            tensors[f"{prefix}.block_sparse_moe.experts.{j}.w1.weight"] = matrix_with_spectrum(eigs, FFN, seed=j)
            tensors[f"{prefix}.block_sparse_moe.experts.{j}.w3.weight"] = random_matrix(FFN, HIDDEN, seed=200 + j)
            tensors[f"{prefix}.block_sparse_moe.experts.{j}.w2.weight"] = random_matrix(HIDDEN, FFN, seed=300 + j)
    return write_checkpoint(folder, tensors, config={"model_type": "mixtral", "num_hidden_layers": 2,
                                                     "hidden_size": HIDDEN, "intermediate_size": FFN,
                                                     "num_attention_heads": 4, "num_local_experts": EXPERTS})


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return scan(_mixtral(tmp_path_factory.mktemp("mixtral")), progress=False)


def test_each_projection_s_experts_spread_with_quartiles_and_tukey_outliers(table):
    spread = expert_spread(table).set_index(["layer", "role"])
    assert len(spread) == 2 * 3 and set(spread["experts"]) == {EXPERTS}
    experts = table[table["kind"] == "expert"]
    w1 = experts[(experts["layer"] == 1) & (experts["role"] == "gate")]
    row = spread.loc[(1, "gate")]
    q1, median, q3 = np.quantile(w1["alpha"], [0.25, 0.5, 0.75])
    assert (row["alpha_q1"], row["alpha_median"], row["alpha_q3"]) == pytest.approx((q1, median, q3), rel=1e-12)
    assert (row["alpha_min"], row["alpha_max"]) == pytest.approx((w1["alpha"].min(), w1["alpha"].max()))
    fences = (q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1))
    outside = sorted(w1.loc[(w1["alpha"] < fences[0]) | (w1["alpha"] > fences[1]), "name"])
    assert sorted(row["outlier_experts"]) == outside and row["alpha_outliers"] == len(outside)
    assert f"model.layers.1.block_sparse_moe.experts.{PLANTED}.w1.weight" in row["outlier_experts"]
    assert {"log_norm_median", "log_norm_outliers"} <= set(spread.columns)


def test_layer_summary_carries_each_moe_layer_s_expert_spread(table):
    layers = layer_summary(table).set_index("layer")
    experts = table[(table["kind"] == "expert") & (table["layer"] == 1)]
    assert layers.loc[1, "expert_alpha_median"] == pytest.approx(float(np.median(experts["alpha"])))
    assert layers.loc[1, "expert_alpha_min"] == pytest.approx(float(experts["alpha"].min()))
    assert layers.loc[1, "expert_alpha_outliers"] >= 1


def test_the_report_and_plot_draw_the_heatmap_and_name_the_outliers(table, tmp_path):

    from layerscope.tables import write_scan
    from layerscope.viz import build_report

    index = build_report(table, tmp_path / "report")
    page = index.read_text()
    assert "img/experts_alpha.png" in page and (tmp_path / "report" / "img" / "experts_alpha.png").stat().st_size > 5000
    assert f"model.layers.1.block_sparse_moe.experts.{PLANTED}.w1.weight</code>: α" in page
    write_scan(table, layer_summary(table), tmp_path / "scan.parquet")
    done = run_cli("plot", str(tmp_path / "scan.parquet"), "--out",
                           str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plots" / "experts_alpha.png").is_file()


def test_a_report_keeps_a_plan_file_s_own_name(table, tmp_path):
    import layerscope
    from layerscope.viz import build_report

    plan = layerscope.plan(table, "uniform", progress=False)
    build_report(table, tmp_path / "r", plans={"plan": plan, "alphalora": plan})
    assert (tmp_path / "r" / "plan.json").is_file() and (tmp_path / "r" / "plan_alphalora.json").is_file()
    assert not (tmp_path / "r" / "plan_plan.json").exists()
