"""The generate bench: the paper's Table 4 (tokens/s of LoRA variants, unmerged, LLaMA decoder)
made multi-tenant and honest: B prompts, each with its own adapter, greedy decoding of N new
tokens with beam 1 and beam 3, against the base model itself.

Rows (every method sees the same prompts and generates exactly N new tokens per prompt: EOS is
disabled and min_new_tokens = max_new_tokens):
    base         the base model, no adapters (plain transformers generate)
    lora         LoRA r on all 7 linears, unmerged, every row its own adapter: PEFT-format
                 adapters imported into a MiLoRAModel (router-less, every module on), fused op
    peft         the real `peft` library, the same adapters, one mixed batch (adapter_names)
    peft_single  the real `peft` library, one adapter for the whole batch (its fast path;
                 not multi-tenant, shown for scale)
    moelora      MOELoRA: per-token routing, 8 experts of rank 4 per linear, top-4 per token
                 (milora routing="token"), served by the fused op with one sequence per token
    milora_ref   MiLoRA (prompt routing, r, top-3 of 7 modules per layer) with every adapted
                 linear computed by the plain PyTorch reference op
                 (milora.layer.gated_lora_linear monkeypatched to milora_ext.gated_lora_linear_ref)
    milora       MiLoRA with the fused op

All adapted models share the base model's weight tensors (structural copies), so memory
columns count the base once per model. Adapters get seeded random non-zero LoRA B (a zero B
would make LoRA a no-op) and seeded random routers.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .memory import method_name as memory_method_name
from .memory import peak_during, tensor_bytes
from .models import PRESETS as MODEL_PRESETS
from .models import build_model
from .progress import Progress
from .timing import (against, load_average, measurement_note, own_base_product_note, paired_ratio, paired_ratio_spread,
                     time_interleaved)

METHODS = ("base", "lora", "peft", "peft_single", "moelora", "milora_ref", "milora")
LABELS = {
    "base": "base model (no adapters)",
    "lora": "LoRA all 7 modules, unmerged",
    "peft": "peft, mixed adapter_names",
    "peft_single": "peft, one adapter for all",
    "moelora": "MOELoRA per-token (8x r4, top-4)",
    "milora_ref": "MiLoRA, reference op",
    "milora": "MiLoRA, fused op",
}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

# normalised logits error ||got - want|| / ||want|| allowed by the checks, per dtype
LOGIT_TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class GenSettings:
    model: str = "tiny"
    batch: int = 8                 # prompts, each its own tenant
    adapters: int = 8              # distinct adapters; prompt i uses adapter i % adapters
    prompt_len: int = 32
    new_tokens: int = 32
    beams: Sequence[int] = (1, 3)
    rank: int = 32                 # LoRA / MiLoRA rank (the paper's r = 32)
    top_k: int = 3                 # MiLoRA: modules kept per layer (of 7)
    moe_experts: int = 8           # MOELoRA baseline (the paper's): 8 experts of rank 4, top-4
    moe_rank: int = 4
    moe_top_k: int = 4
    methods: Sequence[str] = METHODS
    warmup: int = 1
    repeats: int = 3
    seed: int = 0


PRESETS: Dict[str, GenSettings] = {
    # part of `milora-bench` with no arguments: the headline rows, short prompts
    # (15 rounds: with 7, three runs' beam-3 medians ranged 0.66-0.76 on this kind of shared VM)
    "quick": GenSettings(prompt_len=16, new_tokens=16, repeats=15,
                         methods=("base", "lora", "peft", "moelora", "milora")),
    # the default of `milora-bench generate` (~1 minute on 2 idle CPU cores in bfloat16)
    "standard": GenSettings(),
}


# ---- building the models ----------------------------------------------------------------


def clone_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers are the same tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


_W_STD: Dict[tuple, float] = {}


def _b_std(lin_weight: torch.Tensor, rank: int, scaling: float) -> float:
    """Std of random LoRA B so that the LoRA term is about half the base output (A is
    uniform(+-1/sqrt(K)): |A x| ~ |x| / sqrt(3) per rank row)."""
    K = lin_weight.shape[1]
    key = (lin_weight.data_ptr(), tuple(lin_weight.shape), lin_weight.device)
    if key not in _W_STD:  # the base weights are shared by every model: one std each
        _W_STD[key] = float(lin_weight.reshape(-1)[:1 << 16].float().std())
    return 0.5 * _W_STD[key] * math.sqrt(3.0 * K / rank) / scaling


def write_peft_adapters(model, directory: str, names: Sequence[str], rank: int, alpha: float, seed: int) -> Dict[str, str]:
    """Standard PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors)
    with seeded random A and non-zero B for all 7 modules of every layer."""
    from safetensors.torch import save_file

    layers = model.model.layers
    dirs = {}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(seed * 1000 + 100 + i)
        tensors = {}
        for li, layer in enumerate(layers):
            for m in MODULES:
                w = getattr(getattr(layer, PARENTS[m]), m).weight
                N, K = w.shape
                a = (torch.rand(rank, K, generator=g) * 2 - 1) / math.sqrt(K)
                b = torch.randn(N, rank, generator=g) * _b_std(w, rank, alpha / rank)
                prefix = f"base_model.model.model.layers.{li}.{PARENTS[m]}.{m}"
                tensors[f"{prefix}.lora_A.weight"] = a.to(w.dtype).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b.to(w.dtype).contiguous()
        d = os.path.join(directory, name)
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=0.0,
                   target_modules=list(MODULES), bias="none", fan_in_fan_out=False, use_rslora=False,
                   use_dora=False, modules_to_save=None, init_lora_weights=True, base_model_name_or_path=None,
                   inference_mode=True)
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        dirs[name] = d
    return dirs


def randomize_lora_b(mmodel, name: str, seed: int) -> None:
    """Seeded random non-zero LoRA B for adapter `name` of a MiLoRAModel (public layer API)."""
    g = torch.Generator().manual_seed(seed)
    cfg = mmodel.adapters[name].config
    scaling = cfg.scaling
    if cfg.routing == "token":  # k soft-gated independent experts add up to ~1/sqrt(k) of one: compensate
        scaling /= math.sqrt(min(cfg.top_k, cfg.experts_per_module))
    elif cfg.gate_mode == "soft":  # a selected module's soft gate is ~1/k: compensate
        scaling /= min(cfg.top_k, len(cfg.target_modules))
    for key in sorted(mmodel.milora_linears()):
        lin = mmodel.milora_linears()[key]
        t = lin.get_adapter_tensors(name)
        if not t:
            continue
        E, N, r = t["lora_B"].shape
        t["lora_B"] = (torch.randn(E, N, r, generator=g) * _b_std(lin.weight, r, scaling)).to(t["lora_B"])
        lin.set_adapter_tensors(name, t)


@contextlib.contextmanager
def reference_op():
    """Inside: every MiLoRALinear computes with milora_ext.gated_lora_linear_ref (the module
    layer calls `milora.layer.gated_lora_linear`; this swaps that name)."""
    import milora.layer as layer_mod
    from milora_ext import gated_lora_linear_ref

    def ref(*args, check_indices=None):
        return gated_lora_linear_ref(*args)

    old = layer_mod.gated_lora_linear
    layer_mod.gated_lora_linear = ref
    try:
        yield
    finally:
        layer_mod.gated_lora_linear = old


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except Exception:
        return False


@dataclass
class GenMethod:
    name: str
    model: torch.nn.Module
    generate: Callable[..., torch.Tensor]    # generate(input_ids, attention_mask, num_beams) -> ids
    logits: Callable[..., torch.Tensor]      # logits(input_ids, attention_mask, adapter_names) -> [b, L, V]
    rank: int = 0
    experts: int = 0
    top_k: Optional[int] = None
    note: str = ""


def build_methods(s: GenSettings, base, workdir: str, log=print) -> Dict[str, GenMethod]:
    """Every method of s.methods (peft rows are dropped with a note when peft is missing)."""
    import milora

    names = [f"t{i}" for i in range(s.adapters)]
    row_names = [names[i % s.adapters] for i in range(s.batch)]
    alpha = 2.0 * s.rank
    gen_kw = dict(do_sample=False, max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens,
                  num_return_sequences=1, pad_token_id=0, eos_token_id=None)
    out: Dict[str, GenMethod] = {}
    wanted = list(s.methods)

    if "base" in wanted:
        hf = clone_sharing_weights(base)
        out["base"] = GenMethod(
            "base", hf,
            lambda ids, am, nb, hf=hf: hf.generate(input_ids=ids, attention_mask=am, num_beams=nb, **gen_kw),
            lambda ids, am, names, hf=hf: hf(input_ids=ids, attention_mask=am).logits)

    need_peft_dirs = any(m in wanted for m in ("lora", "peft", "peft_single"))
    dirs = write_peft_adapters(base, workdir, names, s.rank, alpha, s.seed) if need_peft_dirs else {}

    if "lora" in wanted:
        lm = milora.get_milora_model(clone_sharing_weights(base), milora.MiLoRAConfig(r=s.rank, alpha=alpha),
                                     adapter_name=None)
        for n in names:
            lm.load_peft_adapter(dirs[n], n)
        lm.eval()
        out["lora"] = GenMethod(
            "lora", lm,
            lambda ids, am, nb, m=lm: m.generate(input_ids=ids, attention_mask=am, num_beams=nb,
                                                 adapter_names=row_names, **gen_kw),
            lambda ids, am, names, m=lm: m(input_ids=ids, attention_mask=am, adapter_names=names).logits,
            rank=s.rank, experts=1, top_k=7)

    if any(m in wanted for m in ("peft", "peft_single")):
        if not peft_available():
            log("note: peft is not installed; the peft rows are skipped (pip install peft)")
        else:
            import peft

            pm = peft.PeftModel.from_pretrained(clone_sharing_weights(base), dirs[names[0]], adapter_name=names[0],
                                                autocast_adapter_dtype=False)
            for n in names[1:]:
                pm.load_adapter(dirs[n], adapter_name=n, autocast_adapter_dtype=False)
            pm.eval()

            def peft_gen(ids, am, nb, pm=pm):
                return pm.generate(input_ids=ids, attention_mask=am, num_beams=nb, adapter_names=row_names, **gen_kw)

            def peft_single_gen(ids, am, nb, pm=pm):
                pm.set_adapter(names[0])
                return pm.generate(input_ids=ids, attention_mask=am, num_beams=nb, **gen_kw)

            if "peft" in wanted:
                out["peft"] = GenMethod("peft", pm, peft_gen,
                                        lambda ids, am, names, pm=pm: pm(input_ids=ids, attention_mask=am,
                                                                         adapter_names=names).logits,
                                        rank=s.rank, experts=1, top_k=7,
                                        note="autocast_adapter_dtype=False: adapters in the model dtype")
            if "peft_single" in wanted:
                def single_logits(ids, am, names, pm=pm):
                    pm.set_adapter(names[0])
                    return pm(input_ids=ids, attention_mask=am).logits
                out["peft_single"] = GenMethod("peft_single", pm, peft_single_gen, single_logits,
                                               rank=s.rank, experts=1, top_k=7, note="all rows use adapter t0")

    def milora_family(cfg: "milora.MiLoRAConfig", salt: int):
        mm = milora.get_milora_model(clone_sharing_weights(base), cfg, adapter_name=None)
        for i, n in enumerate(names):
            mm.add_adapter(n, cfg, seed=s.seed * 1000 + salt + i)
            randomize_lora_b(mm, n, s.seed * 1000 + salt + 50 + i)
        mm.eval()
        gen = lambda ids, am, nb, m=mm: m.generate(input_ids=ids, attention_mask=am, num_beams=nb,  # noqa: E731
                                                   adapter_names=row_names, **gen_kw)
        logits = lambda ids, am, names, m=mm: m(input_ids=ids, attention_mask=am, adapter_names=names).logits  # noqa: E731
        return mm, gen, logits

    if "moelora" in wanted:
        cfg = milora.MiLoRAConfig(r=s.moe_rank, alpha=2.0 * s.moe_rank, routing="token",
                                  experts_per_module=s.moe_experts, top_k=s.moe_top_k)
        mm, gen, logits = milora_family(cfg, 300)
        out["moelora"] = GenMethod("moelora", mm, gen, logits, rank=s.moe_rank, experts=s.moe_experts, top_k=s.moe_top_k)

    if "milora" in wanted or "milora_ref" in wanted:
        cfg = milora.MiLoRAConfig(r=s.rank, alpha=alpha, top_k=s.top_k, routing="prompt")
        mm, gen, logits = milora_family(cfg, 500)
        if "milora_ref" in wanted:
            def ref_gen(ids, am, nb, gen=gen):
                with reference_op():
                    return gen(ids, am, nb)

            def ref_logits(ids, am, names, logits=logits):
                with reference_op():
                    return logits(ids, am, names)
            out["milora_ref"] = GenMethod("milora_ref", mm, ref_gen, ref_logits, rank=s.rank, experts=1, top_k=s.top_k,
                                          note="milora.layer.gated_lora_linear monkeypatched to gated_lora_linear_ref")
        if "milora" in wanted:
            out["milora"] = GenMethod("milora", mm, gen, logits, rank=s.rank, experts=1, top_k=s.top_k)
    return {n: out[n] for n in METHODS if n in out}


# ---- checks -----------------------------------------------------------------------------


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_methods(methods: Dict[str, GenMethod], ids, am, names: Sequence[str], dtype, log=print) -> Dict[str, str]:
    """Before timing: the prefill logits of every adapted method must match a reference
    (MiLoRA-model rows: the same model with the reference op; the peft row: the imported LoRA
    row, i.e. the same adapters), and must differ clearly from the base model's (the adapters
    must matter, or a method skipping LoRA could pass). In 16-bit dtypes the bound is
    max(tolerance, 0.1 x how far the reference's adapters move the logits from base); per-token
    routing (MOELoRA) gets max(3 x tolerance, 0.25 x that): rounding flips some tokens' top-k.
    Runs on a few rows and tokens (the reference op is a Python loop, per token for MOELoRA).
    Returns, per method, what it was checked against and the errors."""
    tol = LOGIT_TOL.get(dtype, 5e-2)
    done: Dict[str, str] = {}
    ref_cache: Dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        base_logits = methods["base"].logits(ids, am, names) if "base" in methods else None
        for name, m in methods.items():
            if name == "base":
                done[name] = "-"
                continue
            if name == "peft_single":
                done[name] = "same model and adapters as peft"
                continue
            got = m.logits(ids, am, names)
            if name == "peft":
                if "lora" not in methods:
                    done[name] = "unchecked (needs the lora row)"
                    continue
                want, against = methods["lora"].logits(ids, am, names), "lora row (same adapters)"
            else:
                key = id(m.model)
                if key not in ref_cache:
                    with reference_op():
                        ref_cache[key] = m.logits(ids, am, names)
                want, against = ref_cache[key], "reference op"
            err = _rel_err(got, want)
            # rounding differences grow with depth and with the adapters' effect, so in 16-bit
            # dtypes the bound is also relative to how far the reference's adapters move the logits
            # (a dropped or misrouted LoRA errs by about that much); per-token routing, where
            # rounding flips some tokens' top-k experts, gets a looser bound
            moved_ref = _rel_err(want, base_logits) if base_logits is not None else 0.0
            low = dtype not in (torch.float32, torch.float64)
            if name == "moelora":
                allowed = max(3 * tol, 0.25 * moved_ref) if low else 3 * tol
            else:
                allowed = max(tol, 0.1 * moved_ref) if low else tol
            if not err <= allowed:
                raise AssertionError(f"generate method {name!r}: prefill logits differ from the {against} by "
                                     f"{err:.3g} (normalised; tolerance {allowed:g} for {dtype}); it is not timed")
            note = f"logits vs {against}: {err:.1e}"
            if base_logits is not None:
                moved = _rel_err(got, base_logits)
                if moved < max(0.1, 2 * tol):
                    raise AssertionError(f"generate method {name!r}: the adapters barely change the logits "
                                         f"({moved:.3g} from base); LoRA would be a no-op")
                note += f" (adapters move them {moved:.2f} from base)"
            done[name] = note
    return done


# ---- running ----------------------------------------------------------------------------


@contextlib.contextmanager
def _setup_threads(device):
    """Untimed CPU setup (thousands of small tensor ops) runs on one thread: on a machine shared
    with other work, OpenMP teams of small ops can wait tens of ms on a descheduled thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_prompts(s: GenSettings, vocab: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed + 7)
    return torch.randint(1, vocab, (s.batch, s.prompt_len), generator=g).to(device)


# ---- the e2e byte floor -------------------------------------------------------------------


def base_decode_bytes(base) -> int:
    """Bytes of base weights one decode step reads: every parameter except the input embedding
    table, of which a step reads only one row per sequence (a tied lm_head reads it all)."""
    emb = base.get_input_embeddings().weight
    out = base.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    seen = set()
    total = 0
    for p in base.parameters():
        if p.data_ptr() in seen or (p.data_ptr() == emb.data_ptr() and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def module_shapes(base) -> List[Dict[str, tuple]]:
    """(K, N) of the 7 adapted linears of every decoder layer."""
    shapes = []
    for layer in base.model.layers:
        shapes.append({m: tuple(reversed(getattr(getattr(layer, PARENTS[m]), m).weight.shape)) for m in MODULES})
    return shapes


def adapter_decode_bytes(method: str, s: GenSettings, shapes: List[Dict[str, tuple]], elt: int) -> int:
    """Bytes of distinct adapter weights (A and B) one decode step must read, beside the base.

    Every row's adapter is read once however many rows (beams) share it. MiLoRA: each distinct
    adapter reads its top-k modules per layer, taken at the mean module size (rows sharing an
    adapter are assumed to route alike, the fewest bytes: a conservative, i.e. high, floor).
    MOELoRA: top-k of its experts in every module per distinct adapter (the fewest bytes again)."""
    distinct = 0 if method == "base" else 1 if method == "peft_single" else min(s.adapters, s.batch)
    total = 0
    for layer in shapes:
        per_module = [K + N for K, N in layer.values()]
        if method in ("lora", "peft", "peft_single"):
            total += distinct * s.rank * sum(per_module)
        elif method in ("milora", "milora_ref"):
            total += distinct * s.rank * min(s.top_k, len(per_module)) * sum(per_module) / len(per_module)
        elif method == "moelora":
            total += distinct * s.moe_rank * min(s.moe_top_k, s.moe_experts) * sum(per_module)
    return int(total * elt)


def run(s: GenSettings, device, dtype: torch.dtype, *, progress: Optional[bool] = None, printer=print,
        profile: Optional[str] = None, profile_rows: int = 25) -> List[Dict]:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    device = torch.device(device)
    printer(f"model {s.model}: {MODEL_PRESETS[s.model].describe()}; {s.batch} prompts x {s.prompt_len} tokens, "
            f"{s.new_tokens} new tokens each, {min(s.adapters, s.batch)} distinct adapters, beams {list(s.beams)}")
    t_setup = time.perf_counter()
    records: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="milora-bench-") as workdir:
        with _setup_threads(device):
            base = build_model(s.model, dtype, device, seed=s.seed)
            methods = build_methods(s, base, workdir, log=printer)
        ids = make_prompts(s, base.config.vocab_size, device)
        am = torch.ones_like(ids)
        rows = min(s.batch, 4)
        check_names = [f"t{i % s.adapters}" for i in range(rows)]
        with _setup_threads(device):
            checks = check_methods(methods, ids[:rows, :8], am[:rows, :8], check_names, dtype, log=printer)
        printer(f"setup (model, adapters, correctness checks): {time.perf_counter() - t_setup:.1f} s; timing "
                f"{len(methods)} methods x {len(s.beams)} beam widths x {max(s.warmup, 1)} warm-up + {s.repeats} repeats")
        expect_len = s.prompt_len + s.new_tokens
        reps = s.repeats
        warm = max(s.warmup, 1)  # the first warm-up call of every method also measures its peak memory
        steps = len(s.beams) * len(methods) * (warm + reps)
        mem_method = memory_method_name(device)
        base_bytes = tensor_bytes(base)
        step_base_bytes = base_decode_bytes(base)
        shapes = module_shapes(base)
        elt = torch.empty((), dtype=dtype).element_size()
        with Progress(steps, enabled=progress) as bar, torch.inference_mode():
            for nb in s.beams:
                def call(m: GenMethod, nb=nb):
                    out = m.generate(ids, am, nb)
                    if out.shape[1] != expect_len:
                        raise AssertionError(f"generate method {m.name!r} produced {out.shape[1] - s.prompt_len} "
                                             f"new tokens, expected {s.new_tokens}")
                    return out
                fns = {n: (lambda m=m: call(m)) for n, m in methods.items()}
                bar.set_label(f"generate beam {nb}")
                peaks = {}
                for n, fn in fns.items():
                    peaks[n], _ = peak_during(fn, device)
                    bar.step()
                bar.step(len(fns) * (warm - 1))
                t = time_interleaved(fns, device, warmup=warm - 1, repeats=reps, on_step=bar.step)
                base, moe = t.get("base"), t.get("moelora")
                for n, m in methods.items():
                    tm = t[n]
                    weights = tensor_bytes(m.model)
                    tokens = s.batch * s.new_tokens
                    step_adapter_bytes = adapter_decode_bytes(n, s, shapes, elt)
                    q1, q3 = paired_ratio_spread(tm, base) if base is not None else (None, None)
                    records.append(dict(
                        bench="generate", method=n, label=LABELS[n], device=str(device),
                        dtype=str(dtype).replace("torch.", ""), model=s.model, tokens=tokens, seqs=s.batch,
                        prompt_len=s.prompt_len, new_tokens=s.new_tokens, beams=nb,
                        adapters=0 if n == "base" else (1 if n == "peft_single" else min(s.adapters, s.batch)),
                        rank=m.rank, experts=m.experts, top_k=m.top_k,
                        median_ms=tm.median_ms, min_ms=tm.min_ms, max_ms=tm.max_ms, repeats=reps,
                        tokens_per_s=tokens / (tm.median_ms / 1e3),
                        ratio_to_base=paired_ratio(tm, base) if base is not None else None,
                        ratio_q1=q1, ratio_q3=q3, load_avg=load_average(),
                        speed_vs_base=1 / paired_ratio(tm, base) if base is not None else None,
                        speed_vs_moelora=1 / paired_ratio(tm, moe) if moe is not None else None,
                        # e2e byte floor: decode time / base time >= (base + adapter bytes) / base bytes
                        floor_ratio=(step_base_bytes + step_adapter_bytes) / step_base_bytes,
                        byte_floor_speed=step_base_bytes / (step_base_bytes + step_adapter_bytes),
                        step_base_mb=step_base_bytes / 2**20, step_adapter_mb=step_adapter_bytes / 2**20,
                        linears_per_step=len(shapes) * len(MODULES), base_median_ms=base.median_ms if base else None,
                        peak_mb=(weights + peaks[n]) / 2**20, peak_delta_mb=peaks[n] / 2**20,
                        weights_mb=weights / 2**20, adapter_mb=max(weights - base_bytes, 0) / 2**20,
                        memory_method=mem_method, checked=checks.get(n, ""), note=methods[n].note,
                    ))
        printer(TABLE_HEADER)
        for r in records:
            printer(format_row(r))
        for line in target_lines(records):
            printer(line)
        note = own_base_product_note(device, dtype) if any(n in methods for n in ("milora", "milora_ref", "moelora")) else ""
        if note:
            printer(note)
        if profile:
            if profile not in methods:
                raise ValueError(f"--profile {profile!r}: not among the methods run ({list(methods)})")
            printer(profile_table(methods[profile], ids, am, device, profile_rows))
    return records


def profile_table(m: GenMethod, ids, am, device, rows: int = 25) -> str:
    """One beam-1 generate of method m under torch.profiler: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch.inference_mode():
        m.generate(ids, am, 1)  # warm
        with profile(activities=acts) as prof:
            m.generate(ids, am, 1)
    key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    return (f"\nprofile of {m.name} ({LABELS[m.name]}), one beam-1 generate, top {rows} ops by {key}:\n"
            + prof.key_averages().table(sort_by=key, row_limit=rows))


TABLE_HEADER = ("| model | beams | method | tokens/s | median s | min-max s | x base | byte floor | x MOELoRA | peak MB | adapters MB |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def _x(v: Optional[float]) -> str:
    return f"{v:.2f}" if v is not None else "-"


def format_row(r: Dict) -> str:
    floor = r.get("byte_floor_speed")
    return (f"| {r['model']} | {r['beams']} | {r['label']} | {r['tokens_per_s']:.1f} | {r['median_ms'] / 1e3:.2f} | "
            f"{r['min_ms'] / 1e3:.2f}-{r['max_ms'] / 1e3:.2f} | {_x(r['speed_vs_base'])} | {_x(floor)} | "
            f"{_x(r['speed_vs_moelora'])} | {r['peak_mb']:.0f} | {r['adapter_mb']:.0f} |")


# The targets for MiLoRA (fused op) tokens/s: within FLOOR_SLACK of the e2e byte floor;
# at least BASE_GOAL x base wherever the floor allows it (floor >= BASE_GOAL_FLOOR); MOE_GOAL x MOELoRA.
FLOOR_SLACK = 0.05
BASE_GOAL, BASE_GOAL_FLOOR = 0.85, 0.90
MOE_GOAL = 1.2


def _excess_line(r: Dict) -> str:
    """Why a byte-floor target is missed, in one line: the time per step above the floor, per linear."""
    noisy = measurement_note(r, speed=True)
    if noisy or not r.get("base_median_ms"):
        return noisy
    steps = r["new_tokens"]
    if r.get("floor_ratio") is None:
        return ""
    floor_ms = r["base_median_ms"] * r["floor_ratio"]
    excess_us = (r["median_ms"] - floor_ms) / steps * 1e3
    per_linear = excess_us / max(r["linears_per_step"], 1)
    return (f"  why: {excess_us:.0f} us per decode step above the byte floor ({per_linear:.1f} us per adapted linear): "
            f"per-call cost (Python layer, op dispatch, thread wake-ups), not bytes; "
            f"`milora-bench generate --profile milora` shows where it goes")


def _moelora_line(r: Dict) -> str:
    """Why the x MOELoRA target is missed, in one line. Where MiLoRA itself is within its byte-floor
    goal, the adapters' costs are small beside the base model's (a slow base product: a CPU without
    a fast GEMM for this dtype), and both methods sit close to base."""
    v, floor, m = r.get("speed_vs_base"), r.get("byte_floor_speed"), r.get("speed_vs_moelora")
    if v is None or floor is None or not m or v < floor - FLOOR_SLACK:
        return _excess_line(r)
    return measurement_note(r, speed=True) or (f"  why: MiLoRA is at {v:.2f}x base (byte-floor goal {floor - FLOOR_SLACK:.2f}: met) and MOELoRA at "
            f"{v / m:.2f}x: the base model's own time dominates each step here, so both adapters' costs are small "
            f"beside it and their ratio shrinks toward 1")


def target_lines(records: List[Dict]) -> List[str]:
    """The targets for MiLoRA (fused op), per beam width: met, MISSED (with why), or not applicable (with why)."""
    lines = []
    for r in records:
        if r["method"] != "milora":
            continue
        b = r["beams"]
        v, floor = r.get("speed_vs_base"), r.get("byte_floor_speed")
        if v is not None and floor is not None:
            ok = v >= floor - FLOOR_SLACK
            lines.append(f"target (beam {b}): MiLoRA fused = {against(v, floor - FLOOR_SLACK)}x base tokens/s, e2e byte floor {floor:.2f} "
                         f"({r['step_adapter_mb']:.1f} MB adapters beside {r['step_base_mb']:.1f} MB base per step), "
                         f"goal >= floor - {FLOOR_SLACK} = {floor - FLOOR_SLACK:.2f}: {'met' if ok else 'MISSED'}")
            if not ok:
                lines.append(_excess_line(r))
            if floor >= BASE_GOAL_FLOOR:
                ok = v >= BASE_GOAL
                lines.append(f"target (beam {b}): MiLoRA fused = {against(v, BASE_GOAL)}x base (goal >= {BASE_GOAL}x where the floor "
                             f">= {BASE_GOAL_FLOOR}): {'met' if ok else 'MISSED'}")
                if not ok:
                    lines.append(_excess_line(r))
            else:
                lines.append(f"target (beam {b}): >= {BASE_GOAL}x base does not apply: the byte floor {floor:.2f} < "
                             f"{BASE_GOAL_FLOOR} (adapter bytes are {r['step_adapter_mb'] / r['step_base_mb']:.0%} of the "
                             f"base bytes a step reads; no kernel can read them for free)")
        m = r.get("speed_vs_moelora")
        if m is not None:
            ok = m >= MOE_GOAL
            lines.append(f"target (beam {b}): MiLoRA fused = {against(m, MOE_GOAL)}x MOELoRA tokens/s (goal >= {MOE_GOAL}x): "
                         f"{'met' if ok else 'MISSED'}")
            if not ok:
                lines.append(_moelora_line(r))
    return lines


def settings_from_args(args) -> GenSettings:
    s = PRESETS[args.preset]
    over = {}
    for flag, fld in (("model", "model"), ("batch", "batch"), ("adapters", "adapters"), ("prompt_len", "prompt_len"),
                      ("new_tokens", "new_tokens"), ("rank", "rank"), ("top_k", "top_k"), ("repeats", "repeats"),
                      ("warmup", "warmup"), ("seed", "seed")):
        v = getattr(args, flag, None)
        if v is not None:
            over[fld] = v
    if args.beams:
        over["beams"] = tuple(args.beams)
    if args.methods:
        m = list(args.methods)
        if "base" not in m:
            m.insert(0, "base")
        over["methods"] = tuple(m)
    if getattr(args, "batch", None) is not None and getattr(args, "adapters", None) is None:
        over["adapters"] = args.batch  # every prompt its own adapter
    return replace(s, **over)
