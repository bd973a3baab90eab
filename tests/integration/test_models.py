import json

import pytest
import torch

from analyses.models.generation import GenerationConfig, generate_traces
from probes.errors import CtdInputError
from probes.models import SUPPORTED_ARCHITECTURES, build_tiny_model, load_hf_model, load_model, load_tokenizer

FAMILIES = tuple(dict.fromkeys(SUPPORTED_ARCHITECTURES.values()))


def test_every_supported_architecture_has_a_tiny_builder():
    from probes.models import _TINY

    assert set(FAMILIES) == set(_TINY)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_load_offline_through_load_model(family_models, family):
    bridge = load_model(family_models(family))
    info = bridge.ctd_info
    assert info.family == family and info.n_layers == 2 and info.n_heads == 4
    ids = torch.tensor([bridge.tokenizer.encode("Chronic systolic heart failure", add_special_tokens=False)])
    logits, cache = bridge.run_with_cache(ids)
    hf = load_hf_model(family_models(family))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
    # Parity with HF: logits and every layer's residual stream (float32, same weights).
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    # HF hidden_states[l + 1] is block l's output, except the last, which is after the final norm.
    for layer in range(info.n_layers - 1):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], ref.hidden_states[layer + 1], atol=1e-4, rtol=1e-4)
    last = cache[f"blocks.{info.n_layers - 1}.hook_resid_post"]
    with torch.no_grad():
        torch.testing.assert_close(hf.model.norm(last), ref.hidden_states[-1], atol=1e-4, rtol=1e-4)
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (1, 4, ids.shape[1], ids.shape[1])
    # Per-head writes z_h W_O^h (z viewed per head as the suite reads it) add up to the attention
    # output: the head split is the one W_O uses, for every family (latent attention included).
    from probes.attention import heads_view

    for layer in range(info.n_layers):
        attn = bridge.blocks[layer].attn
        z = heads_view(cache[f"blocks.{layer}.attn.hook_z"], attn.W_O.shape[0])
        writes = torch.einsum("bqhd,hdm->bqm", z, attn.W_O)
        bias = attn.b_O if getattr(attn, "b_O", None) is not None else 0.0
        torch.testing.assert_close(writes + bias, cache[f"blocks.{layer}.attn.hook_out"], atol=1e-4, rtol=1e-4)


def _argmax_continuation(hf, ids, steps):
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            nxt = hf(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_bridge_generate_equals_hf_generate_equals_full_forward(family_models, family):
    # Locks the transformers pin: with a wrong pin, the bridge's KV-cached generate drifts.
    bridge = load_model(family_models(family))
    hf = load_hf_model(family_models(family))
    tok = bridge.tokenizer
    ids = torch.tensor([tok.encode("<note> Presents with chronic systolic heart failure. </note>\n<think>\n", add_special_tokens=False)])
    steps = 12
    reference = _argmax_continuation(hf, ids, steps)
    with torch.no_grad():
        hf_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
        bridge_out = bridge.generate(ids, max_new_tokens=steps, do_sample=False, stop_at_eos=False, use_past_kv_cache=True, verbose=False, return_type="tokens")[:, ids.shape[1]:]
    assert hf_out.tolist() == reference.tolist()
    assert bridge_out.tolist() == reference.tolist()


def test_batched_generation_equals_one_by_one(tiny_models, heart_notes, heart_labels):
    docs = heart_notes.head(5)  # notes of different lengths: the batch is left-padded
    cfg = dict(max_new_tokens=10)
    batched = generate_traces(tiny_models["qwen3"], docs, heart_labels, template_name="organism", config=GenerationConfig(batch_size=5, attn_implementation="eager", **cfg), progress=False)
    single = generate_traces(tiny_models["qwen3"], docs, heart_labels, template_name="organism", config=GenerationConfig(batch_size=1, attn_implementation="eager", **cfg), progress=False)
    assert len({len(p) for p in batched["prompt_ids"]}) > 1
    assert batched["output_ids"].tolist() == single["output_ids"].tolist()
    assert batched["prompt_ids"].tolist() == single["prompt_ids"].tolist()


def test_missing_folder_and_unsupported_architecture(tmp_path, tiny_models):
    with pytest.raises(CtdInputError, match="model folder not found"):
        load_model(tmp_path / "nope")
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CtdInputError, match=r"unsupported architecture 'GPT2LMHeadModel'.*Qwen3ForCausalLM"):
        load_model(folder)
    assert load_tokenizer(tiny_models["qwen3"]).padding_side == "left"


@pytest.mark.parametrize("damage", ["shape", "missing", "extra", "pickle"])
def test_damaged_checkpoints_are_named_and_never_loaded(tiny_models, tmp_path, damage):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / damage
    shutil.copytree(tiny_models["qwen3"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    if damage == "shape":
        weights[name] = weights[name][:, :-1].contiguous()
    elif damage == "missing":
        del weights[name]
    elif damage == "extra":
        weights["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if damage == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    expected = {"shape": r"q_proj\.weight' has shape \[64, 63\] but config\.json implies \[64, 64\]", "missing": "lacks tensor 'model.layers.1.self_attn.q_proj.weight'", "extra": "does not have, e.g. 'model.layers.9", "pickle": "pickle files are never loaded"}[damage]
    with pytest.raises(CtdInputError, match=expected):
        load_model(folder)
