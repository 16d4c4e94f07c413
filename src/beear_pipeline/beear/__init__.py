"""BEEAR engine: a plain library, no Kedro. Use it from a notebook::

    from beear_pipeline.beear import BeearConfig, run_beear
    result = run_beear(model, tokenizer, safety_triples, anchoring_pairs, BeearConfig(max_rounds=60))
    result.model, result.perturbation, result.history, result.convergence

- ``config``: ``BeearConfig``, every open decision point of the method as a documented field;
- ``engine``: the bi-level loop, the convergence rule and ``find_perturbation``;
- ``entrapment``: the inner objective, projection, step-size rule, hidden-state scale, random
  directions and the entrapment rate (shared with the probe);
- ``scopes``: which weights the outer step trains; ``resume``: round checkpoints;
- ``distributed`` / ``worker``: the same run on N torch.distributed processes (docs/distributed.md).
"""

from beear_pipeline.beear.config import BeearConfig
from beear_pipeline.beear.engine import BeearResult, convergence, find_perturbation, run_beear

__all__ = ["BeearConfig", "BeearResult", "convergence", "find_perturbation", "run_beear"]
