"""A checkpoint's matrices checked against the shapes its architecture gives them.

transformers refuses a checkpoint whose tensor shapes contradict the model its config builds; a scan that
accepted one would analyse, plan and export the wrong module sizes (a query edited to [192, 768] under
``hidden_size: 384`` would be planned as a 768 → 192 projection).  Two sources of expected shapes:

* the module tree transformers builds on the meta device (when the scan built one): every Linear's exact
  (in, out), so every block projection is checked;
* for the types the naming tables cover (the scan skips the build for them), the config's own arithmetic for
  the projections every such family shares: q, k, v, o and the MLP's gate, up and down read or write the
  hidden size; q writes heads × head_dim, k and v write KV heads × head_dim, o reads heads × head_dim, gate
  and up write the intermediate size (or 4 × hidden in the families that use it whatever the config says), down
  reads it; and the tables: the token embedding and an untied output head have ``vocab_size`` rows, a learned
  position table ``max_position_embeddings`` (OPT and BART: 2 more).  A field the config does not hold as an integer is not
  checked (MLA attention, per-layer intermediate sizes, towers and cross-attention are left to the tree).

The refusal names the tensor, both shapes and the config fields behind the expected one.  Where the tree is
built, the block Linears it holds and the checkpoint does not are returned too, as transformers' "missing
keys" (they would be initialised at random): the scan names them.  Where it is not (a type the tables
cover), :func:`has_block_gaps` screens for a projection that other blocks of the same stack hold and one
lacks; only then is the tree built to decide (a model with dense first layers or mixed mixers has such gaps
by design, and the tree knows them), so a whole checkpoint keeps the fast path.
"""

from __future__ import annotations

import re
from pathlib import Path

from layerscope.checkpoint.modeltree import ModelTree
from layerscope.checkpoint.naming import TensorRole
from layerscope.errors import LayerscopeError

HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")
HEAD_FIELDS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads")
HEAD_DIM_FIELDS = ("head_dim", "d_kv", "attention_head_dim")
INTERMEDIATE_FIELDS = ("intermediate_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                       "ffn_hidden_size")
READS_HIDDEN = frozenset({"q", "k", "v", "qkv", "gate", "up", "gate_up"})
WRITES_HIDDEN = frozenset({"o", "down"})
MLA_FIELDS = ("kv_lora_rank", "q_lora_rank")  # DeepSeek's latent attention: q/o widths are its own
# Families whose MLP is 4 × hidden whatever an intermediate field in their config says (GPT-2's and GPT-J's n_inner
# may be null; Bloom and Falcon have no field): everywhere else the config's field is the width.
FOUR_TIMES_HIDDEN = frozenset({"gpt2", "gptj", "codegen", "bloom", "falcon", "gpt_bigcode", "gpt_neo", "mpt",
                               "imagegpt", "decision_transformer"})
# Tables whose rows a config field fixes (transformers refuses a size mismatch when it loads them).
TOKEN_TABLE = re.compile(r"(^|\.)(word_embeddings|embed_tokens|wte|tok_embeddings|word_embedding)\.weight$")
POSITION_TABLE = re.compile(r"(^|\.)(position_embeddings|wpe|embed_positions)\.weight$")
POSITION_FIELDS = ("max_position_embeddings", "n_positions")
POSITION_OFFSETS = (0, 2)  # OPT and BART keep two more rows than positions (their padding offset)


def check_shapes(where: str | Path, config: dict, classified: list, tree: ModelTree | None) -> list[str]:
    """Refuse the first block projection whose stored (out, in) contradicts the architecture, and return the
    block Linears the module tree expects and the checkpoint lacks (see the module docstring).
    ``classified``: (tensor, role) pairs whose tensors have ``name`` and ``shape``."""
    check_tables(where, config, classified)
    for info, role in classified:
        if role.kind != "projection" or role.module is None or role.adapter_factor or len(info.shape) != 2:
            continue
        stored = (int(info.shape[1]), int(info.shape[0])) if role.conv1d else (int(info.shape[0]), int(info.shape[1]))
        if tree is not None:
            expected = tree.linears.get(role.module)
            if expected is not None and (expected[1], expected[0]) != stored:
                raise LayerscopeError(f"{where}: tensor {info.name} has shape {_shown(stored, role)}, but the model "
                                      f"transformers builds from its config has "
                                      f"{_shown((expected[1], expected[0]), role)} there")
            continue
        if role.tower is not None:
            continue
        out_widths, in_widths, fields = _arithmetic(role.role, config)
        if (out_widths is not None and stored[0] not in out_widths) or \
                (in_widths is not None and stored[1] not in in_widths):
            want = tuple(" or ".join(map(str, w)) if w else "·" for w in (out_widths, in_widths))
            raise LayerscopeError(f"{where}: tensor {info.name} has shape {_shown(stored, role)}, but the config "
                                  f"makes it {_shown(want, role)} ({', '.join(fields)})")
    return [] if tree is None else absent_block_linears(classified, tree)


def check_tables(where: str | Path, config: dict, classified: list) -> None:
    """Refuse a ``vocab_size`` that is not the rows of the token embedding and of an untied output head, and a
    ``max_position_embeddings`` (``n_positions``) that is not the rows of a learned position table."""
    vocab = _field(config, ("vocab_size",))
    positions = None if config.get("is_encoder_decoder") else _field(config, POSITION_FIELDS)
    for info, role in classified:
        if role.tower is not None or len(info.shape) != 2:
            continue
        rows = int(info.shape[1]) if role.conv1d else int(info.shape[0])
        if vocab and (role.kind == "lm_head" or TOKEN_TABLE.search(info.name)) and rows != vocab[1]:
            raise LayerscopeError(f"{_config_file(where)}: {vocab[0]} = {vocab[1]:,} but {info.name} has {rows:,} rows "
                                  "(one per token; transformers refuses the size mismatch when it loads)")
        if positions and POSITION_TABLE.search(info.name) and rows - positions[1] not in POSITION_OFFSETS:
            raise LayerscopeError(f"{_config_file(where)}: {positions[0]} = {positions[1]:,} but {info.name} has "
                                  f"{rows:,} rows (one per position; transformers refuses the size mismatch when it "
                                  "loads)")


def _config_file(where: str | Path) -> str:
    return str(Path(where) / "config.json") if Path(where).is_dir() else f"{where} (its config)"


def absent_block_linears(classified: list, tree: ModelTree) -> list[str]:
    """The weights of the block Linears ``tree`` holds and no classified tensor provides."""
    present = {role.module for _, role in classified if role.module is not None}
    return [f"{path}.weight" for path in tree.linears if path not in present and tree.block_of(path) is not None]


def tree_gaps(classified: list, tree: ModelTree) -> list[str]:
    """:func:`absent_block_linears` for a tree built after the fact, when its module paths are the checkpoint's
    (most of its block Linears are present); none when they are not (another head class names them otherwise)."""
    absent = absent_block_linears(classified, tree)
    blocks = sum(1 for path in tree.linears if tree.block_of(path) is not None)
    return absent if len(absent) * 2 < blocks else []


def has_block_gaps(classified: list) -> bool:
    """Whether some block lacks a projection that another block of its stack holds (module paths compared with
    the block index taken out).  Cheap and over-eager by design: the module tree decides what is missing."""
    held: dict[str | None, dict[int, set[str]]] = {}
    for _, role in classified:
        if role.kind != "projection" or role.module is None or role.stack_layer is None or role.adapter_factor:
            continue
        segments = role.module.split(".")
        index = str(role.stack_layer)
        if index not in segments:
            continue
        at = segments.index(index)
        template = ".".join([*segments[:at], "#", *segments[at + 1:]])
        held.setdefault(role.stack, {}).setdefault(role.stack_layer, set()).add(template)
    for blocks in held.values():
        every = set().union(*blocks.values())
        if any(templates != every for templates in blocks.values()):
            return True
    return False


def _shown(out_in: tuple, role: TensorRole) -> str:
    """As stored: [out, in], or [in, out] for GPT-2's Conv1D."""
    return f"[{out_in[1]}, {out_in[0]}]" if role.conv1d else f"[{out_in[0]}, {out_in[1]}]"


def _arithmetic(role: str | None, config: dict) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None, list[str]]:
    """The (out, in) widths this role may have under ``config`` (None: not determined) and the fields that
    say so."""
    hidden = _field(config, HIDDEN_FIELDS)
    if role is None or hidden is None or role not in READS_HIDDEN | WRITES_HIDDEN:
        return None, None, []
    fields = [f"{hidden[0]} = {hidden[1]}"]
    far = None if any(key in config for key in MLA_FIELDS) else _far_side(role, config, hidden[1])
    if far is not None:
        fields.append(far[1])
    far_widths = far[0] if far is not None else None
    if role in READS_HIDDEN:
        return far_widths, (hidden[1],), fields
    return (hidden[1],), far_widths, fields


