"""Traces from a model: prompt each document, generate a chain of thought and answer, parse it.

Generation is Hugging Face ``generate`` with its KV cache, batched with left padding (the position
ids follow the attention mask). Each trace is parsed into mentions, shortlist, answer and per-token
regions; malformed traces are kept and flagged. The traces stage (:mod:`analyses.stages.traces`)
writes a run's traces with it; the organism's and the student base's evaluations and the
distillation study generate through it too.

Traces a serving engine generated (vLLM, SGLang, an API's reasoning content) come in as JSONL
(``ctd traces --from``): each prompt is rebuilt as generation builds it, the completion is
tokenised after it, and the same code parses it and builds its row.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.machinery.settings import GenerationSettings
from analyses.models.organism.format import boundary_char, default_organism_path
from analyses.methods.parsing import TraceParser, token_char_spans
from analyses.methods.prompts import PromptTemplate, default_template, get_template
from analyses.tasks.labels import LabelSpace
from analyses.tasks.sources import near_misses_of
from probes.errors import CtdInputError, input_error

__all__ = [
    "GenerationConfig",
    "generate_traces",
    "resolve_model_path",
    "template_for",
    "engine_prompts",
    "read_engine_traces",
    "import_traces",
    "join_reasoning",
    "EngineTraces",
]


GenerationConfig = GenerationSettings  # the traces stage's generation settings (analyses.machinery.settings)


def resolve_model_path(model: str | Path | None) -> Path:
    """``model`` as a folder, or the shipped organism when None."""
    path = default_organism_path() if model is None else Path(model)
    if not path.exists():
        if model is None:
            raise input_error(path, "the shipped organism is missing", "restore analyses/assets/organism from git, or run `ctd organism train`")
        raise input_error(path, "model folder not found", "pass --model the folder of a Hugging Face causal LM")
    return path


def template_for(model_dir: Path, template_name: str | None, tokenizer=None) -> PromptTemplate:
    """The prompt template named ``template_name``, else the model's default (the organism's for the
    organism, else its family's, read from its tokenizer)."""
    if template_name is not None:
        return get_template(template_name)
    if (model_dir / "ctd_organism.json").exists():
        return get_template("organism")
    from probes.models import family_of, load_tokenizer

    family, _ = family_of(model_dir)
    return default_template(family, tokenizer if tokenizer is not None else load_tokenizer(model_dir))


@dataclass(frozen=True)
class _Prompt:
    """One document's prompt as the model reads it: its text, token ids, each token's character span
    in the text, and the document's character span there."""

    text: str
    ids: list[int]
    spans: list[tuple[int, int]]
    document_span: tuple[int, int]


