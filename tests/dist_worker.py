"""Two-rank CPU training scenarios (gloo), run by tests/test_training_distributed.py as

    torchrun --nproc_per_node=2 tests/dist_worker.py OUT_DIR SCENARIO [SCENARIO ...]

One process group serves every scenario (starting torchrun costs most of the time). Each
scenario writes OUT_DIR/<scenario>.rank<r>.json with what it measured (or the error it hit);
the pytest side asserts on those files. Scenarios:
  ddp, ddp_unused   DDP without / with find_unused_parameters: 3 AdamW steps (weight decay on) on
                    rank-specific batches; parameters identical across ranks and equal to one
                    process training on the mean of both ranks' losses; another loaded adapter
                    untouched.
  fsdp1, fsdp2      FSDP1 (use_orig_params) / FSDP2 (fully_shard): same training; save_pretrained
                    (FSDP1: from a gathered full state dict; FSDP2: gathering its DTensors) loads
                    back with MiLoRAModel.from_pretrained to the trained model's logits.
  trainer           MiLoRATrainer under torchrun with default arguments (DDP): ranks agree, the
                    checkpoint holds only adapter files and loads to the trained model's logits.
  trainer_several   MiLoRATrainer, two adapters trained at once (prompt- and token-routed),
                    gradient accumulation 2 on each rank: the first step's gradient (each
                    adapter's tokens counted over both micro-batches and both ranks) equals one
                    process's gradient on the whole global batch.

FSDP through Trainer (TrainingArguments(fsdp=...), or ACCELERATE_USE_FSDP=true) cannot run on
CPU: accelerate 1.15 enables its FSDP plugin only for GPU-like device types (MULTI_GPU, NPU,
XPU, ...), not MULTI_CPU, and silently falls back to DDP (Trainer.is_fsdp_enabled False); a
model sharded by hand with fully_shard and handed to Trainer then fails in accelerate's DDP
wrap ("This operation would remove or reshape sharded dimension 0"). So no scenario for it here.
"""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)
STEPS = 3


def _batch(seed, B=2, L=9, prompt=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def _setup(seed=0):
    from milora import MiLoRAConfig
    from milora_test_utils import milora_model, randomize_adapter
    model, base_copy = milora_model(config=MiLoRAConfig(r=4, alpha=8, top_k=3, load_balance_coef=0.1), randomize=False,
                                    seed=seed)
    model.add_adapter("other", MiLoRAConfig(r=2, alpha=4))
    randomize_adapter(model, "other", 7)
    model.set_adapter("default")
    model.train()
    return model, base_copy


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _gathered_equal(tensors):
    """True when every rank holds bit-identical tensors."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(1, dtype=torch.float64)
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out[1:])


def _other_logits(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=["other"] * ids.shape[0]).logits
    model.train()
    return out


def _reference(world):
    """One process: the same steps on the mean of every rank's loss (a model built like _setup's)."""
    ref, _ = _setup()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(STEPS):
        loss = sum(ref(input_ids=_batch(r)[0], labels=_batch(r)[1]).loss for r in range(world)) / world
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _trainable(ref)


def _train(wrapped, rank):
    ids, labels = _batch(rank)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(STEPS):
        out = wrapped(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


def scenario_ddp(rank, world, out_dir, find_unused):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model, _ = _setup()
    probe = _batch(100)[0]
    other_before = _other_logits(model, probe)
    ref = _reference(world)
    names = sorted(_trainable(model))
    ddp = DDP(model, find_unused_parameters=find_unused)
    losses = _train(ddp, rank)
    got = _trainable(model)
    out = ddp(input_ids=probe)
    return {
        "losses": losses,
        "trainable_names": names,
        "ranks_identical": _gathered_equal([got[n] for n in names]),
        "max_diff_vs_single_process": max(float((got[n] - ref[n]).abs().max()) for n in names),
        "other_adapter_max_change": float((_other_logits(model, probe) - other_before).abs().max()),
        "aux_loss_field": "aux_loss" in getattr(type(out), "__dataclass_fields__", {}),
    }


def _check_saved(model, directory, probe):
    """Rank 0: the saved adapter loads into a fresh base model with the trained model's logits."""
    from milora import MiLoRAModel
    from milora_test_utils import tiny_model
    loaded = MiLoRAModel.from_pretrained(tiny_model(seed=0), directory)
    with torch.no_grad():
        want = model(input_ids=probe).logits
        got = loaded(input_ids=probe).logits
    return float((got - want).abs().max())