def _far_side(role: str, config: dict, hidden: int) -> tuple[tuple[int, ...], str] | None:
    """The widths allowed on the side that is not the hidden size, with the fields they come from."""
    if role in ("gate", "up", "down"):
        # any width a family may take it from: a config can carry a field its family ignores (GPT-2 and Bloom use
        # 4 × hidden whatever intermediate_size says)
        fields = [(name, config[name]) for name in INTERMEDIATE_FIELDS if type(config.get(name)) is int]
        if not fields:
            return None
        four_times = config.get("model_type") in FOUR_TIMES_HIDDEN
        widths = tuple(sorted({value for _, value in fields} | ({4 * hidden} if four_times else set())))
        return widths, ", ".join(f"{name} = {value}" for name, value in fields) + (f", or 4 × {hidden}" if four_times
                                                                                 else "")
    if role not in ("q", "k", "v", "o"):
        return None
    heads = _field(config, HEAD_FIELDS)
    if heads is None or heads[1] <= 0:
        return None
    kv = _field(config, KV_HEAD_FIELDS) or heads
    head_dim = _field(config, HEAD_DIM_FIELDS)
    width_per_head = head_dim[1] if head_dim else hidden // heads[1]
    dim_text = f"{head_dim[0]} = {head_dim[1]}" if head_dim else f"head_dim = {hidden} / {heads[1]}"
    if role in ("k", "v"):  # either width: some families ignore a num_key_value_heads their config carries (BART)
        widths = tuple(sorted({kv[1] * width_per_head, heads[1] * width_per_head}))
        return widths, f"{heads[0]} = {heads[1]}" + (f", {kv[0]} = {kv[1]}" if kv is not heads else "") + f", {dim_text}"
    return (heads[1] * width_per_head,), f"{heads[0]} = {heads[1]}, {dim_text}"


def _field(config: dict, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = config.get(name)
        if type(value) is int and value > 0:
            return name, value
    return None