def _render_prompts(template: PromptTemplate, tokenizer, docs: pd.DataFrame, labels: LabelSpace, candidates: list[list[int]] | None = None) -> list[_Prompt]:
    """The prompt of each row of ``docs``: the generation's input, and an imported trace's prefix."""
    prompts = []
    for i, (_, doc) in enumerate(docs.iterrows()):
        cand = None
        if template.uses_candidates:
            if candidates is None:
                raise CtdInputError(f"template {template.name} needs candidates; pass candidates or use a plain template")
            cand = [labels.codes[c] for c in candidates[i]]
        text, document_span = template.render(doc["text"], cand, tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        prompts.append(_Prompt(text, encoded["input_ids"], [tuple(s) for s in encoded["offset_mapping"]], document_span))
    return prompts


def _trace_row(parser: TraceParser, tokenizer, template: PromptTemplate, doc, prompt: _Prompt, output_ids: list[int]) -> dict:
    """One ``traces.parquet`` row: the output (cut at the end-of-text token) parsed after its prompt.
    Generated and imported traces both go through here."""
    eos = tokenizer.eos_token_id
    generated = list(output_ids[: output_ids.index(eos)] if eos in output_ids else output_ids)
    doc_span = prompt.document_span
    doc_anchors = doc["anchors"] if "anchors" in doc and doc["anchors"] is not None else []
    anchors = [(doc_span[0] + int(a["start"]), doc_span[0] + int(a["end"])) for a in doc_anchors]
    parsed = parser.parse(
        tokenizer,
        prompt.ids,
        generated,
        document_span=doc_span,
        prompt_spans=prompt.spans,
        anchors=anchors,
        gold=[int(g) for g in doc["gold"]],
        near_miss=near_misses_of(doc),
    )
    true_boundary = None
    if template.family == "organism":
        at = boundary_char(parsed.text)
        if at is not None:
            _, spans = token_char_spans(tokenizer, generated)
            starts = np.array([s for s, _ in spans])
            true_boundary = len(prompt.ids) + int(np.searchsorted(starts, at, side="left"))
    return {
        "doc_id": doc["doc_id"],
        "prompt_ids": prompt.ids,
        "output_ids": generated,
        "text": parsed.text,
        "shortlist": parsed.shortlist,
        "answer": parsed.answer,
        "well_formed": parsed.well_formed,
        "cot_start": parsed.cot_start,
        "cot_end": parsed.cot_end,
        "true_boundary": true_boundary,
        "document_start": doc_span[0],
        "document_end": doc_span[1],
        "mentions": [{"label_id": m.label_id, "token_start": m.token_start, "token_end": m.token_end, "kind": m.kind} for m in parsed.mentions],
        "regions": parsed.regions.tolist(),
        "shortlist_growth": parsed.shortlist_growth.tolist(),
        "unknown_answer_codes": parsed.unknown_answer_codes,
        "problems": parsed.problems,
    }


def _trace_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["true_boundary"] = frame["true_boundary"].astype("Int64") if len(frame) else frame.get("true_boundary")
    return frame


def generate_traces(
    model: str | Path,
    docs: pd.DataFrame,
    labels: LabelSpace,
    template_name: str | None = None,
    config: GenerationConfig | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    candidates: list[list[int]] | None = None,
    hf_model=None,
    tokenizer=None,
    generate=None,
) -> pd.DataFrame:
    """Generate and parse one trace per row of ``docs`` (columns ``doc_id``, ``text``, ``gold``...).

    Returns the ``traces.parquet`` frame (DESIGN §4 columns plus mentions, regions and the
    shortlist-growth curve). ``candidates`` (label ids per document) fill candidate templates.
    ``generate(input_ids, attention_mask, max_new_tokens)`` (optional) replaces greedy HF
    generation and returns each row's new tokens (the ablate stage generates with heads ablated).
    """
    from tqdm.auto import tqdm

    from probes.models import load_hf_model, load_tokenizer

    config = config or GenerationConfig()
    if batch_size is not None:
        config.batch_size = batch_size
    model_dir = Path(model)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    template = template_for(model_dir, template_name, tokenizer)
    hf_model = hf_model or load_hf_model(model_dir, attn_implementation=config.attn_implementation, device_map=config.device_map)
    parser = TraceParser.for_template(labels, template)
    eos_ids = [tokenizer.eos_token_id]
    generator = torch.Generator().manual_seed(config.seed)

    rows = []
    n = len(docs)
    bar = tqdm(total=n, desc="traces", disable=not progress, file=sys.stderr)
    for b0 in range(0, n, config.batch_size):
        batch = docs.iloc[b0 : b0 + config.batch_size]
        prompts = _render_prompts(template, tokenizer, batch, labels, None if candidates is None else candidates[b0 : b0 + len(batch)])
        width = max(len(p.ids) for p in prompts)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in prompts])
        attention = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prompts])
        if generate is not None:
            new_tokens = generate(input_ids, attention, config.max_new_tokens)
            for i, (_, doc) in enumerate(batch.iterrows()):
                rows.append(_trace_row(parser, tokenizer, template, doc, prompts[i], list(new_tokens[i])))
            bar.update(len(batch))
            continue
        with torch.no_grad():
            if config.do_sample:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            out = hf_model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=config.max_new_tokens,
                do_sample=config.do_sample,
                temperature=config.temperature if config.do_sample else None,
                top_p=config.top_p if config.do_sample else None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=eos_ids,
            )
        for i, (_, doc) in enumerate(batch.iterrows()):
            rows.append(_trace_row(parser, tokenizer, template, doc, prompts[i], out[i, width:].tolist()))
        bar.update(len(batch))
    bar.close()
    return _trace_frame(rows)


