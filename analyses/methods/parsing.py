"""Parse a reasoning trace into label mentions, shortlist, answer, regions and the shortlist-growth curve.

Works on any tokenizer and any label space: text is recovered with per-token character spans, label
mentions are found by code (a word equal to a label code) and by label text (normalised word match,
longest first), and each token of prompt + output gets one region. Malformed traces (no think close,
no answer, unknown codes in the answer) are parsed as far as they go and flagged, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from analyses.methods.prompts import MARKERS
from analyses.tasks.labels import LabelSpace, normalize_text, short_description, text_variants

__all__ = ["Region", "Mention", "ParsedTrace", "TraceParser", "token_char_spans", "render_codes", "GROWTH_GRID"]

GROWTH_GRID = np.linspace(0.0, 1.0, 21)
_WORD = re.compile(r"[A-Za-z0-9]+")
_CODE_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*[A-Za-z0-9]|[A-Za-z0-9]")


class Region(IntEnum):
    """Per-token region of prompt + output (stored as int8)."""

    PROMPT = 0  # template text around the document
    DOCUMENT = 1
    ANCHOR = 2  # document tokens inside gold evidence spans
    COT = 3
    MENTION_GOLD = 4
    MENTION_NEAR_MISS = 5
    MENTION_OTHER = 6
    ANSWER = 7
    AFTER = 8  # think close, answer markers and anything after the answer


@dataclass(frozen=True)
class Mention:
    label_id: int
    char_start: int  # in the output text
    char_end: int
    token_start: int  # absolute token index in prompt + output
    token_end: int  # exclusive
    kind: str  # "code" or "text"


@dataclass
class ParsedTrace:
    """What the parser found in one trace. Token indices are absolute (prompt + output)."""

    text: str
    mentions: list[Mention]
    shortlist: list[int]
    answer: list[int]
    unknown_answer_codes: list[str]
    has_think_close: bool
    has_answer: bool
    cot_start: int
    cot_end: int
    regions: np.ndarray
    shortlist_growth: np.ndarray
    problems: list[str] = field(default_factory=list)

    @property
    def well_formed(self) -> bool:
        return self.has_think_close and self.has_answer and not self.unknown_answer_codes


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to 256+.
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text of ``ids`` and each token's (start, end) character span in it.

    Byte-level BPE tokens are mapped to bytes exactly (a token may end inside a multi-byte
    character: it then spans up to the character's end). Other tokenizers fall back to decoding
    growing prefixes.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    decoder = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    added = set(getattr(tokenizer, "get_added_vocab", lambda: {})())
    if all(p in special or p in added or all(ch in decoder for ch in p) for p in pieces):
        raw = bytearray()
        byte_ends = []
        for p in pieces:
            raw.extend(p.encode("utf-8") if (p in special or p in added) else bytes(decoder[ch] for ch in p))
            byte_ends.append(len(raw))
        text = raw.decode("utf-8", errors="replace")
        # Map byte offsets to character offsets.
        char_at_byte = np.zeros(len(raw) + 1, dtype=np.int64)
        pos = 0
        for ci, ch in enumerate(text):
            width = len(ch.encode("utf-8")) if ch != "\ufffd" else 1
            char_at_byte[pos : pos + width] = ci
            pos += width
        char_at_byte[pos:] = len(text)
        spans, start_byte = [], 0
        for end_byte in byte_ends:
            s, e = int(char_at_byte[start_byte]), int(char_at_byte[end_byte]) if end_byte < len(raw) else len(text)
            if end_byte < len(raw) and char_at_byte[end_byte] == char_at_byte[end_byte - 1] and end_byte > start_byte:
                e = int(char_at_byte[end_byte]) + 1  # token ends inside a character
            spans.append((s, max(s, e)))
            start_byte = end_byte
        return text, spans
    spans, previous = [], ""
    for i in range(len(ids)):
        current = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
        spans.append((len(previous), len(current)))
        previous = current
    return previous, spans


_DESCRIPTION_GAP = re.compile(r"[\s:(\-–,]*")


def _merge_described_codes(found: list[tuple[int, int, int, str]], text: str) -> list[tuple[int, int, int, str]]:
    """A code followed by its own description ("I50.21 acute systolic heart failure", or with a
    colon, dash or parenthesis between) is one mention spanning both, of kind ``code``."""
    merged: list[tuple[int, int, int, str]] = []
    for mention in found:
        if merged:
            label, start, end, kind = merged[-1]
            if kind == "code" and mention[3] == "text" and mention[0] == label and mention[1] >= end and _DESCRIPTION_GAP.fullmatch(text, end, mention[1]):
                merged[-1] = (label, start, mention[2], "code")
                continue
        merged.append(mention)
    return merged


class TraceParser:
    """Finds label mentions and the answer in traces over one label space (build once, reuse)."""

    def __init__(
        self,
        labels: LabelSpace,
        think_close: str = MARKERS["think"]["think_close"],
        answer_open: str = MARKERS["think"]["answer_open"],
        answer_close: str = MARKERS["think"]["answer_close"],
        match_texts: bool = True,
        min_text_words: int = 2,
        think_open: str | None = MARKERS["think"]["think_open"],
        tagless_answer: bool = False,
    ):
        """``think_open``: when the output itself opens the CoT with this marker (models whose chat
        template does not), the CoT starts after it. ``tagless_answer``: without answer tags after
        the think close, the answer is every label named there (by code or description), flagged
        "answer without tags"; off, such a trace has no answer (the organism's strict format)."""
        self.labels = labels
        self.tagless_answer = tagless_answer
        self.think_open = think_open
        self.think_close = think_close
        self.answer_open = answer_open
        self.answer_close = answer_close
        self._codes = {code: i for i, code in enumerate(labels.codes)}
        self._upper_codes = {code.upper(): i for i, code in enumerate(labels.codes)}
        self._phrases: dict[tuple[str, ...], set[int]] = {}
        if match_texts:
            for i in range(len(labels)):
                for text in text_variants(labels.texts[i], labels.aliases[i]):
                    words = tuple(normalize_text(text).split())
                    if len(words) >= min_text_words:
                        self._phrases.setdefault(words, set()).add(i)
        self._max_words = max((len(k) for k in self._phrases), default=0)

    # -- mentions in text ------------------------------------------------------------------------
    def _code_of(self, word: str) -> int | None:
        word = word.strip("._-")
        return self._codes.get(word, self._upper_codes.get(word.upper()))

    def find_mentions(self, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int, int, str]]:
        """(label_id, char_start, char_end, kind) in ``text[start:end]``, sorted by position.

        Code mentions are words equal to a label code. Text mentions are the longest normalised
        label text at each position; a text mention inside a longer one is dropped, and an
        ambiguous text (shared by several labels) is not a mention of any.
        """
        end = len(text) if end is None else end
        found: list[tuple[int, int, int, str]] = []
        for m in _CODE_TOKEN.finditer(text, start, end):
            label = self._code_of(m.group())
            if label is not None:
                s = m.start()
                e = s + len(m.group().rstrip("._-"))
                found.append((label, s, e, "code"))
        if self._phrases:
            words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text, start, end)]
            i = 0
            while i < len(words):
                matched = 0
                for n in range(min(self._max_words, len(words) - i), 0, -1):
                    key = tuple(w for w, _, _ in words[i : i + n])
                    owners = self._phrases.get(key)
                    if owners is not None:
                        if len(owners) == 1:
                            found.append((next(iter(owners)), words[i][1], words[i + n - 1][2], "text"))
                        matched = n
                        break
                i += matched or 1
        found.sort(key=lambda f: (f[1], -f[2]))
        return _merge_described_codes(found, text)

    def answer_labels(self, body: str) -> tuple[list[int], list[str]]:
        """Label ids named in an answer body ("I50.22, I10" or label texts), and the unknown items."""
        found: list[int] = []
        unknown: list[str] = []
        body = re.sub(r"<[^<>]{1,40}>", " ", body)  # inner markup (<answer> inside a final channel, ...)
        for item in re.split(r"[,;\n]", body):
            item = item.strip().strip(".")
            if not item:
                continue
            label = self._code_of(item)
            if label is None:
                by_text = [m for m in self.find_mentions(item) if m[2] - m[1] == len(item)]
                label = by_text[0][0] if by_text else None
            if label is None:
                unknown.append(item)
            elif label not in found:
                found.append(label)
        return found, unknown

    @classmethod
    def for_template(cls, labels: LabelSpace, template, **options) -> "TraceParser":
        """A parser for the markers of a prompt template (``analyses.methods.prompts.PromptTemplate``)."""
        return cls(labels, think_close=template.think_close, answer_open=template.answer_open, answer_close=template.answer_close, think_open=template.think_open, tagless_answer=template.chat, **options)

    def answer_of(self, text: str) -> list[int]:
        """Labels in the first ``<answer>...</answer>`` block of ``text`` (an unclosed block runs to the end)."""
        start = text.find(self.answer_open)
        if start < 0:
            return []
        end = text.find(self.answer_close, start)
        return self.answer_labels(text[start + len(self.answer_open) : end if end >= 0 else len(text)])[0]

    # -- whole traces ----------------------------------------------------------------------------
    def parse(
        self,
        tokenizer,
        prompt_ids: list[int],
        output_ids: list[int],
        document_span: tuple[int, int] | None = None,
        prompt_spans: list[tuple[int, int]] | None = None,
        anchors: list[tuple[int, int]] = (),
        gold: list[int] = (),
        near_miss: list[int] = (),
    ) -> ParsedTrace:
        """Parse ``output_ids`` (the model's continuation of ``prompt_ids``, which ends with the think-open marker).

        Args:
            document_span: character span of the document in the prompt text.
            prompt_spans: per prompt token (start, end) characters in the prompt text.
            anchors: character spans of gold evidence in the prompt text.
            gold, near_miss: label ids, to tell gold from near-miss mentions in the regions.
        """
        n_prompt = len(prompt_ids)
        text, spans = token_char_spans(tokenizer, output_ids)
        problems: list[str] = []
        close_at = text.find(self.think_close)
        # A model whose template does not open the think block writes the marker itself.
        open_at = text.find(self.think_open) if self.think_open else -1
        cot_char_start = open_at + len(self.think_open) if 0 <= open_at and (close_at < 0 or open_at < close_at) else 0
        if close_at >= 0 and close_at < cot_char_start:
            close_at = text.find(self.think_close, cot_char_start)
        has_close = close_at >= 0
        cot_char_end = close_at if has_close else len(text)
        if not has_close:
            problems.append("no think close")

        answer_ids: list[int] = []
        unknown: list[str] = []
        has_answer = False
        answer_char = (len(text), len(text))
        if has_close:
            after = close_at + len(self.think_close)
            a_open = text.find(self.answer_open, after) if self.answer_open else -1
            if a_open >= 0:
                a_close = text.find(self.answer_close, a_open) if self.answer_close else -1
                body_start = a_open + len(self.answer_open)
                body_end = a_close if a_close >= 0 else len(text)
                has_answer = a_close >= 0 or not self.answer_close
                if not has_answer:
                    problems.append("answer not closed")
                answer_char = (body_start, body_end)
                answer_ids, unknown = self.answer_labels(text[body_start:body_end])
            else:
                # No answer tags: the labels named after the think close, in order.
                found = list(dict.fromkeys(lab for lab, _, _, _ in self.find_mentions(text, after))) if self.tagless_answer else []
                if found:
                    answer_ids, has_answer = found, True
                    answer_char = (after, len(text))
                    problems.append("answer without tags")
                else:
                    problems.append("no answer")
        if unknown:
            problems.append(f"unknown answer codes {unknown[:3]}")

        token_starts = np.array([s for s, _ in spans], dtype=np.int64)
        token_ends = np.array([e for _, e in spans], dtype=np.int64)

        def token_range(c0: int, c1: int) -> tuple[int, int]:
            t0 = int(np.searchsorted(token_ends, c0, side="right"))
            t1 = int(np.searchsorted(token_starts, c1, side="left"))
            return n_prompt + t0, n_prompt + max(t1, t0 + 1)

        mentions = [Mention(lab, s, e, *token_range(s, e), kind) for lab, s, e, kind in self.find_mentions(text, cot_char_start, cot_char_end)]
        shortlist: list[int] = []
        for m in mentions:
            if m.label_id not in shortlist:
                shortlist.append(m.label_id)

        cot_start = n_prompt + int(np.searchsorted(token_ends, cot_char_start, side="right")) if cot_char_start else n_prompt
        cot_end = token_range(cot_char_end, cot_char_end)[0] if has_close else n_prompt + len(output_ids)
        regions = np.full(n_prompt + len(output_ids), Region.PROMPT, dtype=np.int8)
        if prompt_spans is not None and document_span is not None:
            for t, (s, e) in enumerate(prompt_spans):
                if s < document_span[1] and e > document_span[0] and e > s:
                    regions[t] = Region.DOCUMENT
                    if any(s < a1 and e > a0 for a0, a1 in anchors):
                        regions[t] = Region.ANCHOR
        regions[cot_start:cot_end] = Region.COT
        regions[cot_end:] = Region.AFTER
        if has_answer or answer_char[0] < len(text):
            a0, a1 = token_range(*answer_char) if answer_char[1] > answer_char[0] else (cot_end, cot_end)
            regions[a0:a1] = Region.ANSWER
        gold_set, near_set = set(gold), set(near_miss)
        for m in mentions:
            kind = Region.MENTION_GOLD if m.label_id in gold_set else Region.MENTION_NEAR_MISS if m.label_id in near_set else Region.MENTION_OTHER
            regions[m.token_start : m.token_end] = kind

        cot_len = max(cot_end - cot_start, 1)
        growth = np.zeros(len(GROWTH_GRID))
        if shortlist:
            first = {}
            for m in mentions:
                first.setdefault(m.label_id, (m.token_end - cot_start) / cot_len)
            firsts = np.array(sorted(first.values()))
            growth = np.searchsorted(firsts, GROWTH_GRID, side="right") / len(shortlist)
        return ParsedTrace(
            text=text,
            mentions=mentions,
            shortlist=shortlist,
            answer=answer_ids,
            unknown_answer_codes=unknown,
            has_think_close=has_close,
            has_answer=has_answer,
            cot_start=cot_start,
            cot_end=cot_end,
            regions=regions,
            shortlist_growth=growth,
            problems=problems,
        )


def render_codes(text: str, parser: "TraceParser") -> str:
    """``text`` with every bare label code written as "code short-description" (DESIGN §2).

    A sentence embedder cannot read "I50.21"; real models often write bare codes. A code already
    followed by its description (as the organism writes it) is left as it is.
    """
    labels = parser.labels
    pieces, last = [], 0
    for label, start, end, kind in parser.find_mentions(text):
        if kind != "code" or start < last:
            continue
        description = short_description(labels.texts[label])
        written = [normalize_text(v) for v in text_variants(labels.texts[label], labels.aliases[label])]
        following = normalize_text(text[end : end + max(len(v) for v in written) + 16])
        pieces.append(text[last:end])
        if not any(v and following.startswith(v) for v in written):
            pieces.append(" " + description)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)
