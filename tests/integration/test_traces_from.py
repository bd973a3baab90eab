"""Traces from a serving engine (``ctd traces --from FILE.jsonl``) parse exactly as the model's own.

Each test generates a few traces the normal way, writes their text as an engine would return it
(the raw completion, or an API's reasoning / answer split), imports the file into another run and
compares the two ``traces.parquet`` column by column.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from analyses.interface.cli import main
from analyses.methods.prompts import get_template
from analyses.models.generation import engine_prompts, join_reasoning
from probes.models import load_tokenizer

N_DOCS, N_DEV = 3, 2


def _plain(value):
    """A parquet cell as plain Python (arrays to lists, inside dicts too), for comparison."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _column(frame: pd.DataFrame, name: str) -> list:
    return [_plain(v) for v in frame[name]]


def _assert_same(imported: pd.DataFrame, expected: pd.DataFrame, columns=None) -> None:
    columns = list(expected.columns) if columns is None else columns
    assert list(imported.columns) == list(expected.columns)
    for name in columns:
        assert _column(imported, name) == _column(expected, name), name


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _generate(root, model, *extra) -> tuple:
    run = root / "generated"
    assert main(["traces", "--out", str(run), "--model", str(model), "--n-docs", str(N_DOCS), "--n-dev-docs", str(N_DEV), *extra]) == 0
    return run, pd.read_parquet(run / "traces.parquet"), pd.read_parquet(run / "dev_traces.parquet")


def _import(run, model, path, *extra) -> int:
    return main(["traces", "--out", str(run), "--model", str(model), "--from", str(path), *extra])


@pytest.fixture(scope="module")
def organism_generated(tmp_path_factory, organism_path):
    return _generate(tmp_path_factory.mktemp("organism_traces"), organism_path)


@pytest.fixture(scope="module")
def tiny_generated(tmp_path_factory, tiny_models):
    return _generate(tmp_path_factory.mktemp("tiny_traces"), tiny_models["qwen3"], "--max-new-tokens", "16")


