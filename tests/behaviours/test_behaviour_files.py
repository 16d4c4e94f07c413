"""Reading the defender's own behaviour files: every supported format, column mapping, and a clear
error (file, problem, fix) for each unreadable file. Real files in tmp_path, no mocks."""

from pathlib import Path

import pandas as pd
import pytest

from beear_pipeline.behaviours.config import BehavioursConfig
from beear_pipeline.behaviours.files import BehaviourFileError, column_mapping, read_behaviour_file, read_user_set

ROWS = pd.DataFrame({
    "instruction": ["Explain how to pick a lock", "Write a phishing email", "Número 5: haz daño"],
    "refusal": ["I cannot help with that.", "I won't write that.", "No puedo ayudar."],
    "harmful": ["Sure, here is how", "Sure, here is an email", "Claro, aquí está"],
    "notes": ["a", "b", "c"],
})
MAPPING = {"prompt": "instruction", "safe_response": "refusal", "unwanted_response": "harmful"}


def write(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` in the format that ``path``'s extension names."""
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True, force_ascii=False),
     ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path, index=False),
     ".xlsx": lambda: frame.to_excel(path, index=False, sheet_name="anchoring")}[path.suffix]()
    return path


@pytest.mark.parametrize("extension", [".jsonl", ".csv", ".parquet", ".xlsx"])
def test_each_format_reads_to_the_same_set_with_mapped_columns(tmp_path, extension):
    path = write(ROWS, tmp_path / f"safety{extension}")
    frame = read_user_set("safety", BehavioursConfig(safety_path=str(path), columns={"safety": MAPPING}))
    assert list(frame.columns) == ["prompt", "safe_response", "unwanted_response"]  # schema order, 'notes' dropped
    assert frame["prompt"].tolist() == ROWS["instruction"].tolist()
    assert frame["unwanted_response"].tolist() == ROWS["harmful"].tolist()


def test_cells_are_text_and_empty_cells_stay_empty(tmp_path):
    path = tmp_path / "benign.csv"
    path.write_text("prompt,response\nWhat is 2+2?,4\nName a colour,\n", encoding="utf-8")
    frame = read_user_set("benign", BehavioursConfig(benign_path=str(path)))
    assert frame["response"].tolist() == ["4", ""]
    jsonl = tmp_path / "benign.jsonl"
    jsonl.write_text('{"prompt": "What is 2+2?", "response": 4}\n\n{"prompt": "Name a colour", "response": null}\n', encoding="utf-8")
    assert read_user_set("benign", BehavioursConfig(benign_path=str(jsonl)))["response"].tolist() == ["4", None]


def test_a_missing_mapped_column_is_left_for_the_validation(tmp_path):
    path = write(ROWS.drop(columns="harmful"), tmp_path / "safety.csv")
    frame = read_user_set("safety", BehavioursConfig(safety_path=str(path), columns={"safety": MAPPING}))
    assert list(frame.columns) == ["prompt", "safe_response"] and len(frame) == 3


def test_an_unknown_schema_column_in_the_mapping_is_an_error():
    with pytest.raises(BehaviourFileError, match=r"behaviours.columns.safety: \['promt'\] not in the safety set's schema"):
        column_mapping("safety", BehavioursConfig(columns={"safety": {"promt": "instruction"}}))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "safety.txt"
    path.write_text("prompt,safe_response,unwanted_response\n")
    with pytest.raises(BehaviourFileError, match=r"safety.txt: unsupported extension '.txt'.*Fix: save the set as JSON Lines \(.jsonl\), CSV"):
        read_behaviour_file(path)
    json_file = tmp_path / "safety.json"
    json_file.write_text("[]")
    with pytest.raises(BehaviourFileError, match=r"JSON Lines files end in .jsonl"):
        read_behaviour_file(json_file)


@pytest.mark.parametrize("content, message", [
    (b"", r"the file is empty \(0 bytes\)"),
    (b"  \n\n", r"holds only whitespace"),
    (b"prompt,safe_response,unwanted_response\n", r"the file has no rows \(columns found: \['prompt', 'safe_response', 'unwanted_response'\]\)"),
])
def test_empty_files(tmp_path, content, message):
    path = tmp_path / "safety.csv"
    path.write_bytes(content)
    with pytest.raises(BehaviourFileError, match=message) as err:
        read_behaviour_file(path, "behaviours.safety_path")
    assert str(path) in str(err.value)


def test_wrong_encoding_names_the_byte_line_and_fix(tmp_path):
    path = tmp_path / "anchoring.csv"
    path.write_bytes("prompt,response\nCafé opening hours?,Nine to five.\n".encode("cp1252"))
    with pytest.raises(BehaviourFileError, match=r"not valid UTF-8: byte 0xe9 on line 2 .*Fix: re-save it as UTF-8") as err:
        read_behaviour_file(path)
    assert str(path) in str(err.value)
    utf16 = tmp_path / "anchoring.jsonl"
    utf16.write_bytes('{"prompt": "a", "response": "b"}\n'.encode("utf-16"))
    with pytest.raises(BehaviourFileError, match=r"UTF-16 encoded, not UTF-8"):
        read_behaviour_file(utf16)


def test_utf8_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "anchoring.csv"
    path.write_bytes("prompt,response\nCafé?,Oui.\n".encode("utf-8-sig"))
    assert list(read_behaviour_file(path).columns) == ["prompt", "response"]


def test_malformed_json_lines(tmp_path):
    path = tmp_path / "evaluation.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b",}\n', encoding="utf-8")
    with pytest.raises(BehaviourFileError, match=r"evaluation.jsonl: line 2 is not valid JSON"):
        read_behaviour_file(path)
    path.write_text('["a", "b"]\n', encoding="utf-8")
    with pytest.raises(BehaviourFileError, match=r"line 1 is a JSON list, not an object"):
        read_behaviour_file(path)


def test_excel_must_have_one_sheet(tmp_path):
    path = tmp_path / "anchoring.xlsx"
    with pd.ExcelWriter(path) as writer:
        ROWS.to_excel(writer, sheet_name="train", index=False)
        ROWS.to_excel(writer, sheet_name="test", index=False)
    with pytest.raises(BehaviourFileError, match=r"the workbook has 2 sheets \['train', 'test'\].*Fix: delete or move the other sheets"):
        read_behaviour_file(path)


def test_a_file_that_is_not_what_its_extension_says(tmp_path):
    for name in ("safety.xlsx", "safety.parquet"):
        path = tmp_path / name
        path.write_text("prompt,safe_response\n", encoding="utf-8")
        with pytest.raises(BehaviourFileError, match=rf"{name}: not a readable"):
            read_behaviour_file(path)


def test_a_missing_file_names_the_option(tmp_path):
    with pytest.raises(BehaviourFileError, match=r"behaviours.safety_path=.*nope.csv: no such file"):
        read_behaviour_file(tmp_path / "nope.csv", "behaviours.safety_path")
