"""One fine-tuning run: a plan applied to the model, trained on the task with one seed, evaluated as it goes.

Training goes through the Trainer integration (``LayerscopeTrainer``: the plan's balancing loss;
``RouterTelemetry``), with the seed fixing the initialisation and the data order, so a run is
reproducible and every plan sees the same batches in the same order for a given seed.  A
classification model's new head (``classifier`` / ``score``) trains with the adapters in every plan
alike; its parameters are reported apart from the plan's.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from layerscope.errors import LayerscopeError
from layerscope.experiments.task import Task
from layerscope.planning.plan import Plan
from layerscope.spectral.scan import peak_memory_mib

HEAD_NAMES = ("classifier", "score", "pre_classifier")


@dataclass(frozen=True)
class Settings:
    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 16
    eval_every: int = 10
    max_length: int = 64
    device: str = "auto"

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "max_length"):
            if getattr(self, name) < 1:
                raise LayerscopeError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not self.learning_rate > 0:
            raise LayerscopeError(f"--lr {self.learning_rate}: must be > 0")


def metric_name(task: Task) -> str:
    return "accuracy" if task.kind == "classification" else "eval_loss"


def higher_is_better(task: Task) -> bool:
    return task.kind == "classification"


def train_run(model_path: str, plan: Plan, task: Task, seed: int, settings: Settings) -> dict:
    """Train ``plan`` on ``task`` with ``seed``; returns the run's record (curve, final metric, costs)."""
    import transformers

    from layerscope.runtime import apply_plan
    from layerscope.runtime.trainer import LayerscopeTrainer, RouterTelemetry

    device = _device(settings.device)
    transformers.set_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _model(model_path, task)
    apply_plan(model, plan, verbose=False)
    head = _train_head(model)
    adapters = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name not in head)
    train = _examples(tokenizer, task.train_texts, task.train_labels, task.kind, settings.max_length)
    curve = _Curve(task, tokenizer, settings, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="layerscope-compare-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LayerscopeTrainer(
            model=model, train_dataset=train,
            data_collator=transformers.DataCollatorWithPadding(tokenizer) if task.kind == "classification"
            else transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[RouterTelemetry(every=settings.eval_every, save=False), curve],
            args=transformers.TrainingArguments(
                output_dir=scratch, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                seed=seed, data_seed=seed, logging_steps=settings.eval_every, save_strategy="no", report_to=[],
                use_cpu=device.type == "cpu", disable_tqdm=True, log_level="error"))
        for noisy in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
            trainer.remove_callback(noisy)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seed": seed, "metric": metric_name(task), "final": curve.points[-1][1], "curve": curve.points,
            "train_loss": losses, "trainable_adapters": adapters, "trainable_head": sum(head.values()),
            "plan_trainable": plan.accounting["trainable"]["total"],
            "plan_active_per_token": plan.accounting["active_per_token"]["total"],
            "seconds_per_step": seconds / settings.steps, "peak_memory_mib": peak_memory_mib(device),
            "device": str(device)}


def _device(name: str) -> torch.device:
    from layerscope.spectral.esd import resolve_device

    return resolve_device(name)


def _model(path: str, task: Task):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "newly initialized head" is expected here
        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per run is noise
        try:
            if task.kind == "classification":
                return transformers.AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=task.num_labels, local_files_only=True)
            return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise LayerscopeError(f"{path}: transformers cannot build a {task.kind} model from it "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        finally:
            transformers.logging.set_verbosity(verbosity)
            transformers.utils.logging.enable_progress_bar()


def _train_head(model) -> dict[str, int]:
    """The task head's parameters (new for classification) are trained in every plan alike."""
    head = {}
    for name, parameter in model.named_parameters():
        if any(part in HEAD_NAMES for part in name.split(".")):
            parameter.requires_grad_(True)
            head[name] = parameter.numel()
    return head


def _examples(tokenizer, texts: list[str], labels: list[int], kind: str, max_length: int) -> list[dict]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    if kind == "classification":
        for row, label in zip(rows, labels):
            row["labels"] = label
    return rows


class _Curve:
    """Evaluates every ``eval_every`` steps (and before the first): the curve of the task's metric."""

    def __new__(cls, task: Task, tokenizer, settings: Settings, device: torch.device):
        import transformers

        class Curve(transformers.TrainerCallback):
            points: list

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.points = [[0, evaluate(model, tokenizer, task, settings, device)]]

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % settings.eval_every == 0 or state.global_step == settings.steps:
                    if self.points[-1][0] != state.global_step:
                        self.points.append([state.global_step, evaluate(model, tokenizer, task, settings, device)])

        return Curve()


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, settings: Settings, device: torch.device) -> float:
    """Accuracy (classification) or mean token loss (causal LM) on the evaluation rows."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum, tokens = 0, 0, 0.0, 0
    for start in range(0, len(task.eval_texts), 64):
        texts = task.eval_texts[start:start + 64]
        batch = tokenizer(texts, truncation=True, max_length=settings.max_length, padding=True,
                          return_tensors="pt").to(device)
        if task.kind == "classification":
            predictions = model(**batch).logits.argmax(-1).cpu()
            correct += int((predictions == torch.tensor(task.eval_labels[start:start + 64])).sum())
            total += len(texts)
        else:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            count = int((labels[:, 1:] != -100).sum())
            loss_sum += float(model(**batch, labels=labels).loss) * count
            tokens += count
    model.train(was_training)
    return correct / total if task.kind == "classification" else (loss_sum / tokens if tokens else math.nan)
