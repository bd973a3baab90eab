import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from analyses.methods.replay import capture_requests
from analyses.stages import run as run_stage
from analyses.machinery.io import write_json
from analyses.methods.parsing import Region
from analyses.models.generation import GenerationConfig, generate_traces
from probes.capture import CaptureConfig, capture
from probes.errors import CtdInputError
from probes.models import load_hf_model, load_model
from probes.store import open_store


def capture_run(run_dir, model=None, progress=False, **settings):
    """`ctd capture` on a run directory, with a loaded bridge."""
    return run_stage("capture", run_dir, model=model, progress=progress, **settings)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models, heart_notes, heart_labels):
    """A run directory with 7 traces of the tiny Qwen3 (different lengths)."""
    run = tmp_path_factory.mktemp("run")
    traces = generate_traces(tiny_models["qwen3"], heart_notes.head(7), heart_labels, template_name="organism", config=GenerationConfig(max_new_tokens=16, batch_size=7, attn_implementation="eager"), progress=False)
    traces.to_parquet(run / "traces.parquet")
    write_json({"stages": {}, "model": {"path": str(tiny_models["qwen3"])}}, run / "manifest.json")
    return run, traces


@pytest.fixture(scope="module")
def bridge(tiny_models):
    return load_model(tiny_models["qwen3"])


