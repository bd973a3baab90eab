"""Load any supported Hugging Face causal LM from a local folder into a TransformerBridge.

Everything is offline: the tokenizer is read from disk and passed in explicitly (a tokenizer saved in
its own ``tokenizer/`` sub-folder is preferred, since one saved next to a Qwen ``config.json`` can be
mangled on reload), attention is eager (attention weights are what the suite reads), and the loaded
model is checked loudly: attention rows sum to 1, the hooks the suite reads exist, the tokenizer
round-trips text.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from probes.errors import CtdError, CtdInputError, input_error

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "family_of",
    "load_tokenizer",
    "load_hf_model",
    "load_model",
    "build_tiny_model",
    "ModelInfo",
]

# Architecture name in config.json -> family key used by prompt templates. Every family here is
# one that transformers 5.23 and the TransformerLens 4.3 bridge both have, parity-tested on a tiny
# random folder (tests/integration/test_models.py; README table).
SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",  # DeepSeek-R1-Distill-Qwen, QwQ
    "Qwen3ForCausalLM": "qwen3",  # Qwen3 thinking models
    "LlamaForCausalLM": "llama",  # DeepSeek-R1-Distill-Llama
    "Qwen3MoeForCausalLM": "qwen3_moe",  # Qwen3-30B-A3B-Thinking
    "GptOssForCausalLM": "gpt_oss",  # gpt-oss-20b / 120b
    "Phi3ForCausalLM": "phi3",  # Phi-4-reasoning
    "MistralForCausalLM": "mistral",  # Magistral Small
    "Olmo3ForCausalLM": "olmo3",  # OLMo-3-Think
    "SmolLM3ForCausalLM": "smollm3",  # SmolLM3 (thinking mode)
    "Exaone4ForCausalLM": "exaone4",  # EXAONE 4.0
    "Glm4MoeForCausalLM": "glm4_moe",  # GLM-4.5
    "DeepseekV3ForCausalLM": "deepseek_v3",  # DeepSeek-V3 / R1
    "Gemma3ForCausalLM": "gemma3",  # Gemma 3 (text)
}
# Tiny random configs per family (tests): model_type and what it needs beyond the shared sizes.
_TINY = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": None}),
    "llama": ("llama", {}),
    "qwen3_moe": ("qwen3_moe", {"head_dim": None, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": None, "decoder_sparse_step": 1}),
    # a window wider than the test sequences: with 8, HF's own cached generate and full forward part ways
    "gpt_oss": ("gpt_oss", {"head_dim": None, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 128}),
    "phi3": ("phi3", {}),
    "mistral": ("mistral", {"head_dim": None, "sliding_window": None}),
    "olmo3": ("olmo3", {"sliding_window": 8}),
    "smollm3": ("smollm3", {}),
    "exaone4": ("exaone4", {"head_dim": None, "sliding_window": 8}),
    "glm4_moe": ("glm4_moe", {"head_dim": None, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": None, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "deepseek_v3": ("deepseek_v3", {"num_key_value_heads": None, "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": None, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "gemma3": ("gemma3_text", {"head_dim": None, "sliding_window": 8, "query_pre_attn_scalar": None}),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelInfo:
    """What the suite records about a loaded model (manifest ``model`` entry)."""

    path: str
    family: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int


def _offline() -> None:
    # No machine here reaches a hub: make any accidental download fail fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise input_error(path, "model folder not found", "pass the folder of a Hugging Face model (config.json + weights)")
    if not path.is_dir():
        raise input_error(path, "not a folder", "pass the folder of a Hugging Face model, not a file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise input_error(config_path, "file not found", "the model folder needs the config.json saved by save_pretrained")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise input_error(config_path, f"malformed JSON ({exc.msg})", "restore the model's config.json", exc.lineno) from None


def family_of(path: str | Path) -> tuple[str, str]:
    """``(family, architecture)`` of the model in ``path``; an unsupported architecture is an input error."""
    path = Path(path)
    config = _read_config(path)
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch], arch
    shown = architectures[0] if architectures else config.get("model_type", "unknown")
    raise input_error(
        path / "config.json",
        f"unsupported architecture {shown!r}",
        f"use a model of one of {sorted(SUPPORTED_ARCHITECTURES)}",
    )


def _tokenizer_dir(path: Path) -> Path:
    sub = path / "tokenizer"
    if sub.is_dir() and any((sub / f).exists() for f in _TOKENIZER_FILES):
        return sub
    if any((path / f).exists() for f in _TOKENIZER_FILES):
        return path
    raise input_error(path, "no tokenizer files", "save the tokenizer with save_pretrained into <model>/tokenizer/")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer from ``path/tokenizer/`` (preferred) or ``path``; left padding; round-trip checked."""
    from transformers import AutoTokenizer

    _offline()
    folder = _tokenizer_dir(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise input_error(folder, f"cannot load tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", "save it again with save_pretrained") from None
    tokenizer.padding_side = "left"  # batched generation and capture assume left padding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sample = "Chronic systolic heart failure, I50.22."
    decoded = tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False))
    if decoded.strip() != sample:
        raise CtdError(f"{folder}: tokenizer does not round-trip text ({sample!r} -> {decoded!r}); the saved tokenizer is damaged")
    return tokenizer


