"""Offline building blocks for the embedded defaults: a tokenizer trained in a second on the
task's own corpus, and tiny model configs. No file and no network needed.

The tokenizer is a BPE. For encoders ("bert" style) words are split like BERT's (so
`word_ids()` and offset mappings work for token classification and QA) with "</w>" marking
the piece that ends a word; for decoders ("gpt" style) spaces live inside the tokens, so generated text
decodes back exactly. BPE training is deterministic (WordPiece training is not), so a resumed
run rebuilds exactly the same vocabulary.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, style: str = "bert", model_max_length: int = 512):
    """A `PreTrainedTokenizerFast` trained on `texts`.

    style="bert": adds [CLS] ... [SEP] (and [CLS] a [SEP] b [SEP] for pairs), for encoders.
    style="gpt": adds nothing; `</s>` is the end-of-text token, for decoders.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if style == "bert":
        # Words split on spaces and punctuation; "</w>" marks the piece that ends a word.
        tok = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        prefix = {"end_of_word_suffix": "</w>"}
    else:
        # Spaces are kept in the tokens ("▁word"), so generated text decodes back exactly.
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        prefix = {}
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **prefix)
    tok.train_from_iterator(list(texts), trainer)
    tok = _canonical_ids(tok, specials)
    if style == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    return fast


def _canonical_ids(tok, specials: list[str]):
    """Renumber the vocabulary deterministically: special tokens, then the alphabet sorted, then
    merged tokens in merge order. BPE training always learns the same tokens and merges, but
    with a suffix it numbers the alphabet in hash order, which would change the ids (and so the
    meaning of every embedding row) from one run to the next."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges]
    first = specials + sorted(set(vocab) - set(specials) - set(merged))
    order = list(dict.fromkeys(first + merged))
    assert len(order) == len(vocab)
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in data.get("added_tokens", []):
        added["id"] = data["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def splits(train: list[dict], validation: list[dict]):
    """Built-in rows (one dict per example) as a DatasetDict with train and validation splits."""
    import datasets

    return datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                                validation=datasets.Dataset.from_list(validation))


def tiny_config(model_type: str, tokenizer, max_positions: int = 512, **overrides):
    """A small random-init config of `model_type` sized for CPU tests (about 0.5M parameters)."""
    from transformers import AutoConfig

    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, vocab_size=len(tokenizer))
    sizes = {
        "gpt2": dict(n_layer=2, n_head=4, n_embd=128, n_positions=max_positions),
        "llama": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                      intermediate_size=256, max_position_embeddings=max_positions),
        "qwen2": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                      intermediate_size=256, max_position_embeddings=max_positions),
        "bert": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=128, intermediate_size=256,
                     max_position_embeddings=max_positions),
        "t5": dict(num_layers=2, num_decoder_layers=2, num_heads=4, d_model=128, d_kv=32, d_ff=256,
                   decoder_start_token_id=tokenizer.pad_token_id),
        "bart": dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     d_model=128, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=max_positions,
                     decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id),
    }
    kwargs = {**sizes.get(model_type, {}), **ids, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)
