"""The ``distill`` stage (``ctd distill --run DIR``): does a student trained with phase-aware losses
beat standard CoT distillation on the same traces and budget? (DESIGN §1, question 3)

Every student starts from the student base and sees the teacher's traces of training notes chosen
to cover the evaluation notes' gold codes; the teacher's attention rows for the mapped heads are
read from a capture store (no teacher forward per step). Conditions: ``standard``,
``mechanistic``, ``standard_equal_compute`` (standard given the mechanistic student's wall time)
and ablations. Each student records a learning curve; the headline (mechanistic - standard) is
paired by seed with a bootstrap CI over seeds and notes; ablations carry Holm-adjusted p-values.
Whatever the sign, it is reported. What the study is made of (losses, head map, data, training,
evaluation) is :mod:`analyses.methods.distillation`; ``ctd distill --pilot`` is the same stage
on the pilot's settings (``distill_pilot``, a stage of its own command only).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.methods.distillation.data import build_examples, capture_teacher_rows, choose_training_notes, load_teacher_rows
from analyses.methods.distillation.evaluation import answer_metrics, leakage_adjusted_simulability, mechanism_transfer, paired_trajectory_distance, teacher_forced_metrics
from analyses.methods.distillation.head_map import choose_teacher_heads, map_heads, similarity_map
from analyses.results.distill import DistillResult
from analyses.methods.distillation.training import CONDITIONS, train_student
from analyses.machinery.io import read_json, write_json, write_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.machinery.settings import DistillConfig
from analyses.methods.prompts import run_template
from probes.errors import input_error

__all__ = ["DistillConfig", "compute", "holm"]

HEADLINE = ("standard", "mechanistic")
ABLATIONS = ("no_phase1", "no_phase2", "no_attn", "no_loop", "no_write", "no_int")


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


# Which students the study trains and how it summarises them; none of these changes a student, so a
# study that adds an arm, a seed or bootstrap draws reuses the students it already has.
_STUDY_ONLY_FIELDS = ("conditions", "seeds", "ablation_seeds", "n_boot")


def _student_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _STUDY_ONLY_FIELDS}


def _finished(folder: Path, cfg: DistillConfig) -> dict | None:
    marker = folder / "student.json"
    if not marker.is_file():
        return None
    record = read_json(marker)
    same = _student_settings(record.get("config") or {}) == _student_settings(json.loads(json.dumps(asdict(cfg))))
    return record if same else None


def _teacher_traces(path: Path, model_path: str, docs: pd.DataFrame, labels, template, tokenizer, hf, max_new_tokens: int, progress: bool) -> pd.DataFrame:
    from analyses.models.generation import GenerationConfig, generate_traces

    if path.exists():
        cached = pd.read_parquet(path)
        if list(cached["doc_id"]) == list(docs["doc_id"]):
            return cached
    traces = generate_traces(model_path, docs, labels, template_name=template.name, config=GenerationConfig(max_new_tokens=max_new_tokens, batch_size=32), progress=progress, tokenizer=tokenizer, hf_model=hf)
    write_parquet(traces, path)  # atomic: a kill never leaves a half-written cache
    return traces


def _per_doc_diff_ci(a: dict[int, np.ndarray], b: dict[int, np.ndarray], seeds: list[int], n_boot: int, rng, statistic=np.mean) -> tuple[float, float, float, float]:
    """Paired by seed and note: mean over seeds of statistic(a) - statistic(b); bootstrap over
    seeds and notes; two-sided bootstrap p-value of no difference."""
    n = len(next(iter(a.values())))

    def diff(seed_sample, idx):
        return float(np.mean([statistic(a[s][idx]) - statistic(b[s][idx]) for s in seed_sample]))

    point = diff(seeds, np.arange(n))
    draws = np.array([diff([seeds[j] for j in rng.integers(0, len(seeds), len(seeds))], rng.integers(0, n, n)) for _ in range(n_boot)])
    draws = draws[np.isfinite(draws)]
    p = float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))) if len(draws) else float("nan")
    return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), p


def compute(ctx: StageContext) -> DistillResult:
    """The distillation study of a run: a run with traces (its teacher is the run's model and prompt
    template), and head scores or patching. ``ctx.settings``:
    :class:`~analyses.machinery.settings.DistillConfig` (default study: 5 conditions x 5 seeds).
    """
    from analyses.methods.dynamics import compute_dynamics
    from analyses.methods.readouts import answer_readouts
    from analyses.models.student import default_student_base_path
    from analyses.tasks.sources import Dataset
    from analyses.models.generation import GenerationConfig, generate_traces
    from probes.models import load_hf_model, load_model, load_tokenizer

    run_dir, progress = Path(ctx.run_dir), ctx.progress
    model_path, template = ctx.model_path, run_template(ctx.manifest)
    cfg = ctx.settings or DistillConfig()
    unknown = [c for c in cfg.conditions if c not in CONDITIONS]
    if unknown:
        raise input_error(None, f"unknown distillation condition(s) {unknown}", f"use some of {list(CONDITIONS)}")
    base = Path(cfg.student) if cfg.student else default_student_base_path()
    if not (base / "config.json").exists():
        raise input_error(base, "no student base here", "pass --student the folder of a small pretrained causal LM with the teacher's tokenizer, or restore analyses/assets/student_base")
    if load_tokenizer(base).get_vocab() != load_tokenizer(model_path).get_vocab():
        raise input_error(base, f"the student base's tokenizer is not the teacher's ({model_path}): distillation reads the teacher's token ids", "pass --student a student base trained with this teacher's tokenizer (ctd student train --teacher TEACHER)")
    dataset = Dataset.load(run_dir)
    labels = dataset.labels
    tokenizer = load_tokenizer(model_path)
    pad = tokenizer.pad_token_id
    think_close = template.think_close
    started = time.perf_counter()

    eval_docs = dataset.split(cfg.eval_split).head(cfg.n_eval_docs).reset_index(drop=True)
    if len(eval_docs) < cfg.n_eval_docs:
        raise input_error(run_dir / "docs.parquet", f"the {cfg.eval_split} split holds {len(eval_docs)} notes; the study asks for {cfg.n_eval_docs}", "generate more notes (ctd run --opt n_docs=N) or lower n_eval_docs")
    train_pool = dataset.split("train")
    if train_pool.empty:
        raise input_error(run_dir / "docs.parquet", "no training-split documents to distill on", "generate a dataset with a train split")
    dev_docs = dataset.split("dev") if cfg.eval_split != "dev" else None
    train_docs, coverage = choose_training_notes(train_pool, dev_docs, cfg.n_train_docs, eval_docs=eval_docs)

    hf_teacher = load_hf_model(model_path, attn_implementation="sdpa")
    train_traces = _teacher_traces(run_dir / "distill_teacher_traces.parquet", model_path, train_docs, labels, template, tokenizer, hf_teacher, cfg.max_new_tokens, progress)
    eval_traces = _teacher_traces(run_dir / f"distill_{cfg.eval_split}_teacher_traces.parquet", model_path, eval_docs, labels, template, tokenizer, hf_teacher, cfg.max_new_tokens, progress)
    train_traces = train_traces[train_traces["well_formed"]].reset_index(drop=True)
    held = eval_traces[eval_traces["well_formed"]].reset_index(drop=True)
    if train_traces.empty:
        raise input_error(run_dir / "distill_teacher_traces.parquet", "the teacher wrote no well-formed trace on the training notes", "check the model and template (a think close and an answer are needed), then delete this file and rerun")
    seen = {int(g) for gs in train_docs.set_index("doc_id").loc[train_traces["doc_id"], "gold"] for g in gs}
    wanted = {int(g) for gs in eval_docs["gold"] for g in gs}
    coverage["share_seen_as_gold_in_well_formed_teacher_traces"] = round(len(wanted & seen) / max(len(wanted), 1), 4)

    def tau_of(traces):
        return {str(t.doc_id): int(t.true_boundary) if not pd.isna(t.true_boundary) else (int(t.cot_start) + int(t.cot_end)) // 2 for t in traces.itertuples()}

    train_examples = build_examples(train_traces, dataset.docs, labels, tokenizer, tau_of(train_traces))
    held_examples = build_examples(held, dataset.docs, labels, tokenizer, tau_of(held))
    held_items = []
    for e in held_examples:
        answered = set(int(a) for a in held.set_index("doc_id").loc[e.doc_id, "answer"])
        held_items.append(answer_readouts(tokenizer, labels, list(e.ids), e.regions, [g for g in e.gold if g in answered] or e.gold, e.near)["answer_logprob"])

    # Teacher heads, their rows (captured once), and the map onto the student base.
    phase1, phase2, chosen_by = choose_teacher_heads(run_dir, cfg.heads_per_phase)
    heads = list(dict.fromkeys(phase1 + phase2))
    bridge = load_model(model_path)
    t_layers = bridge.cfg.n_layers
    capture_teacher_rows(run_dir, bridge, pd.concat([train_traces, held], ignore_index=True).drop_duplicates("doc_id"), heads, progress=progress)
    del bridge
    rows_train = load_teacher_rows(run_dir, train_examples, heads)
    rows_held = load_teacher_rows(run_dir, held_examples, heads)
    from analyses.methods.distillation.training import load_student_base

    base_model = load_student_base(base)
    warm = train_examples[: min(16, len(train_examples))]
    map1 = map_heads(phase1, t_layers, base_model.config.num_hidden_layers, base_model.config.num_attention_heads, similarity_map(base_model, warm, rows_train, phase1, t_layers, pad) if phase1 else None)
    map2 = map_heads(phase2, t_layers, base_model.config.num_hidden_layers, base_model.config.num_attention_heads, similarity_map(base_model, warm, rows_train, phase2, t_layers, pad) if phase2 else None)
    head_map = {
        "chosen_by": chosen_by,
        "mapped_on": f"the student base ({base}), by relative depth then minimal attention KL on {len(warm)} training traces",
        "phase1": {f"L{a}H{b}": f"L{c}H{d}" for (a, b), (c, d) in map1.items()},
        "phase2": {f"L{a}H{b}": f"L{c}H{d}" for (a, b), (c, d) in map2.items()},
    }
    write_json(head_map, run_dir / "head_map.json")

    gold_eval = [set(int(g) for g in d) for d in eval_docs["gold"]]
    curve_docs = eval_docs.head(cfg.n_curve_docs)
    traj_docs = eval_docs.head(cfg.n_trajectory_docs)
    teacher_traj = compute_dynamics(eval_traces[eval_traces["doc_id"].isin(traj_docs["doc_id"])], dataset.docs, labels, tokenizer, n_boot=50, progress=False)
    teacher_tf = teacher_forced_metrics(load_hf_model(model_path, attn_implementation="sdpa"), held_examples, held_items, pad)
    gen_config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=50)

    def generate(model, docs):
        return generate_traces(model_path, docs, labels, template_name=template.name, config=gen_config, progress=False, hf_model=model, tokenizer=tokenizer)

    def checkpoint(step, model):
        tf = teacher_forced_metrics(model, held_examples, held_items, pad)
        f1 = answer_metrics(generate(model, curve_docs), [set(int(g) for g in d) for d in curve_docs["gold"]])["micro_f1"]
        return {"micro_f1": f1, "gold_logprob": float(tf["gold_logprob"].mean())}

    students_dir = run_dir / "students"
    rows: list[dict] = []
    per_doc: dict[tuple[str, int, str], np.ndarray] = {}
    wall: dict[tuple[str, int], float] = {}
    curves_meta: dict[str, dict] = {}
    order = [c for c in ("standard", "mechanistic") if c in cfg.conditions] + [c for c in cfg.conditions if c not in ("standard", "mechanistic")]
    for seed in cfg.seeds:
        for condition in order:
            folder = students_dir / f"{condition}-seed{seed}"
            record = _finished(folder, cfg)
            if record is None:
                steps = cfg.steps
                if condition == "standard_equal_compute":
                    mech, std = wall.get(("mechanistic", seed)), wall.get(("standard", seed))
                    if mech is None or std is None:
                        raise input_error(None, "standard_equal_compute needs the standard and mechanistic conditions", "add both to the conditions")
                    steps = max(cfg.steps, int(round(cfg.steps * mech / std)))
                terms_on = any(CONDITIONS[condition].values())
                student, curve, records, seconds = train_student(
                    condition, seed, train_examples, rows_train, pad, base, steps, cfg.batch_size, cfg.lr,
                    map1 if terms_on else {}, map2 if terms_on else {}, cfg.lambda1, cfg.lambda2,
                    checkpoints=cfg.checkpoints(steps), on_checkpoint=checkpoint, progress=progress,
                )
                traces = generate(student, eval_docs)
                metrics = answer_metrics(traces, gold_eval)
                tf = teacher_forced_metrics(student, held_examples, held_items, pad)
                transfer = mechanism_transfer(student, held_examples, rows_held, map1, map2, pad)
                traj = compute_dynamics(traces[traces["doc_id"].isin(traj_docs["doc_id"])], dataset.docs, labels, tokenizer, n_boot=50, progress=False)
                traj_dist = paired_trajectory_distance(traj.frame, teacher_traj.frame)
                answers = [list(a) for a in traces["answer"]]
                first_gold = [int(list(d)[0]) for d in eval_docs["gold"]]
                las_output = np.array([fg in a for fg, a in zip(first_gold, answers)])
                las_rule = "the answer contains the note's first gold code"
                if len(np.unique(las_output)) < 2:
                    sizes = np.array([len(a) for a in answers])
                    las_output, las_rule = sizes > np.median(sizes), "the answer is longer than the median answer (the first rule did not vary)"
                las = leakage_adjusted_simulability(list(eval_docs["text"]), [t.split(think_close)[0] for t in traces["text"]], las_output, seed=seed)
                per_note = {
                    "correct_codes": [len(set(a) & g) for a, g in zip(answers, gold_eval)],
                    "predicted_codes": [len(set(a)) for a in answers],
                    "gold_codes": [len(g) for g in gold_eval],
                }
                final = {
                    **metrics,
                    "gold_logprob": float(tf["gold_logprob"].mean()),
                    "ce_phase1": float(tf["ce_phase1"].mean()),
                    "ce_phase2": float(tf["ce_phase2"].mean()),
                    "ce_answer": float(tf["ce_answer"].mean()),
                    "transfer_kl_phase1": float(transfer[transfer["phase"] == "phase1"]["kl"].mean()) if len(transfer) else float("nan"),
                    "transfer_kl_phase2": float(transfer[transfer["phase"] == "phase2"]["kl"].mean()) if len(transfer) else float("nan"),
                    "focus_curve_l1": float(traj_dist[traj_dist["metric"] == "focus_curve_l1"]["value"].mean()) if len(traj_dist) else float("nan"),
                    "confusion_curve_l1": float(traj_dist[traj_dist["metric"] == "confusion_curve_l1"]["value"].mean()) if len(traj_dist) else float("nan"),
                    "las": las,
                    "final_loss": float(curve["loss"].tail(10).mean()),
                    "train_seconds": seconds,
                    "seconds_per_step": seconds / max(steps, 1),
                    "steps": steps,
                }
                folder.mkdir(parents=True, exist_ok=True)
                student.to(torch.bfloat16).save_pretrained(folder)
                curve.to_parquet(folder / "loss_curve.parquet", index=False)
                tf.to_parquet(folder / "teacher_forced.parquet", index=False)
                transfer.to_parquet(folder / "transfer.parquet", index=False)
                traj_dist.to_parquet(folder / "trajectory.parquet", index=False)
                mean = traj.frame[traj.frame["doc_id"].isna()]
                record = {
                    "config": json.loads(json.dumps(asdict(cfg))),
                    "metrics": final,
                    "checkpoints": records,
                    "per_note": per_note,
                    "las_output": las_rule,
                    "answers": answers,
                    "curve": {"t": sorted(mean["t"].unique().tolist()), **{k: mean[mean["metric"] == k].sort_values("t")["value"].tolist() for k in ("focus", "confusion")}},
                }
                write_json(record, folder / "student.json")  # written last: marks the student finished
            wall[(condition, seed)] = record["metrics"]["train_seconds"]
            if seed == cfg.seeds[0]:
                curves_meta[condition] = record["curve"]
            steps = record["metrics"]["steps"]
            rows += [{"condition": condition, "seed": seed, "metric": k, "value": float(v), "step": steps} for k, v in record["metrics"].items()]
            rows += [{"condition": condition, "seed": seed, "metric": f"curve:{k}", "value": float(r[k]), "step": r["step"]} for r in record["checkpoints"] for k in ("micro_f1", "gold_logprob")]
            for k, v in record["per_note"].items():
                per_doc[(condition, seed, k)] = np.asarray(v, dtype=float)
            tf = pd.read_parquet(folder / "teacher_forced.parquet")
            for k in ("gold_logprob", "ce_phase1", "ce_phase2"):
                per_doc[(condition, seed, k)] = tf[k].to_numpy(float)
            traj_dist = pd.read_parquet(folder / "trajectory.parquet")
            for k in ("focus_curve_l1", "confusion_curve_l1"):
                per_doc[(condition, seed, k)] = traj_dist[traj_dist["metric"] == k].set_index("doc_id")["value"].reindex(traj_docs["doc_id"]).to_numpy(float) if len(traj_dist) else np.full(len(traj_docs), np.nan)
            tr = pd.read_parquet(folder / "transfer.parquet")
            for phase in ("phase1", "phase2"):
                g = tr[tr["phase"] == phase].groupby("doc_id")["kl"].mean() if len(tr) else pd.Series(dtype=float)
                per_doc[(condition, seed, f"transfer_kl_{phase}")] = g.reindex([e.doc_id for e in held_examples]).to_numpy(float)

    # Paired differences (seed x note), with bootstrap CIs and p-values.
    rng = np.random.default_rng(0)
    seeds = list(cfg.seeds)

    def f1_of(condition, seed, idx):
        c = per_doc[(condition, seed, "correct_codes")][idx].sum()
        p = per_doc[(condition, seed, "predicted_codes")][idx].sum()
        g = per_doc[(condition, seed, "gold_codes")][idx].sum()
        return float(2 * c / (p + g)) if p + g else 0.0

    def f1_diff(a, b):
        n = len(per_doc[(a, seeds[0], "gold_codes")])

        def diff(seed_sample, idx):
            return float(np.mean([f1_of(a, s, idx) - f1_of(b, s, idx) for s in seed_sample]))

        point = diff(seeds, np.arange(n))
        draws = np.array([diff([seeds[j] for j in rng.integers(0, len(seeds), len(seeds))], rng.integers(0, n, n)) for _ in range(cfg.n_boot)])
        p = float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))
        return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), p

    def mean_diff(a, b, metric):
        arrays_a = {s: per_doc[(a, s, metric)] for s in seeds}
        arrays_b = {s: per_doc[(b, s, metric)] for s in seeds}
        ok = np.all([np.isfinite(arrays_a[s]) & np.isfinite(arrays_b[s]) for s in seeds], axis=0)
        if not ok.any():
            return (float("nan"),) * 4
        return _per_doc_diff_ci({s: v[ok] for s, v in arrays_a.items()}, {s: v[ok] for s, v in arrays_b.items()}, seeds, cfg.n_boot, rng)

    comparisons = []
    if "standard" in cfg.conditions:
        for condition in cfg.conditions:
            if condition != "standard":
                comparisons.append((condition, "standard"))
    if "mechanistic" in cfg.conditions:
        if "standard_equal_compute" in cfg.conditions:
            comparisons.append(("mechanistic", "standard_equal_compute"))
        comparisons += [(a, "mechanistic") for a in cfg.conditions if a in ABLATIONS]
    continuous = ("gold_logprob", "ce_phase1", "ce_phase2", "transfer_kl_phase1", "transfer_kl_phase2", "focus_curve_l1", "confusion_curve_l1")
    summary = []
    for a, b in comparisons:
        point, lo, hi, p = f1_diff(a, b)
        summary.append({"condition": a, "seed": -1, "metric": f"micro_f1_minus_{b}", "value": point, "ci_low": lo, "ci_high": hi, "p_value": p, "reference": b})
        for metric in continuous:
            point, lo, hi, p = mean_diff(a, b, metric)
            summary.append({"condition": a, "seed": -1, "metric": f"{metric}_minus_{b}", "value": point, "ci_low": lo, "ci_high": hi, "p_value": p, "reference": b})
    frame = pd.DataFrame(rows)
    if summary:
        summary = pd.DataFrame(summary)
        family = summary["condition"].isin(ABLATIONS) & (summary["reference"] == "mechanistic") & summary["metric"].isin(["micro_f1_minus_mechanistic", "gold_logprob_minus_mechanistic"])
        summary["p_holm"] = np.nan
        if family.any():
            summary.loc[family, "p_holm"] = holm(summary.loc[family, "p_value"].tolist())
        frame = pd.concat([frame, summary], ignore_index=True)
    for column in ("ci_low", "ci_high", "p_value", "p_holm"):
        if column not in frame:
            frame[column] = np.nan
    per_step = frame[(frame["seed"] >= 0) & (frame["metric"] == "seconds_per_step")].groupby("condition")["value"].mean().round(4).to_dict()
    curves_meta["teacher"] = {"t": sorted(teacher_traj.summary["t"].unique().tolist()), **{m: teacher_traj.summary[teacher_traj.summary["metric"] == m].sort_values("t")["value"].tolist() for m in ("focus", "confusion")}}
    meta = {
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - started, 1),
        "student_base": str(base),
        "coverage": coverage,
        "teacher_on_held_out": {"gold_logprob": float(teacher_tf["gold_logprob"].mean()), "ce_phase1": float(teacher_tf["ce_phase1"].mean()), "ce_phase2": float(teacher_tf["ce_phase2"].mean()), "held_out_traces": len(held_examples)},
        "head_map": head_map,
        "teacher_signals": "attention rows of the mapped teacher heads at CoT queries, captured once into distill_teacher/ (checksummed shards) and read at every step; anchor directions and margin gradients are the student's own (DESIGN §2), detached",
        "seconds_per_step": per_step,
        "equal_compute": "standard_equal_compute trains for steps x (mechanistic wall time / standard wall time) of its seed",
        "paired": "differences paired by seed and note; bootstrap over seeds and notes; two-sided bootstrap p-values; ablations (vs mechanistic, micro-F1 and gold log-prob) Holm-adjusted as one family",
        "phase_split": "the organism's known boundary on teacher traces (midpoint when unknown)",
        "learning_curve": f"micro-F1 on the first {cfg.n_curve_docs} evaluation notes and teacher-forced gold-code log-prob on every held-out teacher trace, at steps {cfg.checkpoints()} (and step 0)",
        "trajectory": f"Focus/Confusion of student and teacher traces on the same {cfg.n_trajectory_docs} notes, mean |difference| per note",
        "curves": curves_meta,
    }
    return DistillResult(frame, meta)


register_stage(Stage("distill", "distill", ("traces.parquet",), ("distill.parquet", "head_map.json", "students/"), compute, "standard vs mechanistic students from the student base"))
register_stage(Stage("distill_pilot", "distill", ("traces.parquet",), ("distill_pilot.parquet", "head_map.json"), compute, "the learning-curve pilot that chooses the distillation budget"), in_run=False)
