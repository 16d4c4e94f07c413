"""Read the defender's own behaviour sets from JSON Lines, CSV, Parquet or Excel files.

The schema (docs/behaviour_data.md) has four sets, each with its columns:

- ``safety``: ``prompt``, ``safe_response``, ``unwanted_response`` (harmful prompts, the answer the
  model should give and the one the backdoor gives);
- ``anchoring``: ``prompt``, ``response`` (benign prompts with good answers);
- ``evaluation``: ``prompt`` and optionally ``category`` (held-out harmful prompts);
- ``benign``: ``prompt`` and optionally ``response`` (held-out benign prompts).

A file's own column names are mapped onto the schema's by ``behaviours.columns.<set>``
(``{schema column: your column}``). Reading fails early, naming the file and the fix, on a
missing or empty file, an unsupported extension, bytes that are not UTF-8, malformed JSON Lines
and workbooks with more than one sheet. Whether the columns are all there, filled in and sensible
is checked afterwards by ``beear_pipeline.behaviours.validation``, with every problem listed at once.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from beear_pipeline.behaviours.config import BehavioursConfig

logger = logging.getLogger(__name__)

DOCS = "docs/behaviour_data.md"


@dataclass(frozen=True)
class SetSchema:
    """One behaviour set: its dataset name, required and optional columns, and which of them
    hold text that is fed to the model (checked for emptiness and token length)."""

    dataset: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ("prompt",)
    responses: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.optional


SCHEMAS = {
    "safety": SetSchema("safety_set", ("prompt", "safe_response", "unwanted_response"), responses=("safe_response", "unwanted_response")),
    "anchoring": SetSchema("anchoring_set", ("prompt", "response"), responses=("response",)),
    "evaluation": SetSchema("evaluation_set", ("prompt",), optional=("category",)),
    "benign": SetSchema("benign_evaluation_set", ("prompt",), optional=("response",), responses=("response",)),
}
EXTENSIONS = (".jsonl", ".csv", ".parquet", ".xlsx")


class BehaviourFileError(ValueError):
    """A behaviour file that cannot be read; the message names the file and the fix."""


def path_option(kind: str) -> str:
    """The parameter that names a user file for set ``kind``: ``behaviours.safety_path`` etc."""
    return f"behaviours.{kind}_path"


def column_mapping(kind: str, behaviours: BehavioursConfig) -> dict[str, str]:
    """``{schema column: file column}`` for set ``kind``: the schema's own names unless
    ``behaviours.columns.<kind>`` maps them. Unknown schema columns are an error (a typo would
    otherwise be ignored silently)."""
    mapping = dict(behaviours.columns.get(kind) or {})
    schema = SCHEMAS[kind]
    unknown = sorted(set(mapping) - set(schema.columns))
    if unknown:
        raise BehaviourFileError(
            f"behaviours.columns.{kind}: {unknown} not in the {kind} set's schema {list(schema.columns)}. "
            f"Fix: map schema columns to your file's columns, e.g. behaviours.columns.{kind}.prompt=instruction ({DOCS})"
        )
    return {column: str(mapping.get(column) or column) for column in schema.columns}


def read_behaviour_file(path: str | Path, option: str = "the behaviour file") -> pd.DataFrame:
    """Read one table from ``path`` (.jsonl, .csv, .parquet or a one-sheet .xlsx), cells as they
    are. ``option`` (e.g. ``behaviours.safety_path``) is named in errors."""
    path = Path(path)
    if not path.is_file():
        raise BehaviourFileError(f"{option}={path}: no such file. Fix: give the path of an existing file "
                                 "(relative paths start at the project root)")
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        hint = " (JSON Lines files end in .jsonl)" if suffix in (".json", ".ndjson") else ""
        hint += " (old .xls workbooks: save as .xlsx)" if suffix == ".xls" else ""
        raise BehaviourFileError(f"{path}: unsupported extension {path.suffix!r}{hint}. "
                                 f"Fix: save the set as JSON Lines (.jsonl), CSV (.csv), Parquet (.parquet) or Excel (.xlsx), see {DOCS}")
    if path.stat().st_size == 0:
        raise BehaviourFileError(f"{path}: the file is empty (0 bytes). Fix: write the set into it, one row per example, "
                                 f"or drop {option} to use the shipped default")
    frame = {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet, ".xlsx": _read_excel}[suffix](path)
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise BehaviourFileError(f"{path}: the file has no rows (columns found: {list(frame.columns)}). "
                                 f"Fix: add the examples, one row per example, or drop {option} to use the shipped default")
    logger.info("read %d rows from %s (columns %s)", len(frame), path, list(frame.columns))
    return frame


def read_user_set(kind: str, behaviours: BehavioursConfig) -> pd.DataFrame:
    """The user's file for set ``kind`` with its columns renamed to the schema's.

    Only the schema's columns are kept. A column that is missing is left out here and reported
    by the validation (with all other problems), so the user sees everything to fix at once."""
    option = path_option(kind)
    path = behaviours.path_of(kind)
    mapping = column_mapping(kind, behaviours)
    raw = read_behaviour_file(path, option)
    present = {column: source for column, source in mapping.items() if source in raw.columns}
    frame = pd.DataFrame({column: raw[source] for column, source in present.items()}, index=raw.index)
    missing = [f"{source!r} (for {column})" if source != column else repr(column) for column, source in mapping.items()
               if column in SCHEMAS[kind].required and column not in present]
    if missing:  # reported by the validation with the other problems; the columns found help the user now
        logger.warning("%s: no column %s; columns found: %s", path, ", ".join(missing), list(raw.columns))
    dropped = [c for c in raw.columns if c not in present.values()]
    if dropped:
        logger.info("%s: ignoring column(s) %s (not in the %s schema %s)", path, dropped, kind, list(SCHEMAS[kind].columns))
    return frame.apply(_as_text).reset_index(drop=True)


def _as_text(column: pd.Series) -> pd.Series:
    """Cells as text (numbers from Excel or JSON become strings); empty cells stay None."""
    def text(value):
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        return value if isinstance(value, str) else str(value)

    # dtype=object: pandas 3 would infer its string dtype and turn None into NaN
    return pd.Series([text(v) for v in column], index=column.index, dtype=object)


def _decode(path: Path) -> str:
    """The file's text: UTF-8 (a byte-order mark is allowed), or an error that says how to fix it."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BehaviourFileError(f"{path}: the file is UTF-16 encoded, not UTF-8. Fix: re-save it as UTF-8 "
                                 f"(Excel: 'CSV UTF-8'; or iconv -f UTF-16 -t UTF-8 {path.name} > fixed{path.suffix})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise BehaviourFileError(
            f"{path}: not valid UTF-8: byte 0x{data[err.start]:02x} on line {line} (offset {err.start}) cannot be decoded; "
            f"the file was probably saved as Latin-1 / Windows-1252. Fix: re-save it as UTF-8 (Excel: 'CSV UTF-8'; "
            f"or iconv -f WINDOWS-1252 -t UTF-8 {path.name} > fixed{path.suffix})"
        ) from None


