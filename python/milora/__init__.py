"""milora: MiLoRA (prompt-routed mixture of LoRA experts) for HF transformers causal LMs.

    import milora
    cfg = milora.MiLoRAConfig(r=32, alpha=64, top_k=3)
    model = milora.get_milora_model(base_model, cfg, adapter_name="task_a")
    out = model(input_ids=ids, attention_mask=am, labels=labels, prompt_mask=pm)  # loss includes aux
    model.generate(input_ids=ids, attention_mask=am, adapter_names=["task_a", "base"], max_new_tokens=32)

Every adapted linear calls `milora_ext.gated_lora_linear` (the fused op); see docs/module_layer.md.
"""
from .config import MODULE_NAMES, MiLoRAConfig
from .layer import MiLoRALinear
from .model import MiLoRAModel, get_milora_model
from .router import PromptRouter, RationalActivation, pool_hidden, switch_load_balance_loss
from .routing import BatchPlan, PromptGates, Request, gates_of

__all__ = [
    "MODULE_NAMES",
    "MiLoRAConfig",
    "MiLoRALinear",
    "BatchPlan",
    "MiLoRAModel",
    "PromptGates",
    "Request",
    "PromptRouter",
    "RationalActivation",
    "gates_of",
    "get_milora_model",
    "pool_hidden",
    "switch_load_balance_loss",
]
