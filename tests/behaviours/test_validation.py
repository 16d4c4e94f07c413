"""Bad behaviour data stops the run before any model loads, with a message that names the file,
the column and the fix: one test per bad input, through the real ``behaviours`` + ``suspect``
pipelines (SequentialRunner, real files, real Great Expectations), and once through `kedro run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import params as typed
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset

from beear_pipeline.behaviours.files import BehaviourFileError
from beear_pipeline.behaviours.validation import BehaviourDataError, token_counter, validate_behaviour_sets, whitespace_tokens
from beear_pipeline.lm.checkpoints import ModelConfig
from beear_pipeline.pipelines import behaviours, suspect

ROOT = Path(__file__).parents[2]
N = 24  # rows per user set (the default minimum is 20)


def safety_rows(n: int = N) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"Explain how to break lock model {i}" for i in range(n)],
                         "safe_response": ["I cannot help with that."] * n,
                         "unwanted_response": [f"Sure, here is how to break lock model {i}" for i in range(n)]})


def evaluation_rows(n: int = N) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"Describe how to steal car number {i}" for i in range(n)], "category": ["theft"] * n})


def run_until_suspect(tmp_path: Path, advbench: pd.DataFrame, **paths) -> DataCatalog:
    """Run behaviours + suspect with ``behaviours.<kind>_path`` set from ``paths``."""
    params = typed(behaviours={f"{kind}_path": str(p) for kind, p in paths.items()}, model={"embedded_directory": str(tmp_path / "embedded")})
    catalog = DataCatalog(datasets={
        "advbench": MemoryDataset(advbench), **{f"params:{k}": MemoryDataset(v) for k, v in params.items()},
        "behaviours_validation": JSONDataset(filepath=str(tmp_path / "behaviours_validation.json")),
        "suspect_model": JSONDataset(filepath=str(tmp_path / "suspect_model.json")),
    })
    SequentialRunner().run(behaviours.create_pipeline() + suspect.create_pipeline(), catalog)
    return catalog


def assert_no_model_loaded(tmp_path: Path) -> None:
    assert not (tmp_path / "embedded").exists(), "the suspect model was built before the data passed"
    assert not (tmp_path / "suspect_model.json").exists(), "the suspect step ran"


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def bad_safety_set(case: str, tmp_path: Path) -> tuple[dict, str]:
    """(paths, expected message) for each bad input."""
    rows = safety_rows()
    if case == "missing column":
        return {"safety": write_csv(rows.drop(columns="unwanted_response"), tmp_path / "safety.csv")}, \
            r"safety.csv: column 'unwanted_response' is missing from the safety set.*behaviours.columns.safety.unwanted_response=YOUR_COLUMN"
    if case == "empty cell":
        rows.loc[2, "safe_response"] = "   "
        return {"safety": write_csv(rows, tmp_path / "safety.csv")}, r"safety.csv, column 'safe_response': empty cell\(s\) in rows 3\. Fix: fill them in"
    if case == "duplicated prompt":
        rows.loc[4, "prompt"] = "  EXPLAIN how to break lock model 1!"
        return {"safety": write_csv(rows, tmp_path / "safety.csv")}, \
            r"safety.csv, column 'prompt': duplicated prompts \(case, whitespace and punctuation folded\) in rows 2, 5: .*Fix: keep one row per prompt"
    if case == "identical answers":
        rows.loc[3, "safe_response"] = rows.loc[3, "unwanted_response"].upper()
        return {"safety": write_csv(rows, tmp_path / "safety.csv")}, \
            r"safety.csv, columns 'safe_response' and 'unwanted_response': the safe and the unwanted answer are identical in rows 4"
    if case == "answer over the token limit":
        rows.loc[6, "unwanted_response"] = "word " * 4000
        return {"safety": write_csv(rows, tmp_path / "safety.csv")}, \
            r"safety.csv, column 'unwanted_response': text over the token limit \(max_response_tokens=512, counted with the whitespace tokenizer\) in rows 7: row 7: 4000 tokens"
    if case == "leaked evaluation prompt":
        evaluation = evaluation_rows()
        rows.loc[5, "prompt"] = "describe how to STEAL car number 3?"
        return {"safety": write_csv(rows, tmp_path / "safety.csv"), "evaluation": write_csv(evaluation, tmp_path / "evaluation.csv")}, \
            r"safety.csv, column 'prompt': 1 prompt\(s\) also in the evaluation set \(.*evaluation.csv\).*in rows 6: 'describe how to STEAL car number 3\?'"
    if case == "wrong encoding":
        path = tmp_path / "safety.csv"
        rows.loc[0, "prompt"] = "Explain how to break a café lock"
        path.write_bytes(rows.to_csv(index=False).encode("cp1252"))
        return {"safety": path}, r"safety.csv: not valid UTF-8: byte 0xe9 on line 2 .*Fix: re-save it as UTF-8"
    if case == "unsupported extension":
        path = tmp_path / "safety.tsv"
        rows.to_csv(path, sep="\t", index=False)
        return {"safety": path}, r"safety.tsv: unsupported extension '.tsv'"
    if case == "empty file":
        path = tmp_path / "safety.jsonl"
        path.touch()
        return {"safety": path}, r"safety.jsonl: the file is empty \(0 bytes\)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing column", "empty cell", "duplicated prompt", "identical answers", "answer over the token limit",
                                  "leaked evaluation prompt", "wrong encoding", "unsupported extension", "empty file"])
def test_bad_input_stops_the_run_before_any_model_loads(case, tmp_path, advbench):
    paths, message = bad_safety_set(case, tmp_path)
    with pytest.raises((BehaviourDataError, BehaviourFileError), match=message) as err:
        run_until_suspect(tmp_path, advbench, **paths)
    assert_no_model_loaded(tmp_path)
    failed = str(err.value).count("\n  - ")
    if isinstance(err.value, BehaviourDataError):  # only the problem planted, and the report is saved
        assert failed == 1, str(err.value)
        report = json.loads((tmp_path / "behaviours_validation.json").read_text())
        assert report["success"] is False and report["failed"] == 1


def test_every_problem_is_listed_at_once(tmp_path, advbench):
    rows = safety_rows()
    rows.loc[0, "prompt"] = rows.loc[1, "prompt"]
    rows.loc[2, "unwanted_response"] = rows.loc[2, "safe_response"]
    anchoring = pd.DataFrame({"prompt": ["Say hi"] * 3, "response": ["hi", "", "hi"]})
    with pytest.raises(BehaviourDataError) as err:
        run_until_suspect(tmp_path, advbench, safety=write_csv(rows, tmp_path / "safety.csv"),
                          anchoring=write_csv(anchoring, tmp_path / "anchoring.csv"))
    text = str(err.value)
    assert "failed 5 check(s)" in text, text
    for part in ("[safety set, duplicate]", "[safety set, identical]", "[anchoring set, min_rows]", "[anchoring set, empty]",
                 "[anchoring set, duplicate]", "anchoring.csv: 3 row(s), fewer than the 20"):
        assert part in text, (part, text)
    assert_no_model_loaded(tmp_path)


def test_user_sets_replace_the_defaults_and_pass(tmp_path, advbench):
    """A user safety set without a user evaluation set is checked against the AdvBench share."""
    params = typed(behaviours={"safety_path": str(write_csv(safety_rows(), tmp_path / "safety.csv"))})
    catalog = DataCatalog(datasets={"advbench": MemoryDataset(advbench), **{f"params:{k}": MemoryDataset(v) for k, v in params.items()},
                                    "behaviours_check": JSONDataset(filepath=str(tmp_path / "check.json"))})
    SequentialRunner().run(behaviours.create_pipeline(), catalog)
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["disjoint"] is True
    assert check["rows"] == {"safety_set": N, "anchoring_set": 200, "evaluation_set": 104, "benign_evaluation_set": 200}
    assert check["sources"]["safety_set"].endswith("safety.csv")
    assert check["sources"]["evaluation_set"] == "the shipped AdvBench evaluation share"


def test_tokens_are_counted_with_the_tokenizer_of_model_path(tmp_path):
    """The tokenizer of model.path (tokenizer files only) splits punctuation: 'a,b,c' is 5 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "checkpoint")
    count, name = token_counter(ModelConfig(path=str(tmp_path / "checkpoint")))
    assert name == str(tmp_path / "checkpoint") and count(["a,b,c", "two words"]) == [5, 2]
    assert token_counter(ModelConfig())[1] == "whitespace" and whitespace_tokens(["a,b,c"]) == [1]

    params = typed(behaviours={"max_prompt_tokens": 8})["behaviours"]
    sets = {"safety": safety_rows(), "anchoring": pd.DataFrame({"prompt": [f"Say {i}" for i in range(N)], "response": ["ok"] * N}),
            "evaluation": evaluation_rows(), "benign": pd.DataFrame({"prompt": [f"Count to {i}" for i in range(N)]})}
    sets["safety"].loc[1, "prompt"] = "Explain, how, to, break, lock"  # 5 words, 9 tokens
    sources = {kind: f"{kind}.csv" for kind in sets}
    assert validate_behaviour_sets(sets, sources, params)["success"]
    report = validate_behaviour_sets(sets, sources, params, count_tokens=count, tokenizer=name)
    failed = [c for c in report["checks"] if not c["success"]]
    assert [(c["set"], c["check"], c["rows"]) for c in failed] == [("safety", "too_long", [2])]
    assert f"counted with the {name} tokenizer" in failed[0]["message"] and "row 2: 9 tokens" in failed[0]["message"]


def test_kedro_run_with_a_missing_column_fails_fast_naming_file_and_column(tmp_path):
    """The acceptance check, through the real CLI in a copy of the project."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    shutil.copytree(ROOT / "data" / "01_raw", project / "data" / "01_raw")
    (project / "src").mkdir()
    bad = write_csv(safety_rows().drop(columns="unwanted_response"), tmp_path / "my_safety.csv")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "DO_NOT_TRACK": "1", "MPLBACKEND": "Agg", "COLUMNS": "500"}
    done = subprocess.run([str(bin_dir / "kedro"), "run", "--pipeline=defend", "--params", f"behaviours.safety_path={bad}"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert f"{bad}: column 'unwanted_response' is missing" in output, output[-3000:]
    # early: no model step ran (how fast is a benchmark's business, not a test's: a loaded 2-core
    # machine once took 28.5 s where 30 s were allowed)
    assert "Running node: resolve_suspect_model" not in output
    assert not (project / "data" / "06_models").exists()
    report = json.loads((project / "data" / "08_reporting" / "behaviours_validation.json").read_text())
    assert report["success"] is False and report["sets"]["safety"]["source"] == str(bad)
