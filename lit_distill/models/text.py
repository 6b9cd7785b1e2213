"""Offline prompt encoders: a word-level tokenizer built from a vocabulary and a tiny CLIP text model.

Nothing here downloads anything. The tokenizer is a `transformers.PreTrainedTokenizerFast`, so it is saved
with `save_pretrained(dir)` and loaded back with `AutoTokenizer.from_pretrained(dir)` like any other.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0, 1, 2, 3 in every word tokenizer


def build_word_tokenizer(vocabulary: list[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary` (lower-cased, split on whitespace and punctuation).

    Ids: `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, then the sorted unique words. Every encoded
    sequence is `<bos> words... <eos>`; unknown words map to `<unk>`. `model_max_length` is `max_length`,
    so `tok(prompts, padding="max_length", truncation=True)` gives `[B, max_length]` ids.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (bos, a word, eos), got {max_length}")
    words = sorted({w.lower() for w in vocabulary} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
        padding_side="right",
    )


def build_text_encoder(
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_length: int = 16,
    projection_dim: int | None = None,
) -> CLIPTextModel:
    """A randomly initialised `CLIPTextModel` for a word tokenizer of `vocab_size` tokens.

    Special-token ids follow `build_word_tokenizer` (pad 0, bos 2, eos 3); the pooled output is the
    hidden state at the first `<eos>`. Output `last_hidden_state`: `[B, max_length, hidden_size]`.
    """
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        projection_dim=projection_dim or hidden_size,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)
