"""Validate the behaviour sets with Great Expectations before any model is loaded.

Each set (safety, anchoring, evaluation, benign evaluation; see ``behaviour_files.SCHEMAS``) is
checked for: required columns present; text cells non-empty; no duplicated prompt (case,
whitespace and punctuation folded); a safe answer that differs from the unwanted one on every row;
prompts and answers within the token limits; a minimum number of rows; no prompt of a defender
set (safety, anchoring) in an evaluation set, since a leaked evaluation prompt inflates the
results; and no evaluation prompt with a near-duplicate (token Jaccard >=
``behaviours.near_duplicates.threshold``, ``behaviours.similarity``) in the safety or anchoring
set, a reworded leak. A near-duplicate is a warning (logged, and listed in the report with the
worst pairs) unless ``behaviours.near_duplicates.fail`` makes it an error like the others.

The checks run as one GX Core 1.x expectation suite per set on a prepared table (the set's text
plus derived columns: 1-based ``row``, the normalised ``prompt_key``, token counts, whether the
two answers differ, and in the evaluation set each prompt's highest similarity to the safety and
to the anchoring set) in an ephemeral context with progress bars and analytics off. GX is imported
inside ``validate_behaviour_sets`` only: it costs about 2 s to import.

The result is a plain, JSON-ready report (no timestamps, so an unchanged input gives an unchanged
report); ``failure_message`` turns its failures into one error that names, for each, the file,
the column, the first offending rows and the fix.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence

import pandas as pd

from beear_pipeline.behaviours.config import BehavioursConfig
from beear_pipeline.behaviours.files import DOCS, SCHEMAS
from beear_pipeline.behaviours.similarity import nearest
from beear_pipeline.lm.checkpoints import ModelConfig

logger = logging.getLogger(__name__)

TokenCounter = Callable[[Sequence[str]], list[int]]
CHECKS = ("missing_column", "min_rows", "empty", "duplicate", "identical", "too_long", "leak", "near_duplicate")
FIRST_ROWS = 5  # offending rows quoted in the error (the saved report keeps up to 50)
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
# defender sets (trained on) and the evaluation sets that must not share a prompt with them
_LEAKS = {"safety": ("evaluation", "benign"), "anchoring": ("evaluation", "benign")}
# the defender sets that the harmful evaluation set must have no near-duplicate in (the benign
# evaluation set is left out: the generated tasks share most of their words by design)
_NEAR = ("safety", "anchoring")


class BehaviourDataError(ValueError):
    """The behaviour sets failed validation; the message lists every failed check and its fix."""


def normalise_prompt(text: str) -> str:
    """Case, whitespace and punctuation folded: the key for duplicate and leakage checks."""
    return " ".join(_PUNCT.sub(" ", str(text).casefold()).split())


def whitespace_tokens(texts: Sequence[str]) -> list[int]:
    """Token counts when no tokenizer is available before the model loads: whitespace words."""
    return [len(t.split()) for t in texts]


def token_counter(model: ModelConfig) -> tuple[TokenCounter, str]:
    """Count with the tokenizer of ``model.path`` when set (the tokenizer only, never the
    weights; ``trust_remote_code=False``), else whitespace words. Returns (counter, name)."""
    path = model.path
    if not path:
        return whitespace_tokens, "whitespace"
    try:
        from beear_pipeline.lm.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(str(path))
    except Exception as err:  # noqa: BLE001 (the suspect step checks the checkpoint and names the fix)
        logger.warning("could not load the tokenizer of model.path=%s (%s); counting whitespace words instead", path, err)
        return whitespace_tokens, "whitespace"
    return (lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]), str(path)


def _text(value) -> str | None:
    """A cell as stripped text; None when empty (null or only whitespace is the same mistake)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None


def prepare_table(kind: str, frame: pd.DataFrame, count_tokens: TokenCounter) -> pd.DataFrame:
    """The table GX validates: ``row`` (1-based), the schema's text columns present (stripped,
    None when empty), ``prompt_key``, ``<column>_tokens`` and, for the safety set,
    ``answers_differ``."""
    schema = SCHEMAS[kind]
    table = pd.DataFrame({"row": range(1, len(frame) + 1)})
    for column in (c for c in schema.columns if c in frame.columns):
        table[column] = pd.Series([_text(v) for v in frame[column]], dtype=object)
    if "prompt" in table:
        table["prompt_key"] = pd.Series([None if t is None else normalise_prompt(t) for t in table["prompt"]], dtype=object)
    for column in (c for c in schema.prompts + schema.responses if c in table):
        texts = [t or "" for t in table[column]]
        table[f"{column}_tokens"] = count_tokens(texts) if texts else []
    if {"safe_response", "unwanted_response"} <= set(table.columns):
        table["answers_differ"] = [s is None or u is None or normalise_prompt(s) != normalise_prompt(u)
                                   for s, u in zip(table["safe_response"], table["unwanted_response"], strict=True)]
    return table


def _expectations(kind: str, table: pd.DataFrame, behaviours: BehavioursConfig, keys: dict[str, list[str]]) -> list:
    """The set's expectations; each carries ``meta`` (set, check, column) to word its error."""
    import great_expectations as gx

    E = gx.expectations
    schema = SCHEMAS[kind]

    def meta(check: str, column: str | None = None, **extra) -> dict:
        return {"set": kind, "check": check, "column": column, **extra}

    out = [E.ExpectTableRowCountToBeBetween(min_value=int(behaviours.min_rows[schema.dataset]), meta=meta("min_rows"))]
    out += [E.ExpectColumnToExist(column=c, meta=meta("missing_column", c)) for c in schema.required]
    for column in (c for c in schema.prompts + schema.responses if c in table):
        out += [E.ExpectColumnValuesToNotBeNull(column=column, meta=meta("empty", column)),
                E.ExpectColumnValuesToBeBetween(column=f"{column}_tokens", max_value=int(_limit(column, behaviours)),
                                                meta=meta("too_long", column, limit=_limit_name(column)))]
    if "prompt_key" in table:
        out.append(E.ExpectColumnValuesToBeUnique(column="prompt_key", meta=meta("duplicate", "prompt")))
        for other in _LEAKS.get(kind, ()):
            if keys.get(other):
                out.append(E.ExpectColumnValuesToNotBeInSet(column="prompt_key", value_set=keys[other],
                                                             meta=meta("leak", "prompt", other=other)))
    if "answers_differ" in table:
        out.append(E.ExpectColumnValuesToBeInSet(column="answers_differ", value_set=[True], meta=meta("identical", "safe_response")))
    near = behaviours.near_duplicates
    for other in (o for o in _NEAR if f"similarity_to_{o}" in table):
        out.append(E.ExpectColumnValuesToBeBetween(column=f"similarity_to_{other}", max_value=float(near.threshold), strict_max=True,
                                                   meta=meta("near_duplicate", "prompt", other=other)))
    return out


def add_similarities(table: pd.DataFrame, others: dict[str, pd.DataFrame]) -> None:
    """Add to the evaluation ``table`` each prompt's highest token Jaccard similarity to the
    prompts of each set in ``others`` (``similarity_to_<set>``) and the 1-based row of that prompt
    there (``nearest_in_<set>``). Empty prompts (the empty check's business) score 0."""
    if "prompt" not in table:
        return
    prompts = [t or "" for t in table["prompt"]]
    for other, other_table in others.items():
        if "prompt" not in other_table:
            continue
        best, where = nearest(prompts, [t or "" for t in other_table["prompt"]])
        table[f"similarity_to_{other}"] = best.round(4)
        table[f"nearest_in_{other}"] = where + 1


def _limit_name(column: str) -> str:
    return "max_prompt_tokens" if column == "prompt" else "max_response_tokens"


def _limit(column: str, behaviours: BehavioursConfig) -> int:
    return getattr(behaviours, _limit_name(column))


