"""The zoo, generated from transformers' own registries (causal LM, seq2seq LM, masked LM, image-text-to-text).

Every model type transformers can build tiny is built, saved, scanned, planned, exported to real PEFT and
applied (``zoo_check.check``).  CI runs the ``CORE`` set — one per layout family that broke before,
composite, hybrid and the newest MoE among them; the whole registry runs with ``pytest -m zoo`` (and
``python tests/run_zoo.py`` writes the README's per-model-type table from the same checks).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.zoo_check import check  # noqa: E402
from tests.zoo_models import NotTiny, registry  # noqa: E402

CORE = [
    "llama", "gpt2", "t5", "bert", "mixtral", "qwen3_moe", "deepseek_v3",  # the older families
    "gemma3", "llava", "paligemma", "qwen2_audio",  # composite: a vision tower beside the language model
    "qwen3_next", "qwen3_5", "jamba", "nemotron_h", "falcon_h1", "lfm2",  # hybrid token mixers
    "deepseek_v4", "deepseek_v32", "hunyuan_v1_moe", "granitemoehybrid", "whisper",
    "bart",  # BartForCausalLM: a decoder without its encoder stack
]
ENTRIES = {entry.model_type: entry for entry in registry()}


def _run(model_type: str, tmp_path):
    try:
        return check(ENTRIES[model_type], tmp_path)
    except NotTiny as exc:
        pytest.skip(f"{model_type} cannot be built tiny: {exc}")


def test_core_types_are_in_the_registry():
    missing = [t for t in CORE if t not in ENTRIES]
    assert not missing, f"no longer in transformers' registries: {missing}"


@pytest.mark.parametrize("model_type", CORE)
def test_core(model_type, tmp_path):
    _run(model_type, tmp_path)


@pytest.mark.zoo
@pytest.mark.parametrize("model_type", sorted(set(ENTRIES) - set(CORE)))
def test_registry(model_type, tmp_path):
    _run(model_type, tmp_path)
