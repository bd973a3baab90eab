"""The organism's tokenizer: byte-level BPE trained on its corpus, every label code one token."""

from __future__ import annotations

from analyses.models.organism.format import SPECIAL_TOKENS

__all__ = ["train_tokenizer"]


def train_tokenizer(texts, vocab_size: int = 3000, label_codes: list[str] | None = None):
    """A byte-level BPE tokenizer trained on ``texts`` with the organism's special tokens.

    ``label_codes`` become whole tokens (matched as single words only): each label is then one
    output token, so the organism's label choice is one classification step, and the logit lens
    and the label margin read one well-defined token per label.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    fast.padding_side = "left"
    if label_codes:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(code, single_word=True, normalized=False) for code in label_codes])
    return fast


# ------------------------------------------------------------------------------------------------
# training


