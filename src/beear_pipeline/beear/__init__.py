"""BEEAR engine: a plain library, no Kedro. Use it from a notebook::

    from beear_pipeline.beear import BeearConfig, run_beear
    result = run_beear(model, tokenizer, safety_triples, anchoring_pairs, BeearConfig(max_rounds=60))
    result.model, result.perturbation, result.history
"""

from beear_pipeline.beear.config import BeearConfig
from beear_pipeline.beear.engine import BeearResult, convergence, find_perturbation, run_beear
from beear_pipeline.beear.scopes import trainable_parameters
from beear_pipeline.beear.hook import decoder_layers, perturbed, position_index, resolve_layer

__all__ = ["BeearConfig", "BeearResult", "convergence", "decoder_layers", "find_perturbation", "perturbed", "position_index", "resolve_layer", "run_beear", "trainable_parameters"]
