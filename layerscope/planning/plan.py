"""The versioned plan document: build, save (deterministic, atomic), load and validate."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from layerscope.errors import LayerscopeError
from layerscope.planning.accounting import Accounting, accounting_report, baselines_of, report_of
from layerscope.planning.inputs import PlanInputs
from layerscope.strictjson import strict_json
from layerscope.tables import atomic_write, jsonable

SCHEMA_ID = "layerscope.plan/1"
# Documents of ours that are not plans, and what to call them when one is given as a plan.
OTHER_DOCUMENTS = {"layerscope.scan/1": "a scan (make a plan from it with `layerscope plan FILE`)",
                   "layerscope.activations/1": "an activation table",
                   "layerscope.compare/1": "a compare table"}
EXPERT_TYPES = ("lora", "mor")
INITS = ("kaiming-uniform", "gaussian")


@dataclass(frozen=True)
class LoraSettings:
    """How adapters are scaled and initialised.

    lora_alpha is ``fixed_alpha`` for every module (16, as MoLA and AlphaLoRA train), or
    ``alpha_scale`` × rank when a scale is given instead (constant alpha/r across ranks).
    """

    alpha_scale: float | None = None
    fixed_alpha: float | None = 16.0
    dropout: float | None = None  # None: 0.05, or 0 for a plan of fused expert parameters (PEFT takes none there)
    init: str = "kaiming-uniform"
    router_aux_loss_coef: float = 0.0

    def alpha_for(self, rank: int) -> float:
        if self.alpha_scale is not None:
            return float(self.alpha_scale * rank)
        if self.fixed_alpha is None:
            raise LayerscopeError("lora settings need fixed_alpha or alpha_scale")
        return float(self.fixed_alpha)

    def for_targets(self, fused_experts: bool) -> LoraSettings:
        """The settings with the dropout decided: PEFT trains a fused expert parameter (target_parameters)
        without dropout and refuses any other value, so such a plan defaults to 0 and refuses an explicit one."""
        if not fused_experts:
            return replace(self, dropout=0.05 if self.dropout is None else self.dropout)
        if self.dropout:
            raise LayerscopeError(f"--dropout {self.dropout}: PEFT adapts the model's fused expert MLPs without "
                                  "dropout (target_parameters); use --dropout 0 or leave it unset")
        return replace(self, dropout=0.0)

    def as_dict(self) -> dict:
        scaled = self.alpha_scale is not None
        return {"alpha_scale": self.alpha_scale if scaled else None,
                "fixed_alpha": None if scaled else self.fixed_alpha,
                "dropout": 0.05 if self.dropout is None else self.dropout, "init": self.init,
                "router_aux_loss_coef": self.router_aux_loss_coef}


class Plan:
    """A validated ``layerscope.plan/1`` document (a plain dict underneath)."""

    def __init__(self, document: dict, source: str = "plan", *, check_accounting: bool = True):
        self.document = document
        self.source = source
        self.validate(check_accounting)

    # ---- access
    @property
    def layers(self) -> list[dict]:
        return self.document["layers"]

    @property
    def model(self) -> dict:
        return self.document["model"]

    @property
    def strategy(self) -> dict:
        return self.document["strategy"]

    @property
    def accounting(self) -> dict:
        return self.document["accounting"]

    def modules(self) -> list[dict]:
        """Flat list: every planned module with its layer's experts and top-k."""
        return [{**m, "layer": layer["layer"], "experts": layer["experts"], "top_k": layer["top_k"]}
                for layer in self.layers for m in layer["modules"] if layer["experts"] > 0]

    # ---- serialisation
    def to_json(self) -> str:
        """The document as deterministic, strict JSON text (NaN refused), as ``save`` writes it."""
        return json.dumps(self.document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path`` atomically (whole or not at all); returns the path."""
        path = Path(path)
        text = self.to_json()
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    @classmethod
    def loads(cls, text: str, source: str = "plan") -> Plan:
        """A plan from JSON text, validated (schema, then the facts a schema cannot say: accounting, ranks)."""
        return cls(strict_json(text.encode("utf-8", "surrogatepass"), source), source)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """A plan file, validated; a missing file, non-UTF-8 text or an invalid document is one LayerscopeError."""
        path = Path(path)
        if not path.is_file():
            raise LayerscopeError(f"{path}: no such plan file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LayerscopeError(f"{path}: not UTF-8 text") from None
        return cls.loads(text, str(path))

    # ---- checks
    def validate(self, check_accounting: bool = True) -> None:
        """JSON Schema first (errors name the JSON path), then the facts a schema cannot say."""
        import jsonschema

        if not isinstance(self.document, dict):
            raise LayerscopeError(f"{self.source}: $: a plan is a JSON object")
        schema = self.document.get("schema")
        if schema in OTHER_DOCUMENTS:
            raise LayerscopeError(f"{self.source}: this is {OTHER_DOCUMENTS[schema]}, not a plan (schema {schema!r})")
        errors = sorted(_validator().iter_errors(self.document), key=lambda e: list(e.absolute_path))
        if errors:
            error = jsonschema.exceptions.best_match(errors)
            raise LayerscopeError(f"{self.source}: {error.json_path}: {error.message}")
        self._check_consistency(check_accounting)

    def _check_module_redundancy(self, where: str, j: int, layer: dict, module: dict) -> None:
        """A module repeats its layer's rank (capped at its matrix size) and the alpha the lora settings give it;
        an edit to one copy only would make exports and the runtime disagree about the plan."""
        per_role = self.strategy["name"] == "adaptive-lora" and self.strategy["params"].get("mode") == "attention-heavy"
        capped = min(layer["rank"], module["in_features"], module["out_features"])
        if (module["rank"] > capped) if per_role else (module["rank"] != capped):
            raise LayerscopeError(f"{where}.modules[{j}].rank: {module['rank']} disagrees with the layer's rank "
                                  f"{layer['rank']} (edit both, or re-plan)")
        lora = self.document["lora"]
        expected = (lora["alpha_scale"] * module["rank"] if lora.get("alpha_scale") is not None
                    else lora.get("fixed_alpha"))
        if expected is not None and abs(module["lora_alpha"] - expected) > 1e-9 * max(1.0, abs(expected)):
            raise LayerscopeError(f"{where}.modules[{j}].lora_alpha: {module['lora_alpha']} disagrees with the lora "
                                  f"settings ({expected} for rank {module['rank']})")

    def _check_consistency(self, check_accounting: bool = True) -> None:
        seen = set()
        num_layers = self.model["num_layers"]
        for i, layer in enumerate(self.layers):
            where = f"{self.source}: $.layers[{i}]"
            if layer["layer"] in seen:
                raise LayerscopeError(f"{where}.layer: layer {layer['layer']} appears twice")
            seen.add(layer["layer"])
            if layer["layer"] >= num_layers:
                raise LayerscopeError(f"{where}.layer: {layer['layer']} >= model.num_layers ({num_layers})")
            if layer["experts"] > 0 and layer["top_k"] > layer["experts"]:
                raise LayerscopeError(f"{where}.top_k: {layer['top_k']} > experts ({layer['experts']})")
            for j, module in enumerate(layer["modules"]):
                if module["rank"] > min(module["in_features"], module["out_features"]):
                    raise LayerscopeError(f"{where}.modules[{j}].rank: {module['rank']} exceeds the matrix size "
                                          f"{module['out_features']}x{module['in_features']}")
                self._check_module_redundancy(where, j, layer, module)
        if not check_accounting:
            return
        stored = self.accounting
        recomputed = _recount(self)
        for field in ("trainable", "active_per_token"):
            if stored[field] != recomputed[field]:
                raise LayerscopeError(f"{self.source}: $.accounting.{field}: {stored[field]} does not match the "
                                      f"layers ({recomputed[field]}); after editing layers by hand, run "
                                      "`layerscope recount PLAN` to recompute it")

    def check_model(self, num_layers: int, fingerprint: str | None = None, where: str = "model") -> None:
        """Refuse a model this plan was not made for."""
        if num_layers != self.model["num_layers"]:
            raise LayerscopeError(f"{self.source}: plan is for {self.model['num_layers']} layers but {where} has "
                                  f"{num_layers}")
        if fingerprint is not None and fingerprint != self.model["fingerprint"]:
            raise LayerscopeError(f"{self.source}: plan was made for a model with other tensors/shapes than {where} "
                                  "(header fingerprint differs)")


def recount(document: dict, source: str = "plan") -> tuple[Plan, list[str]]:
    """A hand-edited plan with its accounting recomputed from its layers: counts, ratios against the same
    baselines (reference rank, experts and top-k as stored) and the budget's use.  Everything else is checked
    as on load.  Returns the plan and what changed, one line each.  A plan now over its budget is refused."""
    from layerscope import __version__

    plan = Plan(document, source, check_accounting=False)
    old = plan.accounting
    counts = _recount(plan)
    base = old["baselines"]
    shapes = [(m["in_features"], m["out_features"], m.get("model_experts", 1))
              for layer in plan.layers for m in layer["modules"]]
    new = report_of(Accounting(counts["trainable"]["adapters"], counts["trainable"]["routers"],
                               counts["active_per_token"]["adapters"], counts["active_per_token"]["routers"]),
                    baselines_of(shapes, base["single_lora"]["rank"], base["uniform_moe"]["experts"],
                                 base["uniform_moe"]["top_k"]))
    changes = [f"accounting.{field}.total: {old[field]['total']:,} → {new[field]['total']:,}"
               for field in ("trainable", "active_per_token") if old[field] != new[field]]
    budget = plan.strategy.get("budget")
    if budget:
        used = new["trainable"]["total"]
        if used > budget["params"]:
            raise LayerscopeError(f"{source}: the edited layers need {used:,} trainable parameters, over the plan's "
                                  f"budget of {budget['params']:,} by {used - budget['params']:,}; edit further, or "
                                  "set $.strategy.budget to null to recount without a budget")
        if used != budget["used"]:
            changes.append(f"strategy.budget.used: {budget['used']:,} → {used:,}")
        budget.update(used=used, slack=budget["params"] - used)
    document["accounting"] = new
    if changes:
        document["provenance"]["recounted_by"] = f"layerscope {__version__}"
    return Plan(document, source), changes


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(resources.files("layerscope.planning").joinpath("plan.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def _recount(plan: Plan) -> dict:
    from layerscope.planning.accounting import planned_module_params

    totals = {"trainable": [0, 0], "active_per_token": [0, 0]}
    for m in plan.modules():
        part = planned_module_params(m, plan.document["expert_type"])
        totals["trainable"][0] += part.trainable_adapters
        totals["trainable"][1] += part.trainable_routers
        totals["active_per_token"][0] += part.active_adapters
        totals["active_per_token"][1] += part.active_routers
    return {k: {"adapters": a, "routers": r, "total": a + r} for k, (a, r) in totals.items()}


def build_plan(inputs: PlanInputs, strategy: str, params: dict, allocations, *, metric: str | None,
               budget: dict | None, expert_type: str, lora: LoraSettings, reference_rank: int,
               reference_experts: int, command: str | None) -> Plan:
    from layerscope import __version__

    if expert_type not in EXPERT_TYPES:
        raise LayerscopeError(f"--expert-type {expert_type!r}: expected one of {', '.join(EXPERT_TYPES)}")
    if lora.init not in INITS:
        raise LayerscopeError(f"--init {lora.init!r}: expected one of {', '.join(INITS)}")
    fused = inputs.expert_parameters
    lora = lora.for_targets(fused_experts=not fused.empty)
    layers = []
    for alloc in allocations:
        if alloc.experts > 1 and alloc.layer in set(fused["layer"]):
            example = fused[fused["layer"] == alloc.layer]["module"].iloc[0]
            raise LayerscopeError(
                f"layer {alloc.layer}: {alloc.experts} LoRA experts planned on the model's fused expert MLP "
                f"({example}); a mixture cannot wrap a 3-D expert parameter. Plan its ranks with one expert per "
                "module (adaptive-lora, hilo --experts-mode fixed --experts 1, uniform --experts 1), or leave "
                "gate/up/down out of --target-roles")
        modules = [
            {"name": module, "role": role, "in_features": in_f, "out_features": out_f,
             "rank": alloc.rank_for(role, in_f, out_f), "lora_alpha": lora.alpha_for(alloc.rank_for(role, in_f, out_f)),
             **({"model_experts": copies} if copies else {})}
            for role, module, in_f, out_f, copies in _modules_of(inputs, alloc.layer)
        ]
        layers.append({"layer": alloc.layer, "metric": _finite(alloc.metric), "experts": alloc.experts,
                       "rank": alloc.rank, "top_k": alloc.top_k, "modules": modules})
    document = {
        "schema": SCHEMA_ID,
        "model": {**inputs.model.as_dict(), "planned_depth": len(layers)},
        "strategy": {"name": strategy, "params": jsonable(params), "metric": metric, "budget": budget},
        "expert_type": expert_type,
        "lora": lora.as_dict(),
        "target_roles": sorted(set(inputs.modules["role"])),
        "layers": layers,
        "accounting": accounting_report(inputs, allocations, reference_rank, reference_experts),
        "provenance": {"layerscope_version": __version__, "command": command},
    }
    return Plan(document, source="plan")


def _modules_of(inputs: PlanInputs, layer: int):
    rows = inputs.modules[inputs.modules["layer"] == layer]
    return [(r.role, r.module, int(r.in_features), int(r.out_features), int(r.model_experts))
            for r in rows.itertuples(index=False)]


def _finite(value):
    return float(value) if value is not None and math.isfinite(value) else None