def _checkpoint_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (file, shape)}`` from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = f" (found {pickled[0]}: pickle files are never loaded; convert it to safetensors)" if pickled else ""
        raise input_error(path, f"no .safetensors weights{hint}", "save the model with save_pretrained(safe_serialization=True)")
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = (file.name, tuple(handle.get_slice(name).get_shape()))
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise input_error(file, f"damaged safetensors file ({type(exc).__name__})", "restore the weights from their source") from None
    return shapes


def _check_checkpoint(path: Path, trust_remote_code: bool) -> None:
    """Every tensor the architecture needs is in the checkpoint with the shape config.json implies."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = _checkpoint_shapes(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # MoE experts are stored one per expert and fused when loaded: transformers' own loading
    # report checks those (load_hf_model); every other tensor is checked here, before any load.
    fused = re.compile(r"\.experts\.")
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items() if not fused.search(name)}
    stored = {name: v for name, v in stored.items() if not fused.search(name)}
    tied = getattr(config, "tie_word_embeddings", False)
    for name, shape in expected.items():
        if name not in stored:
            if tied and name == "lm_head.weight":
                continue
            raise input_error(path, f"checkpoint lacks tensor {name!r} (shape {list(shape)})", "the weights do not belong to this config.json; restore them")
        file, got = stored[name]
        if got != shape:
            raise input_error(path / file, f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}", "the weights do not belong to this config.json; restore them")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise input_error(path / stored[extra[0]][0], f"{len(extra)} tensor(s) the architecture does not have, e.g. {extra[0]!r}", "the weights do not belong to this config.json; restore them")


def load_hf_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "eager", trust_remote_code: bool = False, device_map: str | dict | None = None):
    """The plain Hugging Face model (for generation with its KV cache), in eval mode.

    ``device_map`` (``"auto"``, ``"balanced"``, a dict): one model across the GPUs of a node,
    placed by accelerate; ``device`` is then ignored.

    Only safetensors are read, and the checkpoint is checked against config.json first: a
    missing, extra or wrongly shaped tensor is an input error naming it, never a silent random init.
    """
    from transformers import AutoModelForCausalLM

    _offline()
    path = Path(path)
    family_of(path)
    _check_checkpoint(path, trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **({"device_map": device_map} if device_map is not None else {}),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise input_error(path, f"cannot load weights ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", "check the safetensors files and config.json") from None
    for kind in ("missing_keys", "mismatched_keys", "unexpected_keys"):
        problems = sorted(map(str, info.get(kind) or []))
        if problems and not (kind == "missing_keys" and problems == ["lm_head.weight"] and getattr(model.config, "tie_word_embeddings", False)):
            raise input_error(path, f"loading reports {kind.replace('_', ' ')}: {problems[0]}" + (f" and {len(problems) - 1} more" if len(problems) > 1 else ""), "the weights do not belong to this config.json; restore them")
    return (model if device_map is not None else model.to(device)).eval()


# Architectures whose attention has learned sink logits: a share of each row goes to no key.
_SINK_ARCHITECTURES = ("GptOssForCausalLM",)


def _has_sinks(bridge) -> bool:
    return any("sinks" in name for name, _ in bridge.named_parameters())


def _validate_bridge(bridge, tokenizer, path: Path) -> None:
    names = set(bridge.hook_dict)
    from probes.points import hook_name

    needed = [hook_name(key, layer) for layer in range(bridge.cfg.n_layers) for key in ("resid_post", "pattern", "z")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise CtdError(f"{path}: the bridge lacks hooks {missing[:3]}...; this architecture is not readable with eager attention")
    ids = torch.tensor([tokenizer.encode("Assessment: chronic heart failure.", add_special_tokens=False)[:16]], device=bridge.cfg.device)
    patterns = []
    with torch.no_grad():
        bridge.run_with_hooks(ids, fwd_hooks=[(hook_name("pattern", 0), lambda t, hook: patterns.append(t.detach()))])
    if not patterns:
        raise CtdError(f"{path}: attention pattern hook never fired; eager attention is required")
    sums = patterns[0].float().sum(-1)
    if getattr(bridge.cfg, "original_architecture", "") in _SINK_ARCHITECTURES or _has_sinks(bridge):
        # attention sinks (gpt-oss) take part of each row's mass: the rows over real keys sum to at most 1
        if not bool(((sums > 0) & (sums <= 1 + 1e-3)).all()):
            raise CtdError(f"{path}: attention rows over real keys must sum to (0, 1] with sinks (found {float(sums.min()):.3f} to {float(sums.max()):.3f})")
    elif not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise CtdError(f"{path}: attention rows do not sum to 1 (max deviation {float((sums - 1).abs().max()):.2e})")


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, validate: bool = True, device_map: str | dict | None = None):
    """A TransformerBridge over the causal LM in ``path`` (offline, eager attention, tokenizer from disk).

    Returns the bridge; ``bridge.tokenizer`` is the tokenizer and ``bridge.ctd_info`` a :class:`ModelInfo`.
    A missing folder or an unsupported architecture is a one-line ``CtdInputError``.
    ``device_map="auto"`` spreads one large model over the GPUs of a node (accelerate; the bridge
    keeps the dispatch), instead of ``device``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    path = Path(path)
    family, architecture = family_of(path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    hf_model = load_hf_model(path, device=device, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code, device_map=device_map)
    placement = {"device_map": device_map} if device_map is not None else {"device": device}
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code, **placement
    )
    bridge.eval()
    if validate:
        _validate_bridge(bridge, tokenizer, path)
    cfg = bridge.cfg
    bridge.ctd_info = ModelInfo(
        path=str(path.resolve()),
        family=family,
        architecture=architecture,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_vocab=cfg.d_vocab,
    )
    return bridge


def build_tiny_model(
    family: str,
    folder: str | Path,
    tokenizer,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a tiny random-weight model of ``family`` (a key of :data:`SUPPORTED_ARCHITECTURES`'s
    values) plus ``tokenizer`` to ``folder`` in the standard Hugging Face layout (tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in _TINY:
        raise CtdInputError(f"build_tiny_model: unknown family {family!r}; use one of {sorted(_TINY)}")
    model_type, extra = _TINY[family]
    d_head = d_model // n_heads
    # None in the table = derived from the sizes (DeepSeek-V3's latent attention has one key/value per head)
    fill = {"head_dim": d_head, "moe_intermediate_size": d_mlp // 2, "query_pre_attn_scalar": d_head, "num_key_value_heads": n_heads}
    sizes = {"num_key_value_heads": n_kv_heads}
    sizes.update({k: (fill[k] if v is None and k in fill else v) for k, v in extra.items()})
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init at std 0.02 gives near-uniform attention; a larger scale makes patterns and
    # greedy choices sharper, so parity tests compare something non-trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder
