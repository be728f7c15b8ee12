"""The low-rank eigenvalue update (secular equation) against full eigendecompositions, and its use for W + ΔW
spectra while training: accuracy to 1e-9 relative in float64, deflation, both Gram orientations, Conv1D
bases, and the fallback when the check fails."""

from __future__ import annotations

import pytest
import torch

from layerscope.adapters import incremental
from layerscope.adapters.incremental import MergedEigenvalues, gram_update
from layerscope.adapters.updates import Update
from layerscope.errors import LayerscopeError
from layerscope.spectral import secular
from layerscope.spectral.secular import rank_one_update, updated_eigenvalues


def _update(out_features: int, in_features: int, rank: int, seed: int, scaling: float = 2.0) -> Update:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, in_features, generator=generator, dtype=torch.float64) / in_features ** 0.5
    B = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) * 0.05
    return Update("m", None, A, B, scaling, "m.lora_B", "x", "F64")


def _merged_gram(weight: torch.Tensor, update: Update) -> torch.Tensor:
    delta = update.scaling * update.B @ update.A
    merged = weight + (delta if delta.shape == weight.shape else delta.T)
    return merged @ merged.T if merged.shape[0] < merged.shape[1] else merged.T @ merged


def _via_update(weight: torch.Tensor, update: Update):
    gram = weight @ weight.T if weight.shape[0] < weight.shape[1] else weight.T @ weight
    values, vectors = torch.linalg.eigh(gram)
    return updated_eigenvalues(values, vectors, *gram_update(weight, update))


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("out_features,in_features,rank", [(96, 48, 4), (48, 96, 4), (64, 64, 8), (200, 40, 1)])
def test_update_matches_the_full_eigendecomposition(out_features, in_features, rank):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64) / out_features ** 0.5
    update = _update(out_features, in_features, rank, seed=2)
    result = _via_update(weight, update)
    reference = torch.linalg.eigvalsh(_merged_gram(weight, update))
    assert result.unconverged == 0 and result.terms == 2 * rank
    assert _relative_error(result.eigenvalues, reference) <= 1e-9
    large = reference > 1e-6 * reference[-1]  # each eigenvalue, not only in norm
    assert float(((result.eigenvalues - reference).abs() / reference)[large].max()) <= 1e-9
    assert result.invariant_error <= 1e-12


def test_repeated_and_zero_base_eigenvalues_are_deflated():
    generator = torch.Generator().manual_seed(3)
    orthonormal = torch.linalg.qr(torch.randn(80, 40, generator=generator, dtype=torch.float64))[0]  # λ = 1 (40×)
    low_rank = torch.randn(60, 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, 30, generator=generator, dtype=torch.float64)  # 27 zero eigenvalues
    for weight in (orthonormal, low_rank):
        update = _update(*weight.shape, rank=4, seed=4)
        result = _via_update(weight, update)
        reference = torch.linalg.eigvalsh(_merged_gram(weight, update))
        assert result.deflated > 0 and result.unconverged == 0
        assert _relative_error(result.eigenvalues, reference) <= 1e-9


def test_a_zero_update_leaves_the_spectrum():
    weight = torch.randn(50, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    update = _update(50, 20, rank=4, seed=6)
    update.B.zero_()
    result = _via_update(weight, update)
    assert torch.allclose(result.eigenvalues, torch.linalg.eigvalsh(weight.T @ weight), rtol=0, atol=1e-12)


def test_negative_rank_one_terms_and_carried_vectors():
    d = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    z = torch.tensor([0.3, -0.4, 0.5, 0.2], dtype=torch.float64)
    later = torch.eye(4, dtype=torch.float64)
    for rho in (0.7, -0.7):
        values, carried, missed, _ = rank_one_update(d, rho, z, later)
        matrix = torch.diag(d) + rho * torch.outer(z, z)
        reference_values, reference_vectors = torch.linalg.eigh(matrix)
        assert missed == 0 and torch.allclose(values, reference_values, atol=1e-14)
        # carried = Vᵀ·I: the eigenvectors as rows, up to sign
        assert torch.allclose(carried.abs(), reference_vectors.T.abs(), atol=1e-12)


def test_conv1d_base_is_updated_in_its_stored_orientation():
    weight = torch.randn(30, 70, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # (in, out)
    update = _update(70, 30, rank=3, seed=8)  # ΔW is (out, in) = (70, 30)
    result = _via_update(weight, update)
    assert _relative_error(result.eigenvalues, torch.linalg.eigvalsh(_merged_gram(weight, update))) <= 1e-9


def test_merged_source_caches_the_base_and_falls_back_when_the_check_fails(monkeypatch):
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    update = _update(64, 32, rank=2, seed=10)
    reference = torch.linalg.eigvalsh(_merged_gram(weight, update))
    source = MergedEigenvalues("always")
    eigs, note = source.eigenvalues("w", weight, update)
    assert note is None and _relative_error(eigs, reference) <= 1e-9 and list(source.kept) == ["w"]
    monkeypatch.setattr(secular, "MAX_ITERATIONS", 1)  # roots cannot converge in one step
    eigs, note = source.eigenvalues("w", weight, update)
    assert eigs is None and "full eigendecomposition" in note and source.fell_back == 1


def test_merged_source_modes_and_memory_cap():
    assert not MergedEigenvalues("never").wanted((4096, 4096), 1)
    assert MergedEigenvalues("always").wanted((64, 64), 8)
    auto = MergedEigenvalues("auto")
    assert auto.wanted((4096, 11008), 1) and not auto.wanted((384, 384), 8)
    assert auto.wanted((4096, 4096), 1) == (4096 > incremental.SECULAR_COST * 2)
    capped = MergedEigenvalues("always", memory_bytes=100)
    eigs, note = capped.eigenvalues("w", torch.randn(20, 10, dtype=torch.float64), _update(20, 10, 2, seed=11))
    assert eigs is None and note is None and not capped.kept  # over the cap: the full path, silently
    with pytest.raises(LayerscopeError, match="incremental='sometimes'"):
        MergedEigenvalues("sometimes")


def test_watcher_rows_agree_between_the_update_and_the_full_eigensolve():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from layerscope.adapters.watch import SpectraWatcher

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, vocab_size=50)
    model = peft.get_peft_model(transformers.BertModel(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "dense"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)  # a trained-looking update
    tables = {}
    for mode in ("always", "never"):
        watcher = SpectraWatcher(model, every=1, background=False, incremental=mode, estimators=("alpha_hill",))
        watcher.step(1)
        tables[mode] = watcher.close()
        if mode == "always":
            assert watcher.merged_source.updated == 9 and watcher.merged_source.fell_back == 0  # with the pooler
    merged = {mode: table[table["kind"] == "merged"].set_index("name") for mode, table in tables.items()}
    assert len(merged["always"]) == 8
    for column in ("lambda_max", "alpha_hill", "stable_rank", "entropy", "log_norm"):
        assert torch.allclose(torch.tensor(merged["always"][column].to_numpy()),
                              torch.tensor(merged["never"].loc[merged["always"].index, column].to_numpy()),
                              rtol=1e-9, atol=0), column
