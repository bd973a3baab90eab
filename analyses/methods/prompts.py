"""Prompt templates as data, registered by name (STYLE §6).

A template says how a family wraps a user turn, where thinking starts (the think-open marker ends the
prompt, so every trace starts inside its chain of thought), and how the body asks for labels: in
the published style (with a candidate list) or plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.errors import input_error

__all__ = ["PromptTemplate", "TEMPLATES", "MARKERS", "FAMILY_MARKERS", "register_template", "get_template", "default_template", "run_template"]


@dataclass(frozen=True)
class PromptTemplate:
    """How to turn a document (and optionally candidates) into a prompt that opens the CoT.

    ``wrapper`` holds ``{body}``; ``body`` holds ``{document}`` and, for candidate prompts,
    ``{candidates}``. The prompt ends with ``think_open``.
    """

    name: str
    family: str
    wrapper: str
    body: str
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    uses_candidates: bool = False
    # Render with the tokenizer's own chat template (``apply_chat_template``, thinking enabled where
    # the template has the switch) instead of ``wrapper``; the think block is opened by the template
    # where it does so, else by the model (the parser finds ``think_open`` in the output).
    chat: bool = False

    def render(self, document: str, candidates: list[str] | None = None, tokenizer=None) -> tuple[str, tuple[int, int]]:
        """The prompt text and the character span of the document inside it."""
        if self.uses_candidates and not candidates:
            raise input_error(f"template {self.name}", "this template needs a candidate list", "pass candidates=[...] or use a plain template")
        body = self.body.replace("{candidates}", ", ".join(candidates or []))
        if self.chat:
            return _render_chat(tokenizer, self, body.replace("{document}", document), document)
        before, after = body.split("{document}")
        wrapped_before, wrapped_after = self.wrapper.split("{body}")
        prefix = wrapped_before + before
        text = prefix + document + after + wrapped_after + self.think_open + "\n"
        return text, (len(prefix), len(prefix) + len(document))


def _render_chat(tokenizer, template: "PromptTemplate", content: str, document: str) -> tuple[str, tuple[int, int]]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise input_error(f"template {template.name}", "this model's tokenizer has no chat template", "pass --template with a hand-written template (e.g. qwen3-plain)")
    messages = [{"role": "user", "content": content}]
    options = {"enable_thinking": True} if "enable_thinking" in tokenizer.chat_template else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
    start = text.rfind(document)
    if start < 0:
        raise input_error(f"template {template.name}", "the chat template does not keep the document verbatim", "use a hand-written template (--template)")
    if text.rstrip().endswith(template.think_open) and not text.endswith("\n"):
        text += "\n"  # the template opened the think block: the CoT starts on the next line
    return text, (start, start + len(document))


# Reasoning markers by style: the think block, and where the answer sits after it.
MARKERS = {
    "think": {"think_open": "<think>", "think_close": "</think>", "answer_open": "<answer>", "answer_close": "</answer>"},
    # Magistral writes its reasoning between [THINK] and [/THINK]
    "magistral": {"think_open": "[THINK]", "think_close": "[/THINK]", "answer_open": "<answer>", "answer_close": "</answer>"},
    # gpt-oss (harmony): reasoning in the analysis channel, the answer in the final channel
    "harmony": {"think_open": "<|channel|>analysis<|message|>", "think_close": "<|end|>", "answer_open": "<|channel|>final<|message|>", "answer_close": "<|return|>"},
}
FAMILY_MARKERS = {"mistral": "magistral", "gpt_oss": "harmony"}

TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    TEMPLATES[template.name] = template
    return template


_R1 = "<｜begin▁of▁sentence｜><｜User｜>{body}<｜Assistant｜>"
_QWEN3 = "<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
_CANDIDATES_BODY = (
    "Assign labels to the document using only these candidates: {candidates}.\n"
    "Document: {document}\n"
    "Reason step by step, then give the chosen labels inside <answer></answer>, separated by commas."
)
_PLAIN_BODY = (
    "Assign the ICD-10-CM codes that apply to this clinical note.\n"
    "Note: {document}\n"
    "Reason step by step, then give the codes inside <answer></answer>, separated by commas."
)

# The embedded organism's own format (what `ctd organism train` teaches it).
register_template(PromptTemplate(name="organism", family="organism", wrapper="{body}", body="<note> {document} </note>\n"))
for family, wrapper, prefix in (("qwen2", _R1, "r1"), ("llama", _R1, "r1-llama"), ("qwen3", _QWEN3, "qwen3")):
    register_template(PromptTemplate(name=f"{prefix}-plain", family=family, wrapper=wrapper, body=_PLAIN_BODY))
    register_template(
        PromptTemplate(name=f"{prefix}-candidates", family=family, wrapper=wrapper, body=_CANDIDATES_BODY, uses_candidates=True)
    )

_DEFAULTS = {"organism": "organism", "qwen2": "r1-plain", "llama": "r1-llama-plain", "qwen3": "qwen3-plain"}
# Every supported family can be prompted through its own chat template (what a real model expects).
_CHAT_BODY = _PLAIN_BODY
for _family in ("qwen2", "qwen3", "llama", "qwen3_moe", "gpt_oss", "phi3", "mistral", "olmo3", "smollm3", "exaone4", "glm4_moe", "deepseek_v3", "gemma3"):
    register_template(PromptTemplate(name=f"{_family}-chat", family=_family, wrapper="{body}", body=_CHAT_BODY, chat=True, **MARKERS[FAMILY_MARKERS.get(_family, "think")]))


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise input_error(None, f"unknown prompt template {name!r}", f"use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def default_template(family: str, tokenizer=None) -> PromptTemplate:
    """A model family's default: its own chat template when its tokenizer has one, else the
    family's hand-written plain template (``organism`` for the embedded model)."""
    if family != "organism" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return get_template(f"{family}-chat")
    return get_template(_DEFAULTS.get(family, "qwen3-plain"))


def run_template(manifest) -> PromptTemplate:
    """The prompt template a run's traces were made with, as the traces stage recorded it in the
    run's manifest (a :class:`~analyses.machinery.io.Manifest`); the organism's when none is recorded."""
    record = manifest.data.get("stages", {}).get("traces", {})
    return get_template(record.get("template") or record.get("config", {}).get("template") or "organism")
