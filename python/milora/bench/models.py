"""Model presets of the generate bench: LLaMA-family decoders built from a config with random
weights (nothing is downloaded).

`tiny` is the CPU default (the whole generate bench in about a minute on 2 cores); `small` is
the 8-layer d=1024 model of the issue's reference measurement; the others have the shapes of
real checkpoints, for a GPU (a 7B model in bfloat16 needs ~14 GB).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch


@dataclass(frozen=True)
class ModelPreset:
    family: str            # transformers class family: llama | mistral | qwen2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    note: str = ""

    def describe(self) -> str:
        return (f"{self.family} d={self.hidden} ffn={self.intermediate} L={self.layers} "
                f"heads={self.heads}/{self.kv_heads} vocab={self.vocab}")


PRESETS: Dict[str, ModelPreset] = {
    "micro": ModelPreset("llama", 64, 128, 2, 4, 2, 256, note="seconds; for tests"),
    "tiny": ModelPreset("llama", 512, 1408, 4, 8, 8, 4096, note="CPU default"),
    "small": ModelPreset("llama", 1024, 2816, 8, 16, 16, 32000, note="the issue's 8-layer d=1024 CPU reference"),
    "llama2-7b": ModelPreset("llama", 4096, 11008, 32, 32, 32, 32000, note="paper's model (Table 4)"),
    "llama2-13b": ModelPreset("llama", 5120, 13824, 40, 40, 40, 32000),
    "llama3-8b": ModelPreset("llama", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "mistral-7b": ModelPreset("mistral", 4096, 14336, 32, 32, 8, 32000, rope_theta=1000000.0),
    "qwen2-7b": ModelPreset("qwen2", 3584, 18944, 28, 28, 4, 152064, rope_theta=1000000.0),
}


def hf_config(preset: ModelPreset):
    import transformers

    kw = dict(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
              num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
              num_key_value_heads=preset.kv_heads, vocab_size=preset.vocab, rope_theta=preset.rope_theta,
              max_position_embeddings=4096, pad_token_id=0, bos_token_id=None, eos_token_id=None,
              tie_word_embeddings=False)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[preset.family]
    try:
        return cls(**kw)
    except TypeError:  # a transformers version that takes rope settings elsewhere
        kw.pop("rope_theta")
        return cls(**kw)


def build_model(name: str, dtype: torch.dtype, device, seed: int = 0):
    """A random-weight causal LM of preset `name`, in eval mode on `device` in `dtype`, with a
    generation config that never stops early (no EOS) and pads with token 0."""
    import transformers

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    cfg = hf_config(preset)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[preset.family]
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate (and initialise) directly in the target dtype
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    # no .to(dtype): that would also cast float32 buffers transformers keeps in float32 (rotary inv_freq)
    model = model.to(device=device).eval()
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"build_model: parameters in {sorted(wrong)}, expected {dtype}")
    for p in model.parameters():
        p.requires_grad_(False)
    gc = model.generation_config
    gc.pad_token_id = 0
    gc.eos_token_id = None
    gc.bos_token_id = None
    gc.do_sample = False
    return model


def preset_dict(name: str) -> Dict[str, object]:
    return {"model": name, **asdict(PRESETS[name])}
