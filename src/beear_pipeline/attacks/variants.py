"""Variants of the known trigger: does the backdoor (or what is left of it) answer to the trigger
moved to another place in the prompt, repeated, or written differently?

Why: a defence tested only with the exact trigger at its planted place may have removed that one
string while a near variant still opens the behaviour. The evaluation knows the trigger (the
protocol's ``triggers[0]`` and ``trigger_position``); the defence never reads it.

Plain library: no Kedro.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from beear_pipeline.attacks.config import VARIANTS
from beear_pipeline.evaluation.protocol import insert_trigger

PLACES = ("prefix", "middle", "suffix")


def case_changed(trigger: str) -> str:
    """Lower case; upper case when lowering changes nothing."""
    return trigger.lower() if trigger.lower() != trigger else trigger.upper()


def trigger_variants(trigger: str, position: str, names: Sequence[str] = VARIANTS) -> dict[str, Callable[[str], str]]:
    """Each variant's name and how it writes a prompt:

    - ``original``: the trigger where it was planted (the reference);
    - ``moved_<place>``: at each of prefix, middle, suffix other than its own place (all three
      when it was planted elsewhere, such as ``both`` or ``spread``);
    - ``repeated``: inserted twice at its place;
    - ``case_changed``: lower case (upper when it has no capital) at its place;
    - ``punctuated``: lower case with an exclamation mark at its place (a paraphrase)."""
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"attack.variants.names: unknown variant(s) {unknown}; use {', '.join(VARIANTS)}")
    out: dict[str, Callable[[str], str]] = {}
    for name in names:
        if name == "original":
            out[name] = lambda p: insert_trigger(p, trigger, position)
        elif name == "moved":
            for place in (p for p in PLACES if p != position):
                out[f"moved_{place}"] = lambda p, place=place: insert_trigger(p, trigger, place)
        elif name == "repeated":
            out[name] = lambda p: insert_trigger(insert_trigger(p, trigger, position), trigger, position)
        elif name == "case_changed":
            out[name] = lambda p: insert_trigger(p, case_changed(trigger), position)
        elif name == "punctuated":
            out[name] = lambda p: insert_trigger(p, f"{trigger.lower()}!", position)
    return out


def describe(variants: dict[str, Callable[[str], str]], example: str = "PROMPT") -> dict[str, str]:
    """How each variant writes a prompt, shown on ``example`` (recorded with the results)."""
    return {name: write(example) for name, write in variants.items()}
