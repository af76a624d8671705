"""The offline tokenizer: deterministic (resume rebuilds the same ids), offsets and word ids."""

import pytest

from notrainer.data.builtin import train_tokenizer
from notrainer.tasks.clm import builtin_corpus


@pytest.mark.parametrize("style", ["bert", "gpt"])
def test_training_is_deterministic(style):
    docs = builtin_corpus(200)
    first = train_tokenizer(docs, style=style, vocab_size=300).backend_tokenizer.to_str()
    for _ in range(3):
        assert train_tokenizer(docs, style=style, vocab_size=300).backend_tokenizer.to_str() == first


def test_bert_style_pairs_word_ids_and_offsets():
    tok = train_tokenizer(builtin_corpus(200), style="bert")
    enc = tok("the red fox", "sees a dog", return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    assert enc.sequence_ids()[1] == 0 and enc.sequence_ids()[-2] == 1
    assert enc.word_ids()[1] == 0 and enc.word_ids()[0] is None
    start, end = enc["offset_mapping"][1]
    assert "the red fox"[start:end] == "the"
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "the red fox sees a dog"


def test_gpt_style_round_trips_text():
    tok = train_tokenizer(builtin_corpus(200), style="gpt")
    text = "the big cat sees the dog in the garden ."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("x")["input_ids"][0] not in (tok.cls_token_id, tok.bos_token_id)  # adds no special tokens