def scenario_fsdp(rank, world, out_dir, version):
    model, _ = _setup()
    probe = _batch(100)[0]
    ref = _reference(world)
    names = sorted(_trainable(model))
    if version == 1:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    losses = _train(wrapped, rank)
    directory = os.path.join(out_dir, f"fsdp{version}_adapter")
    if version == 1:
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            sd = wrapped.state_dict()
        got = {n: sd[n] for n in names} if rank == 0 else {}
        if rank == 0:
            model.save_pretrained(directory, state_dict=sd)
        wrapped.eval()
    else:
        model.save_pretrained(directory, is_main_process=rank == 0)  # gathers the DTensors (every rank calls)
        from torch.distributed.tensor import DTensor
        got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
               for n, p in model.named_parameters() if n in names}
        model.eval()
    dist.barrier()
    res = {"losses": losses, "trainable_names": names}
    if rank == 0:
        res["max_diff_vs_single_process"] = max(float((got[n] - ref[n]).abs().max()) for n in names)
    # every rank runs the forward (FSDP's collectives); rank 0 compares with the saved files
    with torch.no_grad():
        want = wrapped(input_ids=probe).logits
    if rank == 0:
        from milora import MiLoRAModel
        from milora_test_utils import tiny_model
        loaded = MiLoRAModel.from_pretrained(tiny_model(seed=0), directory)
        with torch.no_grad():
            res["saved_vs_trained_logits"] = float((loaded(input_ids=probe).logits - want).abs().max())
    return res


def scenario_trainer(rank, world, out_dir):
    from transformers import TrainingArguments
    from milora.training import MiLoRADataCollator, MiLoRATrainer
    model, _ = _setup()
    data = []
    for i in range(16):
        ids, labels = _batch(1000 + i, B=1, L=7 + i % 3)
        data.append({"input_ids": ids[0].tolist(), "labels": labels[0].tolist()})
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer_out"), per_device_train_batch_size=2,
                             max_steps=3, save_steps=3, report_to=[], use_cpu=True, logging_steps=1,
                             learning_rate=1e-2, disable_tqdm=True, seed=0)
    trainer = MiLoRATrainer(model=model, args=args, train_dataset=data, data_collator=MiLoRADataCollator())
    trainer.train()
    names = sorted(_trainable(model))
    got = _trainable(model)
    ckpt = os.path.join(args.output_dir, "checkpoint-3")
    res = {"ranks_identical": _gathered_equal([got[n] for n in names]), "trainable_names": names,
           "log": [h.get("loss") for h in trainer.state.log_history if "loss" in h]}
    if rank == 0:
        res["checkpoint_files"] = sorted(os.listdir(ckpt))
        model.eval()
        res["saved_vs_trained_logits"] = _check_saved(model, ckpt, _batch(100)[0])
    return res


def _several_model():
    from milora import MiLoRAConfig
    from milora_test_utils import milora_model, randomize_adapter
    # load_balance_coef 0: a Switch loss is not additive over ranks / micro-batches, the LM loss is
    model, _ = milora_model(config=MiLoRAConfig(r=4, alpha=8, top_k=3, load_balance_coef=0.0), seed=0)
    model.add_adapter("other", MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=2, top_k=1,
                                            load_balance_coef=0.0))
    randomize_adapter(model, "other", 7)
    model.set_trainable_adapters(["default", "other"])
    model.train()
    return model


def scenario_trainer_several(rank, world, out_dir):
    from transformers import TrainerCallback, TrainingArguments
    from milora.training import MiLoRADataCollator, MiLoRATrainer
    names = ["default", "other", "default", "default"]  # the ranks' micro-batches hold different counts
    ids, labels = _batch(500, B=4, L=9)
    for r in range(4):
        labels[r, : 2 + 2 * r] = -100
    data = [{"input_ids": ids[r].tolist(), "labels": labels[r].tolist(), "adapter_names": names[r]} for r in range(4)]
    model = _several_model()
    seen = {}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    args = TrainingArguments(output_dir=os.path.join(out_dir, "several_out"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0, report_to=[],
                             use_cpu=True, learning_rate=1e-2, disable_tqdm=True, save_strategy="no", seed=0)
    MiLoRATrainer(model=model, args=args, train_dataset=data, data_collator=MiLoRADataCollator(),
                  callbacks=[Grab()]).train()
    ref = _several_model()
    ref(input_ids=ids, labels=labels, adapter_names=names).loss.backward()  # one process, the global batch
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    keys = sorted(want)
    return {"same_names": sorted(seen) == keys, "ranks_identical": _gathered_equal([seen[n] for n in keys]),
            "max_diff_vs_global_batch": max(float((seen[n] - want[n]).abs().max()) for n in keys),
            "max_grad": max(float(want[n].abs().max()) for n in keys)}


SCENARIOS = {
    "ddp": lambda r, w, o: scenario_ddp(r, w, o, find_unused=False),
    "ddp_unused": lambda r, w, o: scenario_ddp(r, w, o, find_unused=True),
    "fsdp1": lambda r, w, o: scenario_fsdp(r, w, o, 1),
    "fsdp2": lambda r, w, o: scenario_fsdp(r, w, o, 2),
    "trainer": scenario_trainer,
    "trainer_several": scenario_trainer_several,
}


def main():
    out_dir, names = sys.argv[1], sys.argv[2:]
    import datetime
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in names:
        try:
            res = SCENARIOS[name](rank, world, out_dir)
        except Exception:  # recorded for the test to show; the next scenario still runs
            res = {"error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
