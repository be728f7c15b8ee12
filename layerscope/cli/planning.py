"""Commands that make and use plans: plan, export, explain, and the activations HILO plans from."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from layerscope.cli.group import _command_line, _int_list, cli
from layerscope.errors import LayerscopeError
from layerscope.names import (
    DEFAULT_EPS,
    DEFAULT_REL_EPS,
    EXPORT_FORMATS,
    RANK_ROUNDINGS,
    STRATEGIES,
)
from layerscope.outputs import check_writable


@cli.command("plan")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--strategy", type=click.Choice(STRATEGIES), default="alphalora", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the plan JSON here.")
@click.option("--total-experts", type=int, help="alphalora/mola: experts over all layers (alphalora default 5 per layer: 160 on 32).")
@click.option("--beta", type=float, help="alphalora: exponent of alpha (default 2.5); sensitivity: exponent of the "
              "score (default 1).")
@click.option("--metric", help="alphalora: scan column averaged per layer (default alpha_peak).")
@click.option("--rounding", type=click.Choice(["largest-remainder", "reference"]),
              help="alphalora: sound rounding (default) or the reference code's np.round + fix-up.")
@click.option("--min-experts", type=int, help="alphalora: per-layer minimum (default 1).")
@click.option("--max-experts", type=int, help="alphalora: per-layer maximum.")
@click.option("--rank", type=int, help="alphalora/mola/uniform: LoRA rank (default 8).")
@click.option("--top-k", type=int, help="Experts routed per token (default 2; 1 where a layer has 1).")
@click.option("--shape", help="mola: ▽ △ ⋈ □ or increasing, decreasing, hourglass, uniform (default ▽).")
@click.option("--pattern", callback=_int_list, help="mola: experts per depth group, e.g. 2,4,6,8.")
@click.option("--ranks", callback=_int_list, help="hilo: rank tiers from shallow to deep (default 2,4,6,8).")
@click.option("--experts", type=int, help="hilo/uniform: experts per layer (hilo 8, uniform 1).")
@click.option("--rank-source", type=click.Choice(["depth", "activations"]), help="hilo: tiers by depth (default) "
              "or by near-zero fraction.")
@click.option("--activations", type=click.Path(path_type=Path), help="hilo: table with layer, near_zero_fraction.")
@click.option("--scores", type=click.Path(path_type=Path), help="sensitivity: the table `layerscope sensitivity` "
              "wrote (layer, sensitivity).")
@click.option("--unit", type=click.Choice(["experts", "ranks"]), help="sensitivity/value: spread experts at one "
              "rank (sensitivity's default) or ranks of one expert per module (value: default the table's).")
@click.option("--value", type=click.Path(path_type=Path), help="value: the value.json `layerscope layer-value` "
              "wrote (capacity ∝ each layer group's measured value).")
@click.option("--estimate", type=click.Choice(["add", "drop"]), help="value: plan from the gain of doubling a "
              "group (default) or the loss of dropping it.")
@click.option("--experts-mode", type=click.Choice(["fixed", "inverse-rank"]),
              help="hilo: fixed experts, or experts ∝ 1/rank at the uniform reference's parameter count.")
@click.option("--mode", type=click.Choice(["linear-decay", "attention-heavy", "empirical"]), help="adaptive-lora.")
@click.option("--base-rank", type=int, help="adaptive-lora: r_base (default 16).")
@click.option("--min-rank", type=int, help="adaptive-lora: r_min (default 4).")
@click.option("--max-rank", type=int, help="adaptive-lora: r_max (default 2 x r_base, so a budget scales it; an "
              "explicit cap stops a budget fit below it rather than flattening the profile).")
@click.option("--budget-params", type=int, help="Trainable-parameter budget (adapters + routers).")
@click.option("--budget-ratio", type=float, help="Budget as a multiple of one rank-r LoRA on every target module.")
@click.option("--reference-rank", type=int, default=8, show_default=True, help="r of the uniform baselines.")
@click.option("--reference-experts", type=int, default=8, show_default=True, help="Experts of the uniform MoE baseline.")
@click.option("--target-roles", help="Comma-separated roles to adapt (default: every projection; a MoE model's "
              "expert MLPs only when gate,up,down are named: PEFT adapts them as target_parameters).")
@click.option("--expert-type", type=click.Choice(["lora", "mor"]), default="lora", show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True,
              help="lora_alpha of every module (MoLA/AlphaLoRA train with 16).")
@click.option("--alpha-scale", type=float, help="Instead: lora_alpha = scale x rank (constant alpha/r).")
@click.option("--dropout", type=float, help="LoRA dropout [default: 0.05; 0 for a plan of fused expert MLPs, "
              "which PEFT trains without dropout].")
@click.option("--init", type=click.Choice(["kaiming-uniform", "gaussian"]), default="kaiming-uniform",
              show_default=True, help="Initialisation of A (B starts at zero).")
@click.option("--aux-loss-coef", type=float, default=0.0, show_default=True,
              help="Load-balancing loss coefficient for the runtime (0 = off; Mixtral uses 0.001).")
@click.option("--optimizer", help="Per-layer optimizer multipliers: tempbalance (lr), alphadecay (weight "
              "decay), or both comma-separated.")
@click.option("--optimizer-metric", default="alpha_hill", show_default=True,
              help="Scan column the optimizer multipliers follow.")
@click.option("--include-towers", is_flag=True, help="Also plan the vision/audio towers' blocks (default: the "
              "language model only).")
@click.option("--allow-unmapped", is_flag=True, help="Plan a model whose blocks hold Linear layers of no known role "
              "(they get no adapters).")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_context
def plan_command(ctx: click.Context, source: Path, strategy: str, out: Path | None, budget_params: int | None,
                 budget_ratio: float | None, reference_rank: int, reference_experts: int, target_roles: str | None,
                 expert_type: str, lora_alpha: float, alpha_scale: float | None, dropout: float, init: str,
                 aux_loss_coef: float, optimizer: str | None, optimizer_metric: str, include_towers: bool,
                 allow_unmapped: bool, quiet: bool, **options) -> None:
    """Allocate experts, ranks and top-k per layer (SOURCE: a model folder or a scan table)."""
    from layerscope.planning import STRATEGIES as STRATEGY_FUNCTIONS
    from layerscope.planning import LoraSettings
    from layerscope.planning import plan as make_plan
    from layerscope.planning.explain import explain_text

    accepted = set(inspect.signature(STRATEGY_FUNCTIONS[strategy]).parameters)
    strategy_params = {}
    for option, value in options.items():  # the remaining options are named as the strategies' keywords
        if value is None:
            continue
        if option not in accepted:
            raise LayerscopeError(f"--{option.replace('_', '-')} does not apply to --strategy {strategy}")
        strategy_params[option] = str(value) if isinstance(value, Path) else value
    if out is not None and out.suffix != ".json":
        raise LayerscopeError(f"--out {out}: a plan is a .json file")
    if out is not None:
        check_writable([out])
    lora = LoraSettings(alpha_scale=alpha_scale, fixed_alpha=lora_alpha, dropout=dropout, init=init,
                        router_aux_loss_coef=aux_loss_coef)
    roles = [r.strip() for r in target_roles.split(",") if r.strip()] if target_roles else None
    the_plan = make_plan(source, strategy, budget_params=budget_params, budget_ratio=budget_ratio,
                         target_roles=roles, expert_type=expert_type, lora=lora, reference_rank=reference_rank,
                         reference_experts=reference_experts, command=_command_line(ctx), progress=not quiet,
                         optimizer=[m.strip() for m in optimizer.split(",") if m.strip()] if optimizer else None,
                         optimizer_metric=optimizer_metric, include_towers=include_towers,
                         allow_unmapped=allow_unmapped, **strategy_params)
    if out is not None:
        the_plan.save(out)
    if not quiet:
        click.echo(explain_text(the_plan))
        if out is not None:
            click.echo(f"wrote {out}")
    else:
        from layerscope.planning.explain import oversized_line

        oversized = oversized_line(the_plan)
        if oversized:
            click.echo(oversized, err=True)


@cli.command("export")
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write here instead of stdout.")
@click.option("--round-ranks", type=click.Choice(RANK_ROUNDINGS), help="Round every rank up to what a serving "
              "engine takes (vllm: 8, 16, 32, 64, 128, 256, 320, 512); the parameter change goes to stderr.")
@click.option("--check-model", type=click.Path(path_type=Path), help="peft/axolotl: check every pattern key and "
              "target names exactly one module of this checkpoint (default: the plan's model, when present).")
@click.option("--allow-other-model", is_flag=True, help="Accept a --check-model that is not the plan's model "
              "(other shapes, layer count or tensors).")
def export_command(plan_file: Path, fmt: str, out: Path | None, round_ranks: str | None,
                   check_model: Path | None, allow_other_model: bool) -> None:
    """Export a plan for a trainer: PEFT LoraConfig JSON, axolotl YAML, MoE-PEFT MixLoRA JSON, MoLA
    arguments, or a CSV table."""
    from layerscope.export import export_plan
    from layerscope.export.trainers import export_modules, rounding_report
    from layerscope.planning import Plan

    plan = Plan.load(plan_file)
    if check_model is None and fmt in ("peft", "axolotl"):
        if Path(plan.model["path"]).exists():
            check_model = Path(plan.model["path"])
        else:
            click.echo(f"note: the plan's model {plan.model['path']} is not here; module names exported unchecked "
                       "(--check-model PATH checks them)", err=True)
    if out is not None:
        check_writable([out])
    text = export_plan(plan, fmt, out, round_ranks=round_ranks, check_model=check_model,
                       allow_other_model=allow_other_model)
    if round_ranks is not None:
        click.echo(rounding_report(plan, export_modules(plan, round_ranks), round_ranks), err=True)
    click.echo(f"wrote {out}" if out is not None else text, nl=out is not None)


@cli.command("explain")
@click.argument("plan_file", type=click.Path(path_type=Path))
def explain_command(plan_file: Path) -> None:
    """Per-layer table of a plan: metric, experts, rank, top-k and parameters."""
    from layerscope.planning import Plan
    from layerscope.planning.explain import explain_text

    click.echo(explain_text(Plan.load(plan_file)))


@cli.command("recount")
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the recounted plan here (default: in place).")
def recount_command(plan_file: Path, out: Path | None) -> None:
    """Recompute a hand-edited plan's accounting (parameters, ratios, budget use) from its layers."""
    from layerscope.planning.plan import recount
    from layerscope.strictjson import strict_json

    if not plan_file.is_file():
        raise LayerscopeError(f"{plan_file}: no such plan file")
    target = out or plan_file
    check_writable([target])
    plan, changes = recount(strict_json(plan_file.read_bytes(), str(plan_file)), str(plan_file))
    if not changes:
        click.echo(f"{plan_file}: accounting already matches the layers; nothing to do")
        if out is None:
            return
    plan.save(target)
    for change in changes:
        click.echo(change)
    click.echo(f"wrote {target}")


