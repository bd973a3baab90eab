"""Prompt templates as data, registered by name (STYLE §6).

A template says how a family wraps a user turn, where thinking starts (the think-open marker ends the
prompt, so every trace starts inside its chain of thought), and how the body asks for labels: in
the published style (with a candidate list) or plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.errors import input_error

__all__ = ["PromptTemplate", "TEMPLATES", "register_template", "get_template", "default_template"]


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

    def render(self, document: str, candidates: list[str] | None = None) -> tuple[str, tuple[int, int]]:
        """The prompt text and the character span of the document inside it."""
        if self.uses_candidates and not candidates:
            raise input_error(f"template {self.name}", "this template needs a candidate list", "pass candidates=[...] or use a plain template")
        body = self.body.replace("{candidates}", ", ".join(candidates or []))
        before, after = body.split("{document}")
        wrapped_before, wrapped_after = self.wrapper.split("{body}")
        prefix = wrapped_before + before
        text = prefix + document + after + wrapped_after + self.think_open + "\n"
        return text, (len(prefix), len(prefix) + len(document))


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


def get_template(name: str) -> PromptTemplate:
    if name not in TEMPLATES:
        raise input_error(None, f"unknown prompt template {name!r}", f"use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def default_template(family: str) -> PromptTemplate:
    """The plain template of a model family (``organism`` for the embedded model)."""
    return get_template(_DEFAULTS.get(family, "qwen3-plain"))
