"""Offline building blocks for the embedded defaults: a tokenizer trained in a second on the
task's own corpus, and tiny model configs. No file and no network needed.

The tokenizer is a BPE over words split like BERT's (so `word_ids()` and offset mappings work
for token classification and QA) with "##" marking word-inner pieces. BPE training is
deterministic, so a resumed run rebuilds exactly the same vocabulary.
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
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##",
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if style == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    return fast


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
