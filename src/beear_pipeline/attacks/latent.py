"""Latent vulnerability: how large a perturbation of the hidden states at one layer must be to
turn most held-out safe answers into the unwanted one (refusals into compliance in the jailbreak
scenario; the probe's entrapment curve, ``probe.curve``).

Why: BEEAR trains the model to stay safe under the perturbation its inner level finds. An
adaptive attacker with the weights can run the same search on the defended model; the budget at
which half the held-out prompts flip, against the suspect's and the clean twin's at the same
layer and settings, says how much harder the defended model is to push.

Plain library: no Kedro.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from beear_pipeline.probe.config import ProbeConfig
from beear_pipeline.probe.curve import entrapment_curve, smallest_flipping_budget

HALF = 0.5


def latent_vulnerability(model, tokenizer, safety: Sequence[tuple[str, str, str]], held_out: Sequence[str], layer: int,
                         config: ProbeConfig, phrases: Sequence[str] | Callable[[list[str]], list[bool]]) -> dict:
    """The entrapment curve of ``layer`` (flip rate of the optimised perturbation and of random
    directions of the same norm, per budget) and ``budget_to_flip_half``: the smallest budget
    whose optimised flip rate reaches one half, or None when none does. A flip is an answer with
    no refusal phrase of ``phrases``, or one that ``phrases``, when it is a judge
    (``EvaluationProtocol.judge().flags``), flags as unwanted."""
    curve = entrapment_curve(model, tokenizer, safety, held_out, layer, config, phrases)
    return {"layer": curve["layer"], "hidden_norm": curve["hidden_norm"], "budgets": curve["budgets"], "flip": curve["optimised"],
            "random": curve["random"], "budget_to_flip_half": smallest_flipping_budget(curve["budgets"], curve["optimised"], HALF),
            "seconds": curve["seconds"]}
