"""Traces: prompt each document, generate a chain of thought and answer, parse it (``ctd traces``).

Generation is Hugging Face ``generate`` with its KV cache, batched with left padding (the position
ids follow the attention mask). Each trace is parsed into mentions, shortlist, answer and per-token
regions; malformed traces are kept and flagged, and the stage prints how many there were.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.io import write_parquet
from analyses.settings import GenerationSettings
from analyses.organism import boundary_char, default_organism_path
from analyses.parsing import TraceParser, token_char_spans
from analyses.prompts import PromptTemplate, default_template, get_template
from analyses.tasks.labels import LabelSpace
from analyses.tasks.sources import near_misses_of
from probes.distributed import barrier, rank_and_world, shard_for_rank
from probes.errors import CtdInputError, input_error

__all__ = ["GenerationConfig", "generate_traces", "make_traces", "resolve_model_path", "default_dev_docs", "dev_documents"]


GenerationConfig = GenerationSettings  # the traces stage's generation settings (analyses.settings)


def resolve_model_path(model: str | Path | None) -> Path:
    """``model`` as a folder, or the shipped organism when None."""
    path = default_organism_path() if model is None else Path(model)
    if not path.exists():
        if model is None:
            raise input_error(path, "the shipped organism is missing", "restore analyses/assets/organism from git, or run `ctd organism train`")
        raise input_error(path, "model folder not found", "pass --model the folder of a Hugging Face causal LM")
    return path


def _template_for(model_dir: Path, template_name: str | None, tokenizer=None) -> PromptTemplate:
    if template_name is not None:
        return get_template(template_name)
    if (model_dir / "ctd_organism.json").exists():
        return get_template("organism")
    from probes.models import family_of, load_tokenizer

    family, _ = family_of(model_dir)
    return default_template(family, tokenizer if tokenizer is not None else load_tokenizer(model_dir))


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
) -> pd.DataFrame:
    """Generate and parse one trace per row of ``docs`` (columns ``doc_id``, ``text``, ``gold``...).

    Returns the ``traces.parquet`` frame (DESIGN §4 columns plus mentions, regions and the
    shortlist-growth curve). ``candidates`` (label ids per document) fill candidate templates.
    """
    from tqdm.auto import tqdm

    from probes.models import load_hf_model, load_tokenizer

    config = config or GenerationConfig()
    if batch_size is not None:
        config.batch_size = batch_size
    model_dir = Path(model)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    template = _template_for(model_dir, template_name, tokenizer)
    hf_model = hf_model or load_hf_model(model_dir, attn_implementation=config.attn_implementation, device_map=config.device_map)
    parser = TraceParser.for_template(labels, template)
    eos_ids = [tokenizer.eos_token_id]
    generator = torch.Generator().manual_seed(config.seed)

    rows = []
    n = len(docs)
    bar = tqdm(total=n, desc="traces", disable=not progress, file=sys.stderr)
    for b0 in range(0, n, config.batch_size):
        batch = docs.iloc[b0 : b0 + config.batch_size]
        rendered = []
        for i, (_, doc) in enumerate(batch.iterrows()):
            cand = None
            if template.uses_candidates:
                if candidates is None:
                    raise CtdInputError(f"template {template.name} needs candidates; pass candidates or use a plain template")
                cand = [labels.codes[c] for c in candidates[b0 + i]]
            rendered.append(template.render(doc["text"], cand, tokenizer))
        encoded = [tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text, _ in rendered]
        prompt_ids = [e["input_ids"] for e in encoded]
        width = max(len(p) for p in prompt_ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
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
            generated = out[i, width:].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            prompt_text, doc_span = rendered[i]
            doc_anchors = doc["anchors"] if "anchors" in doc and doc["anchors"] is not None else []
            anchors = [(doc_span[0] + int(a["start"]), doc_span[0] + int(a["end"])) for a in doc_anchors]
            gold = [int(g) for g in doc["gold"]]
            near = near_misses_of(doc)
            parsed = parser.parse(
                tokenizer,
                prompt_ids[i],
                generated,
                document_span=doc_span,
                prompt_spans=[tuple(s) for s in encoded[i]["offset_mapping"]],
                anchors=anchors,
                gold=gold,
                near_miss=near,
            )
            true_boundary = None
            if template.family == "organism":
                at = boundary_char(parsed.text)
                if at is not None:
                    _, spans = token_char_spans(tokenizer, generated)
                    starts = np.array([s for s, _ in spans])
                    true_boundary = len(prompt_ids[i]) + int(np.searchsorted(starts, at, side="left"))
            rows.append(
                {
                    "doc_id": doc["doc_id"],
                    "prompt_ids": prompt_ids[i],
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
                    "mentions": [
                        {"label_id": m.label_id, "token_start": m.token_start, "token_end": m.token_end, "kind": m.kind} for m in parsed.mentions
                    ],
                    "regions": parsed.regions.tolist(),
                    "shortlist_growth": parsed.shortlist_growth.tolist(),
                    "unknown_answer_codes": parsed.unknown_answer_codes,
                    "problems": parsed.problems,
                }
            )
        bar.update(len(batch))
    bar.close()
    frame = pd.DataFrame(rows)
    frame["true_boundary"] = frame["true_boundary"].astype("Int64") if len(frame) else frame.get("true_boundary")
    return frame


def default_dev_docs(model_dir: Path, template_name: str | None = None) -> int:
    """Dev traces generated beside the test traces by default, for every model: the patch stage
    ranks heads on them (never on the test traces it measures), and where traces carry a known
    boundary (the embedded organism) they also fit the ``constant`` estimator and tune the internal
    one. 100 for the organism, 50 for other models (each is a generation of a real model); fewer
    when the dataset has fewer (see :func:`make_traces`)."""
    return 100 if _template_for(Path(model_dir), template_name).family == "organism" else 50


def dev_documents(dataset, n_dev_docs: int) -> tuple[pd.DataFrame, str]:
    """The first ``n_dev_docs`` documents of the dev split, or of the training split for a dataset
    without one (XC-repo folders ship train and test only); never a test document."""
    for split in ("dev", "train"):
        docs = dataset.split(split)
        if len(docs):
            return docs.head(n_dev_docs), split
    return dataset.docs.head(0), ""


def make_traces(
    run_dir: Path,
    dataset,
    model_dir: Path,
    split: str = "test",
    n_docs: int | None = None,
    n_dev_docs: int | None = None,
    template_name: str | None = None,
    config: GenerationConfig | None = None,
    progress: bool = True,
    record: dict | None = None,
) -> pd.DataFrame:
    """Generate, parse and write ``traces.parquet`` (the ``split`` documents) and
    ``dev_traces.parquet`` (``n_dev_docs`` dev documents, see :func:`default_dev_docs`); under
    torchrun each rank generates its share and rank 0 joins them. Writes no manifest.

    Args:
        run_dir: the run directory (its ``docs.parquet`` and ``labels.parquet`` already written).
        model_dir: a model folder.
        record: facts for the manifest's stage record (counts, processes) are added here.
    """
    run_dir = Path(run_dir)
    config = config or GenerationConfig()
    record = {} if record is None else record
    docs = dataset.split(split) if split != "all" else dataset.docs
    if n_docs is not None:
        if len(docs) < n_docs:
            raise input_error(run_dir, f"--n-docs {n_docs} asks for more documents than split {split!r} holds ({len(docs)})", f"ask for at most {len(docs)}, or generate more notes (--opt n_docs=N)")
        docs = docs.head(n_docs)
    if docs.empty:
        raise input_error(run_dir, f"no documents in split {split!r}", "choose another --split or a dataset with that split")
    n_dev_docs = default_dev_docs(model_dir, template_name) if n_dev_docs is None else n_dev_docs
    dev_docs, dev_split = dev_documents(dataset, n_dev_docs) if n_dev_docs and split not in ("dev", "all") else (dataset.docs.head(0), "")
    if n_dev_docs and split not in ("dev", "all"):
        if dev_docs.empty:
            print("[traces] the dataset has no dev or train documents: no dev traces (ctd patch will refuse to rank heads on test traces)", file=sys.stderr)
        elif dev_split != "dev":
            print(f"[traces] the dataset has no dev split: {len(dev_docs)} dev traces drawn from its {dev_split} split", file=sys.stderr)
        elif len(dev_docs) < n_dev_docs:
            print(f"[traces] the dev split holds {len(dev_docs)} documents: {len(dev_docs)} dev traces (asked for {n_dev_docs})", file=sys.stderr)
    record["dev_split"] = dev_split or None
    rank, world = rank_and_world()

    def generate(frame: pd.DataFrame, name: str) -> pd.DataFrame:
        """Every document's trace; under torchrun each rank writes its share and rank 0 joins them."""
        if world == 1:
            return generate_traces(model_dir, frame, dataset.labels, template_name=template_name, config=config, progress=progress)
        part = run_dir / f"{name}.rank-{rank}-of-{world}.parquet"
        if not part.exists():  # a rerun after a rank died regenerates only the missing shares
            write_parquet(generate_traces(model_dir, shard_for_rank(frame), dataset.labels, template_name=template_name, config=config, progress=progress and rank == 0), part)
        barrier()
        if rank != 0:
            return frame.head(0)
        parts = pd.concat([pd.read_parquet(run_dir / f"{name}.rank-{r}-of-{world}.parquet") for r in range(world)], ignore_index=True)
        return parts.set_index("doc_id").loc[list(frame["doc_id"])].reset_index()

    traces = generate(docs, "traces")
    dev = generate(dev_docs, "dev_traces") if len(dev_docs) else None
    if rank != 0:
        barrier()
        return traces
    write_parquet(traces, run_dir / "traces.parquet")
    if dev is not None:
        write_parquet(dev, run_dir / "dev_traces.parquet")
    if world > 1:
        for leftover in run_dir.glob("*.rank-*-of-*.parquet"):
            leftover.unlink()
        barrier()
    bad = traces[~traces["well_formed"]]
    record["counts"] = {"traces": int(len(traces)), "malformed": int(len(bad)), "dev_traces": int(len(dev_docs))}
    record["processes"] = world
    reasons = pd.Series([p for ps in bad["problems"] for p in ps]).str.replace(r" \[.*", "", regex=True).value_counts()
    detail = ", ".join(f"{k}: {v}" for k, v in reasons.items())
    print(f"[traces] {len(traces)} traces, {len(bad)} malformed (kept and flagged{': ' + detail if detail else ''})", file=sys.stderr)
    return traces
