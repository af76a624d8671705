"""The model side: loading, adapters, losses and optimizers.

`loading.py` (dtype, attention, quantization keys), `lora.py` (peft adapters), `adapter_checkpoints.py`
(adapter-only checkpoints), `losses.py` (the chunked lm_head + cross-entropy), `optim.py`
(`optim=` and the LR schedules).

May import: `notrainer.errors`, `notrainer.compat`. Never imports the engine, a task or the CLI.
"""