def _copy_run(src, dst):
    dst.mkdir()
    for name in ("traces.parquet", "manifest.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _store_tensors(run):
    store = open_store(run)
    out = {}
    for doc in store.doc_ids:
        for name in store.points + store.reductions:
            out[(doc, name)] = store.read(doc, name)
    return out


def test_stored_activations_equal_run_with_cache_and_hf(tiny_run, bridge, tiny_models, tmp_path):
    src, traces = tiny_run
    run = _copy_run(src, tmp_path / "r")
    capture_run(run, points=["resid_post", "head_out@1", "z@0", "attn_out@1"], batch_size=3, dtype="float32", model=bridge, progress=False)
    store = open_store(run)
    hf = load_hf_model(tiny_models["qwen3"], attn_implementation="eager")
    assert set(store.doc_ids) == set(traces["doc_id"])
    assert "blocks.0.hook_resid_post" in store.points and "blocks.1.attn.hook_result" in store.points
    for row in traces.itertuples():
        ids = torch.tensor([list(row.prompt_ids) + list(row.output_ids)])
        _, cache = bridge.run_with_cache(ids)
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states
        positions, resid0 = store.read(row.doc_id, "blocks.0.hook_resid_post")
        assert positions.tolist() == list(range(len(row.prompt_ids), ids.shape[1]))
        # float32 store: equal to TransformerLens and HF up to float32 matmul reordering (1e-4).
        torch.testing.assert_close(resid0, cache["blocks.0.hook_resid_post"][0, positions], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(resid0, hidden[1][0, positions], atol=1e-4, rtol=1e-4)
        _, z0 = store.read(row.doc_id, "blocks.0.attn.hook_z")
        torch.testing.assert_close(z0, cache["blocks.0.attn.hook_z"][0, positions], atol=1e-4, rtol=1e-4)
        # Per-head writes add up to the attention output (plus the output bias, zero for Qwen3).
        _, head_out = store.read(row.doc_id, "blocks.1.attn.hook_result")
        _, attn_out = store.read(row.doc_id, "blocks.1.hook_attn_out")
        torch.testing.assert_close(head_out.sum(1), attn_out, atol=1e-4, rtol=1e-4)
    index = store.index
    assert set(index.columns) >= {"doc_id", "position", "norm_position", "region", "shard"}
    assert len(index) == sum(len(r.output_ids) for r in traces.itertuples())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_store_tolerance(tiny_run, bridge, tmp_path, dtype):
    src, traces = tiny_run
    run = _copy_run(src, tmp_path / "r")
    capture_run(run, points=["resid_post@1"], dtype=dtype, model=bridge, progress=False)
    store = open_store(run)
    row = next(traces.itertuples())
    ids = torch.tensor([list(row.prompt_ids) + list(row.output_ids)])
    _, cache = bridge.run_with_cache(ids)
    positions, values = store.read(row.doc_id, "blocks.1.hook_resid_post")
    assert values.dtype == getattr(torch, dtype)
    # float16 keeps ~3 significant digits (relative 1e-3), bfloat16 ~2 (relative 8e-3).
    tolerance = 1e-3 if dtype == "float16" else 8e-3
    torch.testing.assert_close(values.float(), cache["blocks.1.hook_resid_post"][0, positions], atol=tolerance, rtol=tolerance)


def test_batched_left_and_right_padding_equal_one_by_one(tiny_run, bridge, tmp_path):
    src, _ = tiny_run
    results = {}
    for name, kwargs in {"single": dict(batch_size=1), "left": dict(batch_size=4, padding="left"), "right": dict(batch_size=4, padding="right")}.items():
        run = _copy_run(src, tmp_path / name)
        capture_run(run, points=["resid_post", "head_out@0"], dtype="float32", model=bridge, progress=False, **kwargs)
        results[name] = _store_tensors(run)
    for key, (pos, value) in results["single"].items():
        for other in ("left", "right"):
            opos, ovalue = results[other][key]
            assert pos.tolist() == opos.tolist()
            torch.testing.assert_close(ovalue, value, atol=1e-4, rtol=1e-4, msg=f"{other} {key}")


def test_reductions_equal_statistics_of_the_full_pattern(tiny_run, bridge, tmp_path):
    src, traces = tiny_run
    run = _copy_run(src, tmp_path / "r")
    capture_run(run, points=["resid_post@0"], batch_size=4, dtype="float32", model=bridge, progress=False)
    store = open_store(run)
    w_o = bridge.blocks[1].attn.W_O.detach()
    for row in list(traces.itertuples())[:3]:
        ids = torch.tensor([list(row.prompt_ids) + list(row.output_ids)])
        _, cache = bridge.run_with_cache(ids)
        pattern = cache["blocks.1.attn.hook_pattern"][0]  # [head, q, k]
        v = cache["blocks.1.attn.hook_v"][0]  # [pos, kv_head, d_head]
        regions = np.asarray(row.regions)
        doc = np.isin(regions, [int(Region.DOCUMENT), int(Region.ANCHOR)])
        positions, mass = store.read(row.doc_id, "blocks.1.attn.hook_pattern:region_mass")
        _, kurt = store.read(row.doc_id, "blocks.1.attn.hook_pattern:doc_kurtosis")
        _, vmass = store.read(row.doc_id, "blocks.1.attn.hook_pattern:value_mass")
        n_heads = pattern.shape[0]
        group = n_heads // v.shape[1]
        for qi, q in enumerate(positions.tolist()[:6]):
            for h in range(n_heads):
                weights = pattern[h, q].numpy()
                for r in range(len(Region)):
                    assert mass[qi, h, r].item() == pytest.approx(weights[regions == r].sum(), abs=1e-5)
                ref = scipy.stats.kurtosis(weights[doc], fisher=False)
                assert kurt[qi, h].item() == pytest.approx(ref, rel=1e-3, abs=1e-4)
                norms = (v[:, h // group] @ w_o[h]).norm(dim=-1).numpy()
                for r in range(len(Region)):
                    assert vmass[qi, h, r].item() == pytest.approx((weights * norms)[regions == r].sum(), rel=1e-4, abs=1e-6)
        assert torch.allclose(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5)  # rows sum to 1


class Interrupt(Exception):
    pass


def test_interrupted_capture_resumes_to_an_identical_store(tiny_run, bridge, tmp_path):
    src, _ = tiny_run
    clean = _copy_run(src, tmp_path / "clean")
    capture_run(clean, points=["resid_post", "head_out@1"], batch_size=2, model=bridge, progress=False)

    broken = _copy_run(src, tmp_path / "broken")
    traces = pd.read_parquet(broken / "traces.parquet")
    from probes.points import resolve_points

    config = CaptureConfig(points=resolve_points(["resid_post", "head_out@1"], 2), attention_layers=[0, 1], batch_size=2, dtype="float16")

    def stop_at_two(i):
        if i == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        capture(bridge, capture_requests(traces), broken, config, settings={"model": json.loads((broken / "manifest.json").read_text())["model"]["path"], "positions": "output"}, progress=False, on_batch=stop_at_two)
    state = json.loads((broken / "activations" / "shards.json").read_text())
    assert sorted(state["shards"]) == ["0", "1"] and not state["complete"]
    with pytest.raises(CtdInputError, match="did not finish"):
        open_store(broken)
    # A leftover temporary file from the kill must not matter.
    (broken / "activations" / ".shard-00002.safetensors.junk.tmp").write_bytes(b"partial")
    written_before = (broken / "activations" / "shard-00000.safetensors").stat().st_mtime_ns
    capture_run(broken, points=["resid_post", "head_out@1"], batch_size=2, model=bridge, progress=False)
    assert (broken / "activations" / "shard-00000.safetensors").stat().st_mtime_ns == written_before  # not recomputed
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    clean_files = sorted(p.name for p in (clean / "activations").glob("shard-*.safetensors"))
    assert clean_files == sorted(p.name for p in (broken / "activations").glob("shard-*.safetensors"))
    for name in clean_files:
        assert digest(clean / "activations" / name) == digest(broken / "activations" / name)
    pd.testing.assert_frame_equal(pd.read_parquet(clean / "activations" / "index.parquet"), pd.read_parquet(broken / "activations" / "index.parquet"))


def test_other_settings_are_refused_and_corruption_detected(tiny_run, bridge, tmp_path):
    src, _ = tiny_run
    run = _copy_run(src, tmp_path / "r")
    capture_run(run, points=["resid_post@0"], model=bridge, progress=False)
    with pytest.raises(CtdInputError, match="other settings"):
        capture_run(run, points=["resid_post@1"], model=bridge, progress=False)
    _assert_damaged_shard_is_refused(run, _flip_a_byte)


def _flip_a_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    return bytes(flipped)


def _assert_damaged_shard_is_refused(run, damage):
    shard = run / "activations" / "shard-00000.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    store = open_store(run)
    with pytest.raises(Exception, match="shard-00000.safetensors: checksum mismatch"):
        store.read(store.doc_ids[0], "blocks.0.hook_resid_post")


def test_truncated_shard_is_named_and_never_read(tiny_run, bridge, tmp_path):
    src, _ = tiny_run
    run = _copy_run(src, tmp_path / "t")
    capture_run(run, points=["resid_post@0"], model=bridge, progress=False)
    _assert_damaged_shard_is_refused(run, lambda data: data[: len(data) // 2])


def test_non_finite_activations_stop_the_capture_with_their_location(tiny_run, bridge, tmp_path):
    from probes.errors import CtdNumericalError

    src, traces = tiny_run
    run = _copy_run(src, tmp_path / "nan")

    def poison(resid, hook):
        resid[:, -1, 0] = float("nan")
        return resid

    bridge.add_hook("blocks.1.hook_resid_post", poison)
    try:
        with pytest.raises(CtdNumericalError, match=r"non-finite values in blocks\.1\.hook_resid_post for '.+' at position \d+"):
            capture_run(run, points=["resid_post"], model=bridge, progress=False)
    finally:
        bridge.reset_hooks()
    assert not json.loads((run / "manifest.json").read_text())["stages"]["capture"]["status"] == "complete"


def test_capture_stops_after_the_last_block_it_reads(tiny_run, bridge, tmp_path):
    """Nothing after the last block read is computed (no unembedding), and the bridge is left
    usable: the next ordinary forward returns logits equal to a fresh run."""
    src, _ = tiny_run
    calls = []
    handle = bridge.unembed.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        run = _copy_run(src, tmp_path / "early")
        capture_run(run, points=["resid_post"], dtype="float32", model=bridge, progress=False, batch_size=4)
        assert calls == []
        run = _copy_run(src, tmp_path / "middle")
        capture_run(run, points=["blocks.0.hook_resid_post"], attention_layers=[0], dtype="float32", model=bridge, progress=False, batch_size=4)
        assert calls == []
        ids = torch.tensor([list(range(5, 25))])
        logits = bridge(ids)
        assert calls == [1]
    finally:
        handle.remove()
    torch.testing.assert_close(logits, bridge(ids))
    stored = open_store(tmp_path / "middle")
    assert stored.points == ["blocks.0.hook_resid_post"]
