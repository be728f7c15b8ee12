"""Arms trained through PEFT, as users train them: a plan's ``LoraConfig`` (ranks in ``rank_pattern``), and AdaLoRA.

* ``peft``: the plan exported with ``to_peft_config`` (the same dict ``export --format peft`` writes) and
  applied with ``get_peft_model``.  A plan with one expert per module (a uniform LoRA, adaptive-lora, hilo
  with one expert, sensitivity by ranks) trains this way when the comparison holds an ``adalora`` arm, so
  that every rank arm and AdaLoRA share one implementation of LoRA.
* ``adalora``: PEFT's ``AdaLoraConfig`` on the same target modules.  Its *final* budget equals the uniform
  plan's: ``target_r`` is that plan's rank; it starts at ``init_r`` ≈ 1.5 × ``target_r``, keeps every rank
  for the first ``tinit`` steps (10 %), prunes on AdaLoRA's cubic schedule, and holds the final ranks for
  the last ``tfinal`` steps (20 %), re-allocating every ``deltaT`` steps.  transformers' Trainer never
  calls ``update_and_allocate`` (peft issue #432; without it AdaLoRA is a plain SVD-form LoRA), so
  :class:`AdaLoraAllocator` calls it after every optimizer step, before the gradients are zeroed.

AdaLoRA keeps the pruned ranks allocated (masked), so its run records both counts: the parameters it holds
(``trainable_adapters``) and those its final, unmasked ranks use (``adalora_final_params``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from layerscope.errors import LayerscopeError

TRAINERS = ("layerscope", "peft", "adalora")
INIT_SHARE = 1.5  # init_r ≈ 1.5 × target_r
TINIT_SHARE = 0.1
TFINAL_SHARE = 0.2
ALLOCATIONS_PER_RUN = 50  # deltaT = steps / 50: re-allocate about 50 times over a run


@dataclass(frozen=True)
class AdaLoraSchedule:
    target_r: int
    init_r: int
    tinit: int
    tfinal: int
    deltaT: int
    total_step: int

    def as_dict(self) -> dict:
        return asdict(self)


def adalora_schedule(target_r: int, steps: int) -> AdaLoraSchedule:
    """The schedule scaled to ``steps``: a pruning phase of at least one step between tinit and total − tfinal."""
    if target_r < 1:
        raise LayerscopeError(f"AdaLoRA target_r {target_r}: must be >= 1")
    if steps < 3:
        raise LayerscopeError(f"--steps {steps}: AdaLoRA needs at least 3 steps (warm-up, pruning, final ranks)")
    tinit = max(1, round(TINIT_SHARE * steps))
    tfinal = max(1, round(TFINAL_SHARE * steps))
    if steps - tinit - tfinal < 1:
        tinit, tfinal = 1, 1
    init_r = max(target_r + 1, round(INIT_SHARE * target_r))
    return AdaLoraSchedule(target_r, init_r, tinit, tfinal, max(1, steps // ALLOCATIONS_PER_RUN), steps)


def wrap(model, plan, trainer: str, schedule: dict | None = None):
    """``model`` with PEFT adapters for ``plan`` (``trainer`` peft) or AdaLoRA on its modules (``adalora``)."""
    import peft

    from layerscope.export.formats import to_peft_config

    config = to_peft_config(plan)
    if trainer == "peft":
        lora = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                               target_modules=config["target_modules"], rank_pattern=config["rank_pattern"],
                               alpha_pattern=config["alpha_pattern"], fan_in_fan_out=config["fan_in_fan_out"],
                               bias="none", init_lora_weights=config["init_lora_weights"])
    elif trainer == "adalora":
        if schedule is None:
            raise LayerscopeError("an adalora arm needs its schedule (target_r, init_r, tinit, tfinal, total_step)")
        lora = peft.AdaLoraConfig(target_modules=config["target_modules"], lora_alpha=config["lora_alpha"],
                                  lora_dropout=config["lora_dropout"], fan_in_fan_out=config["fan_in_fan_out"],
                                  **schedule)
    else:
        raise LayerscopeError(f"trainer {trainer!r}: expected one of {', '.join(TRAINERS)}")
    return peft.get_peft_model(model, lora)


def allocator_callback():
    """A TrainerCallback that lets AdaLoRA update its importance scores and masks after each optimizer step."""
    import transformers

    class AdaLoraAllocator(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return AdaLoraAllocator()


def final_ranks(model) -> dict[str, int]:
    """AdaLoRA's ranks at the end of training: unmasked singular values per module (lora_E entries not zero)."""
    ranks = {}
    for name, module in model.named_modules():
        values = getattr(module, "lora_E", None)
        if values is not None and "default" in values:
            ranks[name.removeprefix("base_model.model.")] = int((values["default"].detach() != 0).sum())
    return ranks


def final_params(model, ranks: dict[str, int]) -> int:
    """Parameters the final ranks use: r × (in + out) per module (A rows, B columns) plus the r singular values."""
    modules = dict(model.named_modules())
    total = 0
    for name, rank in ranks.items():
        module = modules.get(f"base_model.model.{name}") or modules[name]
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        total += rank * (layer.in_features + layer.out_features + 1)
    return total
