"""The README's table of supported architectures, generated from the naming data (so it cannot drift)."""

from __future__ import annotations

from layerscope.checkpoint.architectures import ARCHITECTURES, ROUTER_ROLES


def _roles(architecture: dict) -> str:
    stacked = set(architecture.get("stacked_experts", []))
    plain, experts = [], []
    for module, role in architecture["modules"].items():
        if "{expert}" in module or module in stacked:
            experts.append(role)
        elif role not in ROUTER_ROLES:
            plain.append(role)
    text = " ".join(dict.fromkeys(plain))
    if experts:
        text += f"; experts: {' '.join(dict.fromkeys(experts))}"
    return text


def architecture_table() -> str:
    """Markdown: one row per naming entry with its model types, block stacks and roles."""
    lines = ["| naming | config.json `model_type` | blocks (stack: prefix) | roles |", "|---|---|---|---|"]
    for arch in ARCHITECTURES:
        stacks = "<br>".join(f"{s['stack']}: `{s['prefixes'][0]}.N`" for s in arch["stacks"])
        types = ", ".join(arch["model_types"])
        lines.append(f"| {arch['name']} | {types} | {stacks} | {_roles(arch)} |")
    return "\n".join(lines) + "\n"
