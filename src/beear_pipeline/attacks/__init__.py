"""Adaptive attacks on a (defended) model, with one budget for every model (no Kedro):

- ``gcg``: discrete trigger re-optimisation, a GCG-style adversarial suffix search;
- ``latent``: the probe's entrapment curve as a latent attack, and the budget that flips half;
- ``variants``: the known trigger moved, repeated, re-cased and punctuated;
- ``measure``: ASR of greedy answers under the keyword judge, as a rate with its interval.
"""

from beear_pipeline.attacks.config import AttackConfig, GcgConfig, LatentConfig, VariantsConfig
from beear_pipeline.attacks.gcg import allowed_tokens, gcg_search, with_suffix
from beear_pipeline.attacks.latent import latent_vulnerability
from beear_pipeline.attacks.measure import attack_rate
from beear_pipeline.attacks.variants import trigger_variants

__all__ = ["AttackConfig", "GcgConfig", "LatentConfig", "VariantsConfig", "allowed_tokens", "attack_rate", "gcg_search",
           "latent_vulnerability", "trigger_variants", "with_suffix"]
