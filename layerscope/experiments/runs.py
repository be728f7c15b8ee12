"""One fine-tuning run: a plan applied to the model, trained on the task with one seed, evaluated as it goes.

Training goes through the Trainer integration (``LayerscopeTrainer``: the plan's balancing loss;
``RouterTelemetry``), with the seed fixing the initialisation and the data order, so a run is
reproducible and every plan sees the same batches in the same order for a given seed.  A
classification model's new head (``classifier`` / ``score``) trains with the adapters in every plan
alike; its parameters are reported apart from the plan's.  A causal-LM run needs the model's own LM
head: a checkpoint whose head transformers would initialise at random is refused.

The curve is measured on the validation rows; the run's ``final`` number on the test rows, once, at
the end.  ``peak_memory_mib`` is the run's own peak (the accelerator allocator's peak since the run
began, or on the CPU the resident set sampled every 20 ms during the run, minus the resident set
before the model was built, after returning freed memory to the OS), so it does not depend on the order
of the runs in one process.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from layerscope.errors import LayerscopeError
from layerscope.experiments.task import Task
from layerscope.planning.plan import Plan

HEAD_NAMES = ("classifier", "score", "pre_classifier")
SCHEDULERS = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class Settings:
    steps: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 16
    eval_every: int = 10
    max_length: int = 64
    device: str = "auto"
    scheduler: str = "linear"  # after warm-up: linear decay to 0 (the usual LoRA fine-tuning schedule)
    warmup_ratio: float = 0.1

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "max_length"):
            if getattr(self, name) < 1:
                raise LayerscopeError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise LayerscopeError(f"--lr {self.learning_rate}: must be a finite number > 0")
        if self.scheduler not in SCHEDULERS:
            raise LayerscopeError(f"--scheduler {self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.warmup_ratio < 1:
            raise LayerscopeError(f"--warmup-ratio {self.warmup_ratio}: must be in [0, 1)")


def metric_name(task: Task) -> str:
    return "accuracy" if task.kind == "classification" else "eval_loss"


def higher_is_better(task: Task) -> bool:
    return task.kind == "classification"


def train_run(model_path: str, plan: Plan, task: Task, seed: int, settings: Settings,
              log: Callable[[str], None] | None = None, trainer: str = "layerscope",
              schedule: dict | None = None) -> dict:
    """Train ``plan`` on ``task`` with ``seed``; returns the run's record (validation curve, test metric, costs).

    ``trainer``: ``layerscope`` (the plan applied by layerscope.runtime), ``peft`` (its PEFT LoraConfig) or
    ``adalora`` (PEFT's AdaLoRA with ``schedule``; see :mod:`layerscope.experiments.peft_arms`)."""
    import transformers

    from layerscope.experiments import peft_arms
    from layerscope.runtime import apply_plan
    from layerscope.runtime.trainer import LayerscopeTrainer, RouterTelemetry

    device = _device(settings.device)
    transformers.set_seed(seed)
    tokenizer = load_tokenizer(model_path)
    extra: dict = {}
    with _PeakMemory(device) as memory, tempfile.TemporaryDirectory(prefix="layerscope-compare-") as scratch, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(model_path, task)
        if trainer == "layerscope":
            apply_plan(model, plan, verbose=False)
        else:
            model = peft_arms.wrap(model, plan, trainer, schedule)
        head = _train_head(model)
        adapters = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and name not in head)
        train = examples(tokenizer, task, "train", settings.max_length)
        curve = _Curve(task, tokenizer, settings, device, log)
        hf_trainer = LayerscopeTrainer(
            model=model, train_dataset=train,
            data_collator=transformers.DataCollatorWithPadding(tokenizer) if task.kind == "classification"
            else _LanguageModelCollator(tokenizer.pad_token_id),
            callbacks=[curve, *([RouterTelemetry(every=settings.eval_every, save=False)] if trainer == "layerscope"
                                else []), *([peft_arms.allocator_callback()] if trainer == "adalora" else [])],
            args=transformers.TrainingArguments(
                output_dir=scratch, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
                learning_rate=settings.learning_rate, lr_scheduler_type=settings.scheduler,
                warmup_steps=round(settings.warmup_ratio * settings.steps), weight_decay=0.0,
                seed=seed, data_seed=seed, logging_steps=settings.eval_every, save_strategy="no", report_to=[],
                use_cpu=device.type == "cpu", disable_tqdm=True, log_level="error"))
        for noisy in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
            hf_trainer.remove_callback(noisy)
        started = time.perf_counter()
        hf_trainer.train()
        seconds = time.perf_counter() - started
        final = evaluate(model, tokenizer, task, settings, device, split="test")
        if trainer == "adalora":
            ranks = peft_arms.final_ranks(model)
            extra = {"adalora_final_ranks": ranks, "adalora_final_params": peft_arms.final_params(model, ranks)}
    losses = [entry["loss"] for entry in hf_trainer.state.log_history if "loss" in entry]
    return {"seed": seed, "metric": metric_name(task), "final": final, "final_validation": curve.points[-1][1],
            "curve": curve.points, "train_loss": losses, "trainable_adapters": adapters,
            "trainable_head": sum(head.values()), "plan_trainable": plan.accounting["trainable"]["total"],
            "plan_active_per_token": plan.accounting["active_per_token"]["total"],
            "learning_rate": settings.learning_rate, "seconds_per_step": seconds / settings.steps,
            "peak_memory_mib": memory.peak_mib, "device": str(device), "trainer": trainer, **extra}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(model_path: str):
    """The model folder's tokenizer, or one line naming the folder (checked before any training).  A folder with
    no tokenizer file is refused: transformers would build a tokenizer with an empty vocabulary (every word unknown)."""
    from pathlib import Path

    import transformers

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LayerscopeError(f"{model_path}: no usable tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, …); "
                              "copy the tokenizer files of the model into the folder")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing/broken tokenizer
        raise LayerscopeError(f"{model_path}: no usable tokenizer (tokenizer.json / tokenizer_config.json / vocab "
                              f"files): {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"
                              ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_for_task(model_path: str, task: Task) -> None:
    """Before any work: a tokenizer exists, and a causal-LM task gets a model with its own causal-LM head."""
    import json
    from pathlib import Path

    load_tokenizer(model_path)
    if task.kind != "causal-lm":
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = Path(model_path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise LayerscopeError(f"{config_path}: missing or not JSON; a causal-LM comparison needs the model's config") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if not any(a in causal for a in architectures):
        named = ", ".join(architectures) or "no architectures field"
        raise LayerscopeError(f"{config_path}: architectures {named}: not a causal language model with its LM head "
                              "(--task-kind causal-lm would train a randomly initialised head); use a *ForCausalLM "
                              "checkpoint, or --task-kind classification")


class _PeakMemory:
    """The run's own peak memory (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib, self._stop = device, math.nan, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_memory()
        self._base = self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mib = (max(self._peak, _rss_bytes()) - self._base) / 2**20


def _release_freed_memory() -> None:
    """Return memory freed by earlier runs to the OS (glibc keeps it for reuse, so a later run would otherwise grow
    into it without raising the resident set, and read as nearly free)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is simply less exact
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            import os

            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                            output_loading_info=True)
            if info.get("missing_keys"):
                missing = sorted(info["missing_keys"])
                raise LayerscopeError(f"{path}: {len(missing)} weights of the causal-LM model are not in the checkpoint "
                                      f"(first: {missing[0]}); their head would train from random values")
            return model
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


def examples(tokenizer, task: Task, split: str, max_length: int) -> list[dict]:
    """Tokenized rows of a split.  Causal LM: labels are the tokens to predict — the whole text, or with
    prompts only the completion and the end-of-sequence token (the prompt is context, as in instruction
    tuning); a row longer than ``max_length`` loses the start of its prompt, never its completion."""
    texts, labels, prompts = task.split(split)
    if task.kind == "classification":
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return [{**{key: encoded[key][i] for key in encoded}, "labels": label} for i, label in enumerate(labels)]
    rows = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, text in enumerate(texts):
        if prompts:
            context = tokenizer(prompts[i])["input_ids"]
            target = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            context = context[max(0, len(context) + len(target) - max_length):]
            ids, label_ids = context + target, [-100] * len(context) + target
        else:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            label_ids = list(ids)
        rows.append({"input_ids": ids[:max_length], "attention_mask": [1] * len(ids[:max_length]),
                     "labels": label_ids[:max_length]})
    return rows


def collator(task: Task, tokenizer):
    """Pads a list of :func:`examples` rows into a batch (classification: the tokenizer's; causal LM: labels -100)."""
    import transformers

    if task.kind == "causal-lm":
        return _LanguageModelCollator(tokenizer.pad_token_id)
    return transformers.DataCollatorWithPadding(tokenizer)


class _LanguageModelCollator:
    """Right-pads input ids, attention masks and labels (-100 on padding) to the longest row of the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows])

        return {"input_ids": padded("input_ids", self.pad_id), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", -100)}


class _Curve:
    """Evaluates the validation rows every ``eval_every`` steps (and before the first): the curve of the metric."""

    def __new__(cls, task: Task, tokenizer, settings: Settings, device: torch.device,
                log: Callable[[str], None] | None = None):
        import transformers

        class Curve(transformers.TrainerCallback):
            points: list

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.points = [[0, evaluate(model, tokenizer, task, settings, device)]]
                self.started = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % settings.eval_every == 0 or state.global_step == settings.steps:
                    if self.points[-1][0] != state.global_step:
                        value = evaluate(model, tokenizer, task, settings, device)
                        self.points.append([state.global_step, value])
                        if log is not None:
                            log(f"step {state.global_step}/{settings.steps}: validation {metric_name(task)} "
                                f"{value:.4f} ({time.perf_counter() - self.started:.0f} s)")

        return Curve()


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, settings: Settings, device: torch.device, split: str = "validation") -> float:
    """Accuracy (classification) or mean loss per predicted token (causal LM) on the validation or test rows."""
    rows = examples(tokenizer, task, split, settings.max_length)
    collate = collator(task, tokenizer)
    was_training = model.training
    model.eval()
    correct, total, loss_sum, tokens = 0, 0, 0.0, 0
    for start in range(0, len(rows), 64):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + 64]).items()}
        if task.kind == "classification":
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
        else:
            count = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**batch).loss) * count
            tokens += count
    model.train(was_training)
    return correct / total if task.kind == "classification" else (loss_sum / tokens if tokens else math.nan)
