"""A custom causal language model that notrainer (and every transformers tool) can train,
save and reload: a small pre-norm decoder written from scratch.

What makes a model class work with `from_pretrained`, `save_pretrained`, the Auto classes,
accelerate (DDP, FSDP, DeepSpeed) and notrainer's `task=clm`:

- a config class (subclass of PretrainedConfig) with a unique `model_type`, whose __init__
  takes every field as a keyword with a default and passes **kwargs on to super().__init__;
- a model class (subclass of PreTrainedModel) with `config_class`, `base_model_prefix`,
  `_init_weights` and a `post_init()` call at the end of __init__;
- `forward(input_ids, attention_mask=None, labels=None, ...)` returning a
  `CausalLMOutputWithPast` with `loss` (when labels are given; the labels are the inputs, the
  model shifts them) and `logits`;
- no hard-coded `.to(device)` / `.cuda()`: new tensors take the device of the inputs;
- registration with AutoConfig / AutoModelForCausalLM, so the name `tiny-lm` and saved folders
  resolve to these classes (and `register_for_auto_class`, so a saved folder carries this code).

Train it:  python -m notrainer.run task=clm model_class=examples/custom_model/modeling_tiny_lm.py:TinyLMForCausalLM
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyLMConfig(PretrainedConfig):
    model_type = "tiny-lm"

    def __init__(self, vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=512, dropout=0.0, initializer_range=0.02, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings  # notrainer's block_size reads this
        self.dropout = dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class TinyLMBlock(GradientCheckpointingLayer):
    """Pre-norm attention + MLP. GradientCheckpointingLayer makes gradient_checkpointing=true work."""

    def __init__(self, config: TinyLMConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden, mask):
        b, t, d = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        hidden = hidden + self.dropout(self.out(attn.transpose(1, 2).reshape(b, t, d)))
        return hidden + self.dropout(self.down(F.gelu(self.up(self.norm2(hidden)))))


class TinyLMPreTrainedModel(PreTrainedModel):
    config_class = TinyLMConfig
    base_model_prefix = "model"  # the attribute holding the body, so body-only checkpoints load too
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyLMBlock"]  # FSDP's transformer-layer auto wrap and device_map read this

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class TinyLMModel(TinyLMPreTrainedModel):
    def __init__(self, config: TinyLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(TinyLMBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)  # the inputs' device, never a fixed one
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)
        # Causal mask, and padding keys masked out when an attention_mask is given.
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.norm(hidden)


class TinyLMForCausalLM(TinyLMPreTrainedModel):
    def __init__(self, config: TinyLMConfig):
        super().__init__(config)
        self.model = TinyLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> CausalLMOutputWithPast:
        # **kwargs takes what generic callers pass and this model does not use (use_cache, ...).
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            # Position i predicts token i+1; -100 labels (padding, prompts) are ignored.
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


# In this process: the name "tiny-lm" and folders whose config.json says model_type "tiny-lm"
# resolve to these classes. exist_ok: the module may be imported twice (e.g. by file path).
AutoConfig.register(TinyLMConfig.model_type, TinyLMConfig, exist_ok=True)
AutoModelForCausalLM.register(TinyLMConfig, TinyLMForCausalLM, exist_ok=True)
# In any other process: save_pretrained copies this file next to the weights and writes an
# auto_map, so AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) works there.
TinyLMConfig.register_for_auto_class()
TinyLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