def _context():
    """An ephemeral GX context: nothing written to disk, no progress bars, no analytics."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig

    config = DataContextConfig(analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
                               store_backend_defaults=InMemoryStoreBackendDefaults())
    return gx.get_context(mode="ephemeral", project_config=config)


def validate_behaviour_sets(sets: dict[str, pd.DataFrame], sources: dict[str, str], behaviours: BehavioursConfig,
                            columns: dict[str, dict[str, str]] | None = None,
                            count_tokens: TokenCounter = whitespace_tokens, tokenizer: str = "whitespace") -> dict:
    """Validate ``sets`` (``{"safety": df, "anchoring": df, "evaluation": df, "benign": df}``).

    ``sources`` names where each set came from (a file, or the shipped default); ``columns`` maps
    schema columns to the user's file columns (``behaviour_files.column_mapping``) so that errors
    use the names in the file. Returns the report; ``report["success"]`` is False on any failure.
    """
    import great_expectations as gx

    context = _context()
    datasource = context.data_sources.add_pandas("behaviours")
    tables = {kind: prepare_table(kind, frame, count_tokens) for kind, frame in sets.items()}
    if "evaluation" in tables:
        add_similarities(tables["evaluation"], {o: tables[o] for o in _NEAR if o in tables})
    keys = {kind: sorted(set(t["prompt_key"].dropna())) for kind, t in tables.items() if "prompt_key" in t}
    checks = []
    for kind, table in tables.items():
        suite = context.suites.add(gx.ExpectationSuite(name=kind, expectations=_expectations(kind, table, behaviours, keys)))
        batch = datasource.add_dataframe_asset(kind).add_batch_definition_whole_dataframe(kind)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=kind, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": table},
                                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]})
        checks += [_summarise(r, table, sources, (columns or {}).get(kind, {}), behaviours, tokenizer, tables) for r in result.results]
    order = {kind: i for i, kind in enumerate(sets)}
    checks.sort(key=lambda c: (order[c["set"]], CHECKS.index(c["check"]), c["column"] or "", c.get("other_set", "")))
    near = [c for c in checks if c["check"] == "near_duplicate"]
    warnings = [c["message"] for c in checks if not c["success"] and c.get("severity") == "warning"]
    for warning in warnings:
        logger.warning(warning)
    report = {
        "success": not any(_is_error(c) for c in checks),
        "tokenizer": tokenizer,
        "max_prompt_tokens": behaviours.max_prompt_tokens, "max_response_tokens": behaviours.max_response_tokens,
        "sets": {kind: {"dataset": SCHEMAS[kind].dataset, "source": sources[kind], "rows": len(frame)} for kind, frame in sets.items()},
        "failed": sum(_is_error(c) for c in checks),
        "checks": checks,
        "near_duplicates": {"threshold": behaviours.near_duplicates.threshold, "fail": behaviours.near_duplicates.fail,
                            "similarity": "token Jaccard over lower-cased word sets, punctuation folded",
                            **{f"evaluation~{c['other_set']}": {k: c[k] for k in ("unexpected_count", "share", "examples")} for c in near}},
        "great_expectations": gx.__version__,
    }
    if warnings:
        report["warnings"] = warnings
    logger.info("behaviour data: %d of %d checks passed (%s)", len(checks) - report["failed"], len(checks),
                ", ".join(f"{k} {v['rows']} rows" for k, v in report["sets"].items()))
    return report


def _is_error(check: dict) -> bool:
    """A failed check that stops the run (a near-duplicate only warns unless near_duplicates.fail)."""
    return not check["success"] and check.get("severity", "error") == "error"


def _summarise(result, table: pd.DataFrame, sources: dict, mapping: dict, behaviours: BehavioursConfig, tokenizer: str,
               tables: dict[str, pd.DataFrame]) -> dict:
    """One expectation's outcome as plain JSON, with the error message when it failed."""
    meta = dict(result.expectation_config.meta or {})
    kind, check, column = meta["set"], meta["check"], meta.get("column")
    rows = [int(r["row"]) for r in result.result.get("unexpected_index_list") or []]
    summary = {"set": kind, "check": check, "column": column, "expectation": result.expectation_config.type,
               "success": bool(result.success), "unexpected_count": int(result.result.get("unexpected_count") or len(rows)),
               "rows": rows[:50]}
    if meta.get("other"):
        summary["other_set"] = meta["other"]
    if check == "near_duplicate":
        summary |= _near_duplicates(table, tables[meta["other"]], meta["other"], rows, behaviours)
    if "observed_value" in result.result:
        summary["observed_value"] = result.result["observed_value"]
    if result.exception_info and result.exception_info.get("raised_exception"):
        summary["exception"] = result.exception_info.get("exception_message")
    if not result.success:
        summary["message"] = _message(meta, summary, table, sources, mapping, behaviours, tokenizer)
    return summary


def _near_duplicates(table: pd.DataFrame, other_table: pd.DataFrame, other: str, rows: list[int], behaviours: BehavioursConfig) -> dict:
    """Severity, share of evaluation prompts with a near-duplicate in ``other``, and the worst
    pairs (highest similarity first, then by row) for the report and the message."""
    column = f"similarity_to_{other}"
    by_row = table.set_index("row")
    worst = sorted(rows, key=lambda r: (-by_row.at[r, column], r))[: behaviours.near_duplicates.examples]
    other_prompts = other_table.set_index("row")["prompt"]
    examples = [{"row": int(r), "prompt": by_row.at[r, "prompt"], "similarity": float(by_row.at[r, column]),
                 f"{other}_row": int(by_row.at[r, f"nearest_in_{other}"]), f"{other}_prompt": other_prompts.at[int(by_row.at[r, f"nearest_in_{other}"])]}
                for r in worst]
    return {"severity": "error" if behaviours.near_duplicates.fail else "warning", "threshold": behaviours.near_duplicates.threshold,
            "share": round(len(rows) / len(table), 4) if len(table) else 0.0, "examples": examples}


