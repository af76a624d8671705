"""What every peft method here shares: importing peft with the one install line, the peft task
type of each task's model class, the default LoRA targets, and the k-bit preparation of a
quantized base. `lora` and `peft_methods` both build on it.
"""

from __future__ import annotations

from notrainer.errors import UsageError
from notrainer.modeling.loading import is_quantized

#: task's Auto class -> peft task type (decides which head stays trainable and saved)
PEFT_TASK_TYPES = {
    "AutoModelForCausalLM": "CAUSAL_LM",
    "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForQuestionAnswering": "QUESTION_ANS",
}


def default_target_modules(model) -> list[str] | str:
    """peft's per-architecture default (q/v projections for llama, c_attn for gpt2, query/value
    for bert ...), else every linear layer except the output head."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    return defaults.get(getattr(model.config, "model_type", None), "all-linear")


def for_kbit_training(model):
    """A base loaded quantized (QLoRA, notrainer/modeling/loading.py) gets peft's k-bit preparation: its
    remaining 16-bit weights (norms, embeddings, head) in fp32 and frozen. Gradient checkpointing
    is left to run.build, as for any model."""

    if not is_quantized(model):
        return model
    for module in model.modules():
        # bitsandbytes' CPU fast path (AVX512-BF16) repacks a 4-bit weight at its first no-grad
        # forward in eval mode and keeps it so: the training steps after an evaluation then run a
        # kernel without a backward, and the adapters below it get no gradient, silently.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    peft = import_peft("quantization")
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def import_peft(why: str):
    try:
        import peft
    except ImportError:
        raise UsageError(f"{why}: that needs peft: pip install 'notrainer[peft]'") from None
    return peft