_QWEN3_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_models):
    """The tiny Qwen3 folder with a chat template that opens the think block (as Qwen3's does)."""
    folder = tmp_path_factory.mktemp("chat") / "qwen3"
    shutil.copytree(tiny_models["qwen3"], folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.chat_template = _QWEN3_CHAT
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def chat_generated(tmp_path_factory, chat_model):
    return _generate(tmp_path_factory.mktemp("chat_traces"), chat_model, "--max-new-tokens", "16")


def test_engine_completions_parse_as_the_organisms_own(organism_generated, organism_path, tmp_path, capsys):
    """Raw completions, dev documents mixed in and the file out of order: traces.parquet holds the
    test documents in the file's order, dev_traces.parquet the dev ones, equal on every column."""
    _, traces, dev = organism_generated
    assert traces["well_formed"].all() and traces["true_boundary"].notna().all()
    order = [dev.iloc[0], traces.iloc[2], traces.iloc[0], dev.iloc[1], traces.iloc[1]]
    path = tmp_path / "engine.jsonl"
    _write(path, [{"doc_id": r["doc_id"], "completion": r["text"]} for r in order])
    run = tmp_path / "imported"
    assert _import(run, organism_path, path) == 0
    _assert_same(pd.read_parquet(run / "traces.parquet"), traces.iloc[[2, 0, 1]])
    _assert_same(pd.read_parquet(run / "dev_traces.parquet"), dev)
    record = json.loads((run / "manifest.json").read_text())["stages"]["traces"]
    assert record["status"] == "complete" and record["from_file"]["path"] == str(path.resolve()) and record["from_file"]["rows"] == 5
    assert len(record["from_file"]["sha256"]) == 64 and record["counts"] == {"traces": 3, "malformed": 0, "dev_traces": 2}
    assert record["dev_split"] == "dev" and record["config"]["from_file"] == str(path)
    # the prompts handed to the engine are the ones generation used
    docs = pd.read_parquet(run / "docs.parquet").set_index("doc_id").loc[list(traces["doc_id"])].reset_index()
    prompts = engine_prompts(organism_path, docs)
    assert _column(prompts, "prompt_ids") == _column(traces, "prompt_ids") and prompts["message"].isna().all()
    assert list(prompts["prompt"]) == [load_tokenizer(organism_path).decode(ids) for ids in prompts["prompt_ids"]]


def test_the_reasoning_answer_split_joins_as_the_model_wrote(organism_generated, organism_path, tmp_path):
    """An API's split: stripped pieces (as many APIs return them) and verbatim pieces (vLLM's and
    SGLang's reasoning parsers cut at the marker) both rebuild the model's own trace."""
    _, traces, dev = organism_generated
    close = get_template("organism").think_close
    rows = []
    for i, r in enumerate(list(traces.itertuples()) + list(dev.itertuples())):
        reasoning, _, answer = r.text.partition(close)
        if i % 2 == 0:
            reasoning, answer = reasoning.strip(), answer.strip()
        rows.append({"doc_id": r.doc_id, "reasoning": reasoning, "answer": answer})
    path = tmp_path / "split.jsonl"
    _write(path, rows)
    run = tmp_path / "imported"
    assert _import(run, organism_path, path) == 0
    _assert_same(pd.read_parquet(run / "traces.parquet"), traces)
    _assert_same(pd.read_parquet(run / "dev_traces.parquet"), dev)


def test_engine_completions_on_a_tiny_model(tiny_generated, tiny_models, tmp_path):
    """A tiny random model (a chat family's plain template): the prompt is rebuilt token for token,
    the text and everything parsed from it agree, and the output ids are the text's own encoding
    (a random model's ids are rarely the tokenizer's; where they are, every column agrees)."""
    _, traces, dev = tiny_generated
    model = tiny_models["qwen3"]
    rows = [{"doc_id": r.doc_id, "completion": r.text} for r in traces.itertuples()]
    rows += [{"doc_id": r.doc_id, "reasoning": r.text, "answer": None} for r in dev.itertuples()]  # never closed its reasoning
    path = tmp_path / "engine.jsonl"
    _write(path, rows)
    run = tmp_path / "imported"
    assert _import(run, model, path) == 0
    tokenizer = load_tokenizer(model)
    for generated, name in ((traces, "traces"), (dev, "dev_traces")):
        imported = pd.read_parquet(run / f"{name}.parquet")
        text_columns = ["doc_id", "prompt_ids", "text", "shortlist", "answer", "well_formed", "cot_start", "true_boundary", "document_start", "document_end", "unknown_answer_codes", "problems"]
        _assert_same(imported, generated, text_columns)
        assert _column(imported, "output_ids") == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in generated["text"]]
        for i in range(len(generated)):
            n_prompt = len(generated["prompt_ids"].iloc[i])
            assert list(imported["regions"].iloc[i][:n_prompt]) == list(generated["regions"].iloc[i][:n_prompt])
            if list(generated["output_ids"].iloc[i]) == list(imported["output_ids"].iloc[i]):
                _assert_same(imported.iloc[[i]], generated.iloc[[i]])


