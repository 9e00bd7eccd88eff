"""The training loop of `tspeft-rt train`: one process or many under torchrun (DDP or FSDP2: distributed.py).

    tspeft-rt train configs/ts_lora_arc_easy.yaml
    tspeft-rt train configs/ts_lora_arc_easy.yaml --resume
    torchrun --nproc-per-node 2 -m tspeft_rt.cli train configs/ts_lora_arc_easy.yaml

One optimizer step consumes `batch_size` examples over all processes (each process takes its slice
of the same global batch, in `micro_batch_size` pieces). The loss is the sum of token losses on the
completions divided by the global number of completion tokens, so one process with gradient
accumulation and N processes take exactly the same step. Data order and dropout are pure functions of
(seed, step): a resumed run reads the same batches and draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from tspeft_rt.adapter import Adapter, load_adapter, load_weights
from tspeft_rt.checkpoint import append_log, atomic_write_text, latest_checkpoint, load_checkpoint, read_log, \
    rewrite_log, save_checkpoint
from tspeft_rt.config import TrainConfig
from tspeft_rt.data import IGNORE, batch_indices, collate, tokenize, training_examples
from tspeft_rt.distributed import average_gradients, seed_step, setup_distributed, shard_base
from tspeft_rt.errors import CheckpointError, ConfigError, TrainingDiverged
from tspeft_rt.evaluate import evaluate_tasks
from tspeft_rt.inject import AdapterSpec, adapted_layers, adapter_parameters, adapter_state_dict, \
    count_parameters, inject_adapters, load_base_model
from tspeft_rt.sparsity import ThresholdController


def adopt_adapter_shape(cfg: TrainConfig, adapter: Adapter) -> TrainConfig:
    """`cfg` with the modules, ranks and scaling of the adapter it starts from (`init_adapter`)."""
    if adapter.dora != cfg.dora:
        raise ConfigError(f"init_adapter {cfg.init_adapter!r} holds a {'DoRA' if adapter.dora else 'LoRA'} adapter, "
                          f"method {cfg.method!r} trains {'DoRA' if cfg.dora else 'LoRA'}: choose "
                          f"{'ts-dora or dora' if adapter.dora else 'ts-lora or lora'}", "init_adapter")
    c = adapter.config
    return replace(cfg, target_modules=sorted(adapter.modules), rank=c["r"], alpha=float(c["lora_alpha"]),
                   rank_pattern=c.get("rank_pattern") or {}, alpha_pattern=c.get("alpha_pattern") or {},
                   use_rslora=bool(c.get("use_rslora")))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist = setup_distributed()
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {self.dist.world} processes")
        self.out = Path(cfg.output_dir)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)  # the adapters' initial weights: the same on every process
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.model, self.tokenizer = load_base_model(cfg.model, dtype)
        init = load_adapter(cfg.init_adapter) if cfg.init_adapter else None
        if init is not None:
            cfg = self.cfg = adopt_adapter_shape(cfg, init)
        self.modules = inject_adapters(self.model, AdapterSpec.from_config(cfg))
        if init is not None:
            load_weights(adapted_layers(self.model), init, self.model.config)
        self.layers = adapted_layers(self.model)
        weights, taus = adapter_parameters(self.model)
        self.fsdp = cfg.distributed == "fsdp" and self.dist.world > 1
        if self.fsdp:
            shard_base(self.model, weights + taus, self.device)
        else:
            self.model.to(self.device)
        for w in weights:
            w.requires_grad_(cfg.train_weights)
        self.weights, self.adapter_params = weights, weights + taus
        self.optimizer = torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s))
        gates = {n: l.token_gate for n, l in self.layers.items() if l.token_gate is not None}
        self.controller = ThresholdController(gates, cfg, log=self.log, group=self.dist.host_group)
        self.examples = [tokenize(self.tokenizer, ex, cfg.prompt_format, cfg.max_seq_len)
                         for ex in training_examples(cfg)]
        self.start_step = 0
        self.gate_keep: dict[str, float] = {}
        self._prepare_output(resume)
        self.tensorboard = _tensorboard(self.out) if self.dist.main else None
        self.ddp = None if self.dist.world == 1 or self.fsdp else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        trainable, total = count_parameters(self.model)
        if init is not None:
            self.log(f"init_adapter {cfg.init_adapter}: {init.kind}, rank {cfg.rank}, weights loaded"
                     + ("" if cfg.train_weights else " and frozen (train_weights false: only the thresholds learn)"))
        self.log(f"{cfg.method}: {len(self.modules)} modules adapted, trainable parameters {trainable:,} "
                 f"of {total:,} ({100 * trainable / total:.2f}%); {len(self.examples):,} training examples")

    def log(self, msg: str) -> None:
        if self.dist.main:
            tqdm.write(msg)

    # ---- output folder, resume -------------------------------------------------------------
    def _prepare_output(self, resume: bool) -> None:
        ckpt = latest_checkpoint(self.out) if self.out.exists() else None
        if ckpt is None:
            if resume:
                self.log(f"--resume: no checkpoint under {self.out}; starting from step 0")
        elif not resume:
            raise ConfigError(f"output_dir {str(self.out)!r} already holds checkpoints; pass --resume to continue "
                              "that run, or choose another output_dir")
        else:
            self._resume(ckpt)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            for name in ("metrics.jsonl", "gate_stats.jsonl"):
                self._truncate_log(self.out / name)

    def _truncate_log(self, path: Path) -> None:
        """Drop a torn last line and the records past the resumed step (this run writes them again)."""
        if not path.exists():
            return
        log = read_log(path)
        if log.torn:
            self.log(f"{path}: left out its last line, cut short when the run was killed")
        rewrite_log(path, [r for r in log.records if r["step"] <= self.start_step])

    def _resume(self, ckpt: Path) -> None:
        adapter, state, meta = load_checkpoint(ckpt)
        saved = meta["config"]
        mine = self.cfg.adapter_signature()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume from {str(ckpt)!r}: incompatible config ({lines})")
        own = adapter_state_dict(self.model)
        if set(own) != set(adapter) or any(own[k].shape != adapter[k].shape for k in own):
            raise CheckpointError(f"cannot resume from {str(ckpt)!r}: its adapter tensors do not match this model")
        with torch.no_grad():
            for name, t in self.model.named_parameters():
                if name in adapter:
                    t.copy_(adapter[name])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.controller.load_state_dict(state["controller"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what a damaged or foreign state raises
            raise CheckpointError(f"{ckpt / 'trainer.pt'}: not a trainer state of this run "
                                  f"({type(e).__name__}: {e})") from None
        self.start_step = meta["step"]
        self.gate_keep = meta.get("keep_rates", {})
        self.log(f"resumed from {ckpt} at step {self.start_step}")

    def save(self, step: int) -> None:
        if self.dist.main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "controller": self.controller.state_dict()}
            meta = {"step": step, "config": self.cfg.to_dict(), "keep_rates": self.gate_keep,
                    "modules": self.modules}
            save_checkpoint(self.out, step, adapter_state_dict(self.model), state, meta, self.cfg.keep_checkpoints)
        if self.dist.world > 1:
            dist.barrier()

    # ---- one optimizer step ----------------------------------------------------------------
    def _micro_batches(self, step: int) -> tuple[list[dict], int]:
        cfg, d = self.cfg, self.dist
        idx = batch_indices(len(self.examples), cfg.seed, step, cfg.batch_size)
        per_rank = cfg.batch_size // d.world
        mine = idx[d.rank * per_rank : (d.rank + 1) * per_rank]
        targets = sum(sum(1 for y in self.examples[i][1][1:] if y != IGNORE) for i in idx)
        pad = self.tokenizer.pad_token_id
        batches = [collate([self.examples[i] for i in mine[j : j + cfg.micro_batch_size]], pad)
                   for j in range(0, len(mine), cfg.micro_batch_size)]
        return batches, targets

    def train_step(self, step: int) -> dict:
        batches, global_targets = self._micro_batches(step)
        seed_step(self.cfg.seed, step, self.dist.rank)
        net = self.ddp or self.model
        ctx = next(iter(self.layers.values())).token_gate.context if self.controller.gates else None
        if ctx is not None:
            ctx.collect_ratios = self.controller.wants_ratios(step) or (step + 1) % self.cfg.log_every == 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for j, b in enumerate(batches):
            b = {k: v.to(self.device) for k, v in b.items()}
            sync = j == len(batches) - 1 or self.ddp is None
            with nullcontext() if sync else self.ddp.no_sync():
                logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE, reduction="sum")
                (token_loss * self.dist.world / global_targets).backward()
            loss_sum += token_loss.detach().double().cpu()
            tokens += int(b["attention_mask"].sum())
        if self.fsdp:
            average_gradients(self.adapter_params, self.dist.world)
        if self.dist.world > 1:
            dist.all_reduce(loss_sum, group=self.dist.host_group)
        loss = float(loss_sum) / global_targets
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {step + 1}; stopped without saving, the last good "
                                   f"checkpoint under {self.out / 'checkpoints'} is kept")
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.weights, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        gate = self.controller.step(step)
        return {"loss": loss, "tokens": tokens * self.dist.world, **gate}

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not (cfg.progress and self.dist.main),
                   desc="train", dynamic_ncols=True)
        t0, tokens_window = time.perf_counter(), 0
        result: dict = {}
        for step in range(self.start_step, cfg.steps):
            m = self.train_step(step)
            tokens_window += m["tokens"]
            done = step + 1
            postfix = {"loss": f"{m['loss']:.3f}"}
            if "skip" in m:
                postfix["skip"] = f"{m['skip']:.2f}"
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t0
                record = {"step": done, "loss": m["loss"], "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens_window / elapsed, **{k: v for k, v in m.items() if k != "loss"}}
                self._log_gates(done)
                if self.gate_keep:
                    record["skip_window"] = 1 - sum(self.gate_keep.values()) / len(self.gate_keep)
                self._write("metrics.jsonl", record)
                postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
                t0, tokens_window = time.perf_counter(), 0
            bar.set_postfix(postfix)
            bar.update(1)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                self.evaluate(done)
            if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                self.save(done)
        bar.close()
        result = {"steps": cfg.steps, "method": cfg.method}
        if self.gate_keep:
            result["train_skip"] = 1 - sum(self.gate_keep.values()) / len(self.gate_keep)
        if cfg.eval_examples > 0:
            result.update(self.evaluate(cfg.steps))
        if self.dist.main:
            atomic_write_text(self.out / "results.json", json.dumps(result, indent=1))
        return result

    def _log_gates(self, step: int) -> None:
        if not self.controller.gates:
            return
        self.gate_keep = self.controller.take_window()
        modules = {}
        for name, keep in self.gate_keep.items():
            modules[name] = {"tau": self.controller.gates[name].tau.item(), "keep": keep,
                             **self.controller.last_quantiles.get(name, {})}
        self._write("gate_stats.jsonl", {"step": step, "modules": modules})

    def evaluate(self, step: int) -> dict:
        """Validation accuracy and the skip rate the gates take on the validation tokens. Every process
        evaluates (under FSDP each forward gathers the weights from all of them); rank 0 writes."""
        for g in self.controller.gates.values():
            g.reset_stats()
        tasks = self.cfg.eval_tasks or self.cfg.tasks
        acc = evaluate_tasks(self.model, self.tokenizer, tasks, self.cfg.eval_examples, self.cfg.eval_batch_size)
        out: dict = {"eval": acc}
        stats = [g.reset_stats() for g in self.controller.gates.values()]
        if stats:
            out["eval_skip"] = 1 - sum(s.kept / max(1.0, s.valid) for s in stats) / len(stats)
        self._write("metrics.jsonl", {"step": step, **out})
        self.log(f"step {step}: eval " + ", ".join(f"{t} {r['acc']:.3f}" for t, r in acc.items())
                 + (f", eval skip {out['eval_skip']:.3f}" if "eval_skip" in out else ""))
        return out

    def _write(self, name: str, record: dict) -> None:
        if self.dist.main:
            append_log(self.out / name, record)
        if self.tensorboard is not None and name == "metrics.jsonl":
            for key, value in _flatten(record).items():
                self.tensorboard.add_scalar(key, value, record["step"])


def _tensorboard(out: Path):
    """A TensorBoard writer into <output_dir>/tensorboard when the package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and key != "step":
            out[prefix + key] = float(value)
    return out


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    trainer = None
    try:
        trainer = Trainer(cfg, resume)
        return trainer.fit()
    finally:
        if trainer is not None and trainer.tensorboard is not None:
            trainer.tensorboard.close()
        if dist.is_initialized():
            dist.destroy_process_group()