# ------------------------------------------------------------------------------------------------
# traces from a serving engine (``ctd traces --from FILE.jsonl``): the two-pass design needs only
# the text, so vLLM, SGLang or an API may generate; the suite rebuilds each prompt and parses.

_ROW_FORMAT = 'write one JSON object per line: {"doc_id": ..., "completion": TEXT} or {"doc_id": ..., "reasoning": TEXT, "answer": TEXT}'


def engine_prompts(model: str | Path, docs: pd.DataFrame, template_name: str | None = None, tokenizer=None) -> pd.DataFrame:
    """The prompts to hand a serving engine, built as :func:`generate_traces` builds its own.

    Returns one row per row of ``docs``: ``doc_id``, ``split``, ``prompt`` (the text, the model's
    chat template applied), ``prompt_ids`` (its tokens, no special tokens added: give these to the
    engine, which would otherwise add a second BOS) and ``message`` (the user turn, for a chat
    endpoint that applies the template itself; None for a template that is not a chat template).
    """
    from probes.models import load_tokenizer

    model_dir = Path(model)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    template = template_for(model_dir, template_name, tokenizer)
    prompts = _render_prompts(template, tokenizer, docs, None)
    # a chat template wraps the body (the document in the template's request) in the user turn
    messages = [template.body.replace("{document}", text) if template.chat else None for text in docs["text"]]
    return pd.DataFrame({"doc_id": list(docs["doc_id"]), "split": list(docs["split"]), "prompt": [p.text for p in prompts], "prompt_ids": [p.ids for p in prompts], "message": messages})


def _close_layout(template: PromptTemplate) -> tuple[str, str]:
    """What the model writes before and after its think-close marker: the organism's format puts
    a newline on each side; the chat templates of the ``<think>`` families (Qwen3, DeepSeek-R1, ...)
    write a past turn with one newline before ``</think>`` and two after; other markers stand bare."""
    if template.family == "organism":
        return "\n", "\n"
    if template.think_close == "</think>":
        return "\n", "\n\n"
    return "", ""


def join_reasoning(template: PromptTemplate, reasoning: str | None, answer: str | None) -> str:
    """The completion behind an API's split of it (``reasoning_content``, ``content``).

    vLLM's and SGLang's reasoning parsers cut the text at the think-close marker and keep both
    pieces verbatim: where a piece keeps whitespace at the cut, they join with the bare marker.
    APIs that strip both pieces get the layout the model writes (:func:`_close_layout`). A null
    answer: the model never closed its reasoning (the text is the reasoning alone); a null
    reasoning: the engine found no think-close (the text is the answer alone).
    """
    if answer is None:
        return reasoning or ""
    if reasoning is None:
        return answer
    if reasoning[-1:].isspace() or answer[:1].isspace():
        return reasoning + template.think_close + answer
    before, after = _close_layout(template)
    return reasoning + before + template.think_close + after + answer


def _completion_of(row: dict, template: PromptTemplate, path: Path, line: int) -> str:
    has_split = "reasoning" in row or "answer" in row
    if "completion" in row and has_split:
        raise input_error(path, "both a completion and reasoning/answer", "give the engine's raw text as completion, or the API's split as reasoning and answer, not both", line)
    if "completion" in row:
        text = row["completion"]
        if not isinstance(text, str):
            raise input_error(path, f"completion is not a string ({type(text).__name__})", _ROW_FORMAT, line)
    elif "reasoning" in row and "answer" in row:
        for name in ("reasoning", "answer"):
            if row[name] is not None and not isinstance(row[name], str):
                raise input_error(path, f"{name} is neither a string nor null ({type(row[name]).__name__})", _ROW_FORMAT, line)
        text = join_reasoning(template, row["reasoning"], row["answer"])
    else:
        problem = "neither completion nor reasoning and answer" if not has_split else f"{'reasoning' if 'reasoning' in row else 'answer'} without {'answer' if 'reasoning' in row else 'reasoning'}"
        raise input_error(path, problem, _ROW_FORMAT + " (answer null where the model never closed its reasoning)", line)
    if not text.strip():
        raise input_error(path, "empty completion", "drop the row or regenerate the document (an engine returns nothing on an error or a zero token budget)", line)
    return text