def _quote(text, width: int = 60) -> str:
    text = "" if text is None else " ".join(str(text).split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _message(meta: dict, summary: dict, table: pd.DataFrame, sources: dict, mapping: dict, behaviours: BehavioursConfig, tokenizer: str) -> str:
    """``<file>, column '<name>': <what is wrong> in rows ...: <values>. Fix: <what to do>``."""
    kind, check, column = meta["set"], meta["check"], meta.get("column")
    source, dataset = sources[kind], SCHEMAS[kind].dataset
    name = mapping.get(column, column) if column else None
    where = f"{source}, column {name!r}" + (f" (the schema's {column})" if name != column else "") if column else source
    rows = summary["rows"]
    by_row = table.set_index("row")
    first = ", ".join(map(str, rows[:FIRST_ROWS])) + (f" (and {summary['unexpected_count'] - FIRST_ROWS} more)" if summary["unexpected_count"] > FIRST_ROWS else "")
    if check == "min_rows":
        minimum = behaviours.min_rows[dataset]
        return (f"{source}: {summary.get('observed_value', len(table))} row(s), fewer than the {minimum} the {kind} set needs. "
                f"Fix: add rows, or lower behaviours.min_rows.{dataset}")
    if check == "missing_column":
        return (f"{source}: column {name!r} is missing from the {kind} set (required: {list(SCHEMAS[kind].required)}). "
                f"Fix: add the column, or if your file names it differently map it: --params \"behaviours.columns.{kind}.{column}=YOUR_COLUMN\" ({DOCS})")
    if check == "empty":
        return f"{where}: empty cell(s) in rows {first}. Fix: fill them in or delete those rows"
    if check == "duplicate":
        values = "; ".join(f"row {r}: {_quote(by_row.at[r, 'prompt'])}" for r in rows[:FIRST_ROWS])
        return (f"{where}: duplicated prompts (case, whitespace and punctuation folded) in rows {first}: {values}. "
                "Fix: keep one row per prompt")
    if check == "identical":
        safe, unwanted = mapping.get("safe_response", "safe_response"), mapping.get("unwanted_response", "unwanted_response")
        values = "; ".join(f"row {r}: {_quote(by_row.at[r, 'safe_response'])}" for r in rows[:FIRST_ROWS])
        return (f"{source}, columns {safe!r} and {unwanted!r}: the safe and the unwanted answer are identical in rows {first}: {values}. "
                "Fix: the safe answer (a refusal) must differ from the unwanted one; check for a copied or swapped column")
    if check == "too_long":
        limit = meta["limit"]
        values = "; ".join(f"row {r}: {int(by_row.at[r, f'{column}_tokens'])} tokens" for r in rows[:FIRST_ROWS])
        return (f"{where}: text over the token limit ({limit}={getattr(behaviours, limit)}, counted with the {tokenizer} tokenizer) "
                f"in rows {first}: {values}. Fix: shorten or drop these rows, or raise behaviours.{limit}")
    if check == "leak":
        other = meta["other"]
        values = "; ".join(_quote(by_row.at[r, "prompt"]) for r in rows[:FIRST_ROWS])
        return (f"{where}: {summary['unexpected_count']} prompt(s) also in the {other} set ({sources[other]}), which would inflate "
                f"the results (case, whitespace and punctuation folded), in rows {first}: {values}. "
                "Fix: remove these prompts from one of the two sets")
    if check == "near_duplicate":
        other = meta["other"]
        near = behaviours.near_duplicates
        pairs = "; ".join(f"row {e['row']} {_quote(e['prompt'])} ~ {other} row {e[f'{other}_row']} {_quote(e[f'{other}_prompt'])} "
                          f"({e['similarity']:.2f})" for e in summary["examples"])
        stop = ("Or set behaviours.near_duplicates.fail=false to only warn" if near.fail
                else "Set behaviours.near_duplicates.fail=true to stop the run on this")
        return (f"{where}: {summary['unexpected_count']} of {len(table)} evaluation prompt(s) ({summary['share']:.1%}) have a near-duplicate "
                f"(token Jaccard >= {near.threshold:g} over lower-cased word sets) in the {other} set ({sources[other]}), so the held-out "
                f"results partly measure prompts the defence trained on; worst: {pairs}. Fix: drop or replace these prompts in one of "
                f"the two sets (with the shipped AdvBench shares, keep behaviours.near_duplicates.split=true), or raise "
                f"behaviours.near_duplicates.threshold. {stop}")
    return f"{where}: {summary['expectation']} failed. Fix: see {DOCS}"


def failure_message(report: dict) -> str:
    """One error for all failed checks: file, column, first offending rows and fix for each."""
    failed = [c for c in report["checks"] if _is_error(c)]
    lines = [(f"the behaviour data failed {len(failed)} check(s) (Great Expectations), so no model was loaded. "
              "Rows count from 1 after the header. Every check's result is saved as the behaviours_validation dataset "
              f"and logged to MLflow; the schema and the checks are in {DOCS}:")]
    lines += [f"  - [{c['set']} set, {c['check']}] {c['message']}" for c in failed]
    return "\n".join(lines)