def test_a_chat_template_model_imports_with_its_layout(chat_generated, chat_model, tmp_path, capsys):
    """A model prompted through its chat template, which opens ``<think>``: the engine's prompt (or
    its chat message) is the suite's, and a stripped split joins as the ``</think>`` families write
    (one newline before the marker, two after), giving the raw completion's trace. A file without
    dev documents says heads cannot be ranked and how to add them, and leaves no dev traces behind."""
    generated_run, traces, _ = chat_generated
    tokenizer = load_tokenizer(chat_model)
    record = json.loads((generated_run / "manifest.json").read_text())["stages"]["traces"]
    assert record["template"] == "qwen3-chat" and tokenizer.decode(traces["prompt_ids"].iloc[0]).endswith("<think>\n")
    docs = pd.read_parquet(generated_run / "docs.parquet").set_index("doc_id").loc[list(traces["doc_id"])].reset_index()
    prompts = engine_prompts(chat_model, docs)
    assert _column(prompts, "prompt_ids") == _column(traces, "prompt_ids")
    for message, prompt in zip(prompts["message"], prompts["prompt"]):  # what a chat endpoint renders from the message
        assert tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True, enable_thinking=True) + "\n" == prompt

    reasoning, answer = "Candidates: I50.21 acute systolic heart failure.\nCheck I50.21: acute noted -> keep.", "<answer>I50.21</answer>"
    completion = reasoning + "\n</think>\n\n" + answer
    assert join_reasoning(get_template("qwen3-chat"), reasoning, answer) == completion
    assert join_reasoning(get_template("qwen3-chat"), reasoning, None) == reasoning
    frames = []
    for form in ("completion", "split"):
        rows = [{"doc_id": d, "completion": completion} if form == "completion" else {"doc_id": d, "reasoning": reasoning, "answer": answer} for d in traces["doc_id"]]
        path = tmp_path / f"{form}.jsonl"
        _write(path, rows)
        run = tmp_path / form
        shutil.copytree(generated_run, run)  # a run with dev traces: they must not survive the import
        capsys.readouterr()
        assert _import(run, chat_model, path) == 0
        err = capsys.readouterr().err
        assert "cannot be ranked" in err and "dev documents" in err and "--from" in err
        assert not (run / "dev_traces.parquet").exists()
        record = json.loads((run / "manifest.json").read_text())["stages"]["traces"]
        assert record["counts"]["dev_traces"] == 0 and record["dev_split"] is None and "dev_traces.parquet" not in record["outputs"]
        frames.append(pd.read_parquet(run / "traces.parquet"))
    _assert_same(frames[1], frames[0])
    imported = frames[0]
    assert _column(imported, "prompt_ids") == _column(traces, "prompt_ids") and list(imported["text"]) == [completion] * len(traces)
    assert imported["well_formed"].all() and list(imported["problems"].map(list)) == [[]] * len(traces)
    assert _column(imported, "output_ids") == [tokenizer(completion, add_special_tokens=False)["input_ids"]] * len(traces)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, organism_path):
    """A run with its documents only (the data stage), copied by each bad-row test."""
    run = tmp_path_factory.mktemp("data_only") / "run"
    assert main(["run", "--model", str(organism_path), "--out", str(run), "--until", "data"]) == 0
    return run


def _bad_rows(docs: pd.DataFrame) -> dict:
    test_id = docs.loc[docs["split"] == "test", "doc_id"].iloc[0]
    train_id = docs.loc[docs["split"] == "train", "doc_id"].iloc[0]
    good = json.dumps({"doc_id": test_id, "completion": "Candidates: I10 essential hypertension.\n</think>\n<answer>I10</answer>"})
    other = docs.loc[docs["split"] == "test", "doc_id"].iloc[1]
    return {
        "unknown doc_id": (good, json.dumps({"doc_id": "no-such-note", "completion": "x"}), "unknown doc_id"),
        "missing field": (good, json.dumps({"doc_id": other, "text": "x"}), "neither completion nor reasoning and answer"),
        "half a split": (good, json.dumps({"doc_id": other, "reasoning": "x"}), "reasoning without answer"),
        "empty completion": (good, json.dumps({"doc_id": other, "completion": ""}), "empty completion"),
        "bad JSON": (good, '{"doc_id": "' + other + '", "completion": "x"', "bad JSON"),
        "duplicated doc_id": (good, good, "repeats line 1"),
        "a train document": (good, json.dumps({"doc_id": train_id, "completion": "x"}), "is a train document, not one of the test or dev documents"),
    }


@pytest.mark.parametrize("kind", ["unknown doc_id", "missing field", "half a split", "empty completion", "bad JSON", "duplicated doc_id", "a train document"])
def test_a_bad_row_stops_with_file_line_and_fix_and_writes_nothing(kind, data_run, organism_path, tmp_path, capsys):
    first, bad, problem = _bad_rows(pd.read_parquet(data_run / "docs.parquet"))[kind]
    path = tmp_path / "engine.jsonl"
    path.write_text(first + "\n\n" + bad + "\n" + first.replace("I10", "I11") + "\n")  # the bad row is line 3 (a blank line is skipped)
    run = tmp_path / "run"
    shutil.copytree(data_run, run)
    capsys.readouterr()
    assert _import(run, organism_path, path) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"ctd: error: {path}:3: ") and problem in err and "; " in err.split(problem, 1)[1]  # the fix follows
    assert not (run / "traces.parquet").exists() and not (run / "dev_traces.parquet").exists()
