"""A real transformers.Trainer run with a MoE plan: router statistics in the logs, the balancing loss in
the routers' gradients, the collapse warning, adapters saved at checkpoints."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import layerscope
from layerscope.runtime import apply_plan

transformers = pytest.importorskip("transformers")
from layerscope.runtime.trainer import LayerscopeTrainer, RouterCollapseWarning, RouterTelemetry  # noqa: E402
from tests.builders import save_tiny_llama  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int = 16, length: int = 12, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (count, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), layers=2)


def _model(folder, top_k=2, coef=0.01):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    plan = layerscope.plan(folder, "uniform", experts=4, rank=4, top_k=top_k, progress=False,
                           lora=layerscope.LoraSettings(router_aux_loss_coef=coef))
    return apply_plan(model, plan, verbose=False)


def _args(tmp_path, **extra):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, logging_steps=1,
                                          report_to=[], use_cpu=True, save_strategy="steps", disable_tqdm=True,
                                          **{"max_steps": 4, "save_steps": 4, "learning_rate": 1e-3, **extra})


def test_trainer_logs_router_statistics_and_saves_adapters(folder, tmp_path):
    model = _model(folder)
    trainer = LayerscopeTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens(),
                                callbacks=[RouterTelemetry()])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "router/layer0/entropy" in e]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    for entry in entries:
        for layer in (0, 1):
            shares = [entry[f"router/layer{layer}/expert{j}_share"] for j in range(4)]
            assert sum(shares) == pytest.approx(1.0) and 0 < entry[f"router/layer{layer}/entropy"] <= 1
    assert (tmp_path / "checkpoint-4" / "layerscope" / "adapter.safetensors").is_file()
    reloaded = layerscope.scan(tmp_path / "checkpoint-4" / "layerscope", progress=False)
    assert set(reloaded["kind"]) == {"delta"}


def test_the_balancing_loss_reaches_the_router_gradients(folder, tmp_path):
    batch = {"input_ids": Tokens().ids[:4], "labels": Tokens().ids[:4]}
    grads = {}
    for name, trainer_class in (("plain", transformers.Trainer), ("layerscope", LayerscopeTrainer)):
        model = _model(folder, coef=1.0)
        trainer = trainer_class(model=model, args=_args(tmp_path / name))
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads[name] = torch.cat([m.router.weight.grad.flatten() for m in model._layerscope["modules"].values()])
    difference = (grads["layerscope"] - grads["plain"]).abs().max()
    assert difference > 1e-6  # the aux term changes exactly the routers' gradients it should


def test_a_forced_collapse_raises_the_warning(folder, tmp_path):
    model = _model(folder, top_k=1)
    with torch.no_grad():
        for module in model._layerscope["modules"].values():
            module.router.weight.zero_()  # equal logits: top-1 always picks the same expert
    trainer = LayerscopeTrainer(model=model, args=_args(tmp_path, learning_rate=0.0), train_dataset=Tokens(),
                                callbacks=[RouterTelemetry(collapse_share=0.9, collapse_windows=3, save=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    collapse = [w for w in caught if issubclass(w.category, RouterCollapseWarning)]
    assert len(collapse) == 2  # once per layer, at the third window
    assert re.search(r"layer 0: expert \d took 100% of the routed tokens for 3", str(collapse[0].message))
