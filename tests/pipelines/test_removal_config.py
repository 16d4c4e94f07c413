"""The removal pipeline's configuration of each defence: the hardening options are BEEAR's, the
baselines stay the paper's (a control with the relearn-aware gradient removed most of the default
suspect's backdoor by itself: it would no longer be the control that must fail)."""

from beear_pipeline.beear import BeearConfig
from beear_pipeline.pipelines.removal.nodes import _config


def test_hardening_is_beears_and_the_baselines_stay_the_papers():
    beear = BeearConfig(relearn_steps=4, relearn_lr="auto", unlearn_weight=1.0, sam_rho=0.1, anchor_layer=1)
    history = {"rounds": [{}] * 7}
    chosen = _config(beear, "beear", None)
    assert (chosen.relearn_steps, chosen.unlearn_weight, chosen.sam_rho) == (4, 1.0, 0.1)
    for defence in ("control", "random_perturbation"):
        baseline = _config(beear, defence, None, history)
        assert (baseline.defence, baseline.max_rounds) == (defence, 7)
        assert (baseline.relearn_steps, baseline.unlearn_weight, baseline.sam_rho) == (0, 0.0, 0.0), defence