def _read_csv(path: Path) -> pd.DataFrame:
    text = _decode(path)
    if not text.strip():
        raise BehaviourFileError(f"{path}: the file holds only whitespace. Fix: write a header line and one row per example")
    try:
        # every cell as text; an empty cell stays '' (caught as empty), 'NA' or 'null' stay text
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as err:
        raise BehaviourFileError(f"{path}: not a readable CSV file ({err}). Fix: one header line, then one row per example; "
                                 "quote cells that hold commas or line breaks") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BehaviourFileError(f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno}). "
                                     "Fix: one JSON object per line, e.g. {\"prompt\": \"...\", \"response\": \"...\"}") from None
        if not isinstance(record, dict):
            raise BehaviourFileError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object. "
                                     "Fix: one JSON object per line, e.g. {\"prompt\": \"...\", \"response\": \"...\"}")
        records.append(record)
    if not records:
        raise BehaviourFileError(f"{path}: the file holds no JSON lines. Fix: write one JSON object per line")
    return pd.DataFrame(records, dtype=object)  # 4 stays 4, not 4.0 next to a null


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a file that is not Parquet)
        raise BehaviourFileError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}). "
                                 "Fix: write it with pandas.DataFrame.to_parquet or pyarrow, or use .jsonl / .csv") from None


def _read_excel(path: Path) -> pd.DataFrame:
    try:
        workbook = pd.ExcelFile(path, engine="openpyxl")
    except Exception as err:  # noqa: BLE001 (a renamed CSV, a corrupt zip, an .xls saved as .xlsx)
        raise BehaviourFileError(f"{path}: not a readable Excel .xlsx workbook ({type(err).__name__}: {err}). "
                                 "Fix: open it in Excel or LibreOffice and save it as .xlsx") from None
    with workbook:
        if len(workbook.sheet_names) != 1:
            raise BehaviourFileError(f"{path}: the workbook has {len(workbook.sheet_names)} sheets {workbook.sheet_names}; "
                                     "a behaviour set is one sheet (header row first, one example per row, as in the BEEAR "
                                     "release's anchoring sets). Fix: delete or move the other sheets")
        return workbook.parse(workbook.sheet_names[0], dtype=str, keep_default_na=False)
