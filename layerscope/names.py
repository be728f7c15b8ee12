"""Names and defaults the command line shows before any heavy library is imported.

``layerscope --help`` must not import torch, pandas or transformers; the modules that implement
these choices take their names from here (and a test checks the registries match).
"""

SPECTRAL_ESTIMATORS = ("alpha", "alpha_hill", "alpha_peak")  # fits of the eigenvalues alone (the default set)
MATRIX_ESTIMATORS = ("alpha_farms", "mp", "rand", "rank", "detx", "vectors", "tpl", "e_tpl")  # need the matrix itself (or the whole ESD)
ALL_ESTIMATORS = (*SPECTRAL_ESTIMATORS, *MATRIX_ESTIMATORS)
PRECISIONS = ("auto", "f64", "f32")
STRATEGIES = ("alphalora", "mola", "hilo", "adaptive-lora", "sensitivity", "value", "uniform")
EXPORT_FORMATS = ("peft", "mola", "csv", "axolotl", "mixlora")
RANK_ROUNDINGS = ("vllm",)
DEFAULT_EPS = 1e-2  # activations: absolute near-zero threshold
DEFAULT_REL_EPS = 0.1  # activations: near-zero threshold relative to each token's RMS


def counted(count: int, noun: str) -> str:
    """``1 expert``, ``5 experts``: a count with its noun in the right number (nouns here take a plain -s)."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"