@cli.command("activations")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Text (.txt) or JSONL (.jsonl, field 'text'); "
              "default: the calibration text bundled with layerscope.")
@click.option("--max-samples", type=int, default=128, show_default=True, help="Sequences to run.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Document shuffling seed.")
@click.option("--eps", type=float, default=DEFAULT_EPS, show_default=True, help="Absolute near-zero threshold.")
@click.option("--rel-eps", type=float, default=DEFAULT_REL_EPS, show_default=True,
              help="Near-zero threshold relative to each token's output RMS.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Write the table (.parquet, .csv or .json).")
@click.option("--quiet", "-q", is_flag=True)
def activations_command(model: Path, calib: Path | None, max_samples: int, seq_len: int, batch_size: int, seed: int,
                        eps: float, rel_eps: float, device: str, dtype: str, out: Path | None, quiet: bool) -> None:
    """Near-zero fractions of every layer's and projection's outputs on calibration text."""
    from layerscope.activations import layer_fractions, measure
    from layerscope.tables import output_format, write_activations

    if out is not None:
        output_format(out)
        check_writable([out])
    table = measure(model, calib, max_samples=max_samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    eps=eps, rel_eps=rel_eps, device=device, dtype=dtype, progress=not quiet)
    if out is not None:
        write_activations(table, out)
    if not quiet:
        attrs = table.attrs
        click.echo(f"{model}: {attrs['samples']} sequences x {attrs['seq_len']} tokens from {attrs['calibration']}; "
                   f"near-zero = |x| <= {rel_eps} x token RMS (abs: |x| <= {eps})")
        click.echo(layer_fractions(table).to_string(index=False, float_format="%.4f"))
        if out is not None:
            click.echo(f"wrote {out}")