@dataclass(frozen=True)
class EngineTraces:
    """A serving engine's completions, validated: one per document, in the file's order."""

    path: Path
    doc_ids: list
    completions: list[str]
    sha256: str


def read_engine_traces(path: str | Path, docs: pd.DataFrame, template: PromptTemplate, splits: tuple[str, ...] | None = None) -> EngineTraces:
    """Read and check every row of an engine's JSONL before anything is written.

    Each line is ``{"doc_id": ..., "completion": TEXT}`` (the raw text the engine returned for the
    document's prompt, reasoning included) or ``{"doc_id": ..., "reasoning": TEXT, "answer": TEXT}``
    (an API's split, joined by :func:`join_reasoning`). Blank lines are skipped. A bad row (bad
    JSON, a missing field, an empty completion, a doc_id not in ``docs``, given twice or of a
    split outside ``splits`` when given) is a one-line :class:`CtdInputError` naming the file, the
    line and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found", "pass --from the JSONL file the engine's completions were written to")
    raw = path.read_bytes()
    known = {str(d): d for d in docs["doc_id"]}
    split_of = dict(zip((str(d) for d in docs["doc_id"]), docs["split"]))
    seen: dict[str, int] = {}
    doc_ids, completions = [], []
    for number, data in enumerate(raw.split(b"\n"), start=1):
        if not data.strip():
            continue
        try:
            row = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise input_error(path, "not UTF-8 text", "write the file as UTF-8", number) from None
        except json.JSONDecodeError as exc:
            raise input_error(path, f"bad JSON ({exc.msg}, column {exc.colno})", _ROW_FORMAT, number) from None
        if not isinstance(row, dict):
            raise input_error(path, f"a JSON {type(row).__name__}, not an object", _ROW_FORMAT, number)
        if "doc_id" not in row:
            raise input_error(path, "no doc_id", _ROW_FORMAT, number)
        key = str(row["doc_id"])
        if key not in known:
            raise input_error(path, f"unknown doc_id {row['doc_id']!r}", "use the doc_ids of the run's docs.parquet (the documents whose prompts the engine was given, see analyses.models.generation.engine_prompts)", number)
        if key in seen:
            raise input_error(path, f"doc_id {row['doc_id']!r} repeats line {seen[key]}", "keep one trace per document", number)
        if splits is not None and split_of[key] not in splits:
            raise input_error(path, f"doc_id {row['doc_id']!r} is a {split_of[key]} document, not one of the {' or '.join(splits)} documents traced", f"drop the row, or pass --split {split_of[key]}", number)
        seen[key] = number
        completions.append(_completion_of(row, template, path, number))
        doc_ids.append(known[key])
    if not doc_ids:
        raise input_error(path, "no traces in the file", _ROW_FORMAT)
    return EngineTraces(path, doc_ids, completions, hashlib.sha256(raw).hexdigest())


def import_traces(
    model: str | Path,
    docs: pd.DataFrame,
    labels: LabelSpace,
    completions: list[str],
    template_name: str | None = None,
    tokenizer=None,
    candidates: list[list[int]] | None = None,
) -> pd.DataFrame:
    """Parse completions a serving engine wrote for the prompts of ``docs`` (one per row), exactly
    as :func:`generate_traces` parses its own: the prompt is rebuilt with the model's template and
    the completion is tokenised on its own, as generate's output ids follow the prompt's. Where
    the tokenizer encodes the text as the model wrote it, the frame equals generation's."""
    from probes.models import load_tokenizer

    model_dir = Path(model)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    template = template_for(model_dir, template_name, tokenizer)
    parser = TraceParser.for_template(labels, template)
    prompts = _render_prompts(template, tokenizer, docs, labels, candidates)
    rows = [
        _trace_row(parser, tokenizer, template, doc, prompt, tokenizer(completion, add_special_tokens=False)["input_ids"])
        for (_, doc), prompt, completion in zip(docs.iterrows(), prompts, completions)
    ]
    return _trace_frame(rows)
