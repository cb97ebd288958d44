"""`vlatune train`: one loop for every policy and dataset, through accelerate.

    vlatune train configs/demo/tiny.yaml data.path=data/synth_lerobot train.max_steps=2000
    accelerate launch -m vlatune train CONFIG ...        # DDP / FSDP / DeepSpeed via accelerate

The run folder (`train.output_dir`) holds `config.yaml` (resolved), `split.json` (train / val
episodes), `stats.json` (statistics of the training episodes), `metrics.jsonl` (one line per
`log_every` steps and per validation) and `checkpoint-<step>/` (see `checkpoint.py`).

- Batches are a function of the step number (`sampler.py`) and augmentation is seeded per
  (sample, epoch), so `train.resume=auto` continues bitwise-exactly from the latest complete
  checkpoint on CPU: same parameters as a run that was never interrupted.
- Mixed precision bf16/fp16 on GPUs through accelerate; CPU runs in fp32 (bf16 autocast on CPU
  is slower than fp32 on the machines we test on), said once in the log.
- The energy model (policy.energy) gets its own parameter group, lr and warm-up.
- Only the main process writes checkpoints, metrics and trackers; every process saves its own
  RNG state.
- Fault injection for tests: VLATUNE_FAULT=after_checkpoint:<step> or during_checkpoint:<step>
  SIGKILLs the process at that point.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vlatune.config.schema import Config
from vlatune.fsutil import write_json
from vlatune.train import checkpoint as ckpt
from vlatune.train.ema import EMA, load_trained_state, trained_state
from vlatune.train.sampler import StepBatchSampler
from vlatune.train.schedules import lr_multiplier

log = logging.getLogger("vlatune.train")
TRAIN_WEIGHTS = "train_weights.safetensors"  # raw parameters beside an averaged policy/ (EMA)


class TrainError(ValueError):
    pass


def _fault(stage: str, step: int) -> None:
    spec = os.environ.get("VLATUNE_FAULT", "")
    if spec == f"{stage}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


LISTED = ("reasoning", "flow_tokens")  # per-sample annotations, possibly absent: kept as lists


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    listed = {k: [s.pop(k, None) for s in samples] for k in LISTED if any(k in s for s in samples)}
    batch = torch.utils.data.default_collate(samples)
    batch.update(listed)
    return batch


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        from accelerate import Accelerator

        self.cfg = cfg
        t = cfg.train
        mp = t.mixed_precision
        cuda = torch.cuda.is_available()
        if mp != "no" and not cuda:
            mp = "no"
        self.accelerator = Accelerator(
            cpu=not cuda,
            mixed_precision=mp,
            gradient_accumulation_steps=t.grad_accum_steps,
            log_with=self._trackers() or None,
            project_dir=t.output_dir,
        )
        if t.mixed_precision != "no" and not cuda and self.is_main:
            log.info("no GPU: training in fp32 (train.mixed_precision=%s applies on GPUs)", mp)
        self.run_dir = Path(t.output_dir)
        self.ema: EMA | None = None
        self.show_progress = progress and self.is_main

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _trackers(self) -> list[str]:
        import importlib.util

        names = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio"}
        usable = []
        for name in self.cfg.train.trackers:
            if importlib.util.find_spec(names[name]) is None:
                log.warning("tracker %s is not installed (pip install %s); skipping it", name, name)
            else:
                usable.append(name)
        return usable

    # ------------------------------------------------------------------ set-up
    def _data(self, resumed_policy):
        from vlatune.data import open_dataset
        from vlatune.data.split import split_episodes
        from vlatune.data.stats import dataset_stats
        from vlatune.data.training import FrameDataset

        d = self.cfg.data
        if d.path is None:
            raise TrainError("data.path is not set: give the dataset folder (data.path=DIR)")
        path = Path(d.path)
        if not path.exists():
            raise TrainError(f"data.path {path} does not exist")
        reader = open_dataset(path, format=d.format)
        split_file = self.run_dir / "split.json"
        if split_file.is_file():
            split = json.loads(split_file.read_text())
        else:
            split = split_episodes(reader, d.val_fraction, seed=self.cfg.train.seed)
        if not split["train"]:
            raise TrainError(f"{path}: no training episodes after the validation split")
        stats_file = self.run_dir / "stats.json"
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text())
        else:
            stats = dataset_stats(reader, episodes=split["train"])
        reader.close()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(split_file, split)
            write_json(stats_file, stats)
        from vlatune.data.training import normalizers_from_stats

        policy = resumed_policy
        a_norm, s_norm = (
            normalizers_from_stats(d, stats)
            if policy is None
            else (policy.action_norm, policy.state_norm)
        )
        annotations = None
        if d.annotations:
            from vlatune.data.annotations import load_annotations

            annotations = load_annotations(d.annotations)
        kw = {"action_norm": a_norm, "state_norm": s_norm, "annotations": annotations}
        train_ds = FrameDataset.from_config(
            path, d, stats, episodes=split["train"], train=True, seed=self.cfg.train.seed, **kw
        )
        val_ds = (
            FrameDataset.from_config(path, d, stats, episodes=split["test"], train=False, **kw)
            if split["test"]
            else None
        )
        if policy is None:
            from vlatune.policies import build_policy

            policy = build_policy(self.cfg, stats, chunks=train_ds.action_chunks)
        backbone = policy.backbone
        if hasattr(backbone, "encode_texts") and self.cfg.policy.rdt.precompute_language:
            texts = train_ds.instructions() + (val_ds.instructions() if val_ds else [])
            n = backbone.encode_texts(texts)
            backbone.release_text_encoder()
            log.info(
                "language embeddings: %d instructions (%d encoded, the rest cached in %s); "
                "training without the text encoder",
                len(set(texts)),
                n,
                backbone.cache_dir,
            )
        return policy, train_ds, val_ds, split

    def _optimizer(self, policy):
        o = self.cfg.optim
        groups = policy.param_groups(o.lr, o.weight_decay, self.cfg.policy.energy.lr)
        if not groups:
            raise TrainError("no trainable parameters (check policy.freeze)")
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        main = lr_multiplier(
            o.schedule, self.cfg.train.max_steps, o.warmup_steps, o.decay_steps, o.decay_factor
        )
        energy_warmup = self.cfg.policy.energy.warmup_steps
        lambdas = [
            (lambda s, w=energy_warmup: min(1.0, (s + 1) / w) if w else 1.0)
            if g["name"] == "energy"
            else main
            for g in groups
        ]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return opt, sched

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, micro_step: int, model, optimizer, scheduler, epoch):
        acc = self.accelerator
        final = self.run_dir / f"checkpoint-{step}"
        tmp = self.run_dir / f".checkpoint-{step}.tmp"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_json(tmp / f"rng_rank{acc.process_index}.json", ckpt.rng_state())
        if self.is_main:
            policy = acc.unwrap_model(model)
            if self.ema is None:
                policy.save(tmp / "policy")
            else:  # deployed: the average; resumed from: the raw parameters
                from safetensors.torch import save_file

                with self.ema.averaged(policy):
                    policy.save(tmp / "policy")
                save_file(trained_state(policy), tmp / TRAIN_WEIGHTS)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        acc.wait_for_everyone()
        if self.is_main:
            _fault("during_checkpoint", step)
            state = {
                "step": step,
                "micro_step": micro_step,
                "epoch": epoch,
                "world_size": acc.num_processes,
                "scheduler": scheduler.state_dict(),
                "config": self.cfg.model_dump(mode="json"),
                "time": time.time(),
            }
            write_json(tmp / "trainer_state.json", state)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpt.prune(self.run_dir, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        _fault("after_checkpoint", step)
        return final

    def _resume_point(self):
        r = self.cfg.train.resume
        if r == "never":
            return None
        if r == "auto":
            return ckpt.find_latest(self.run_dir)
        path = Path(r)
        try:
            return path, ckpt.validate(path)
        except ValueError as e:
            raise TrainError(f"train.resume={r}: not a complete checkpoint ({e})") from None

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        from accelerate.utils import set_seed

        from vlatune.policies import VLAPolicy

        acc, t = self.accelerator, self.cfg.train
        set_seed(t.seed)
        resume = self._resume_point()
        policy = None
        if resume is not None:
            path, state = resume
            if state["world_size"] != acc.num_processes:
                raise TrainError(
                    f"{path} was written by {state['world_size']} processes, this run has "
                    f"{acc.num_processes}: exact resume needs the same number"
                )
            saved = Config.model_validate(state["config"])
            if saved.policy != self.cfg.policy or saved.data != self.cfg.data:
                raise TrainError(
                    f"{path}: the checkpoint's data/policy config differs from this run's; "
                    "use a new train.output_dir or train.resume=never"
                )
            policy = VLAPolicy.from_pretrained(path / "policy")
            policy.train()
        policy, train_ds, val_ds, split = self._data(policy)
        self.ema = None
        if t.ema_decay > 0:
            if acc.distributed_type.name in ("FSDP", "DEEPSPEED"):
                raise TrainError(
                    "train.ema_decay needs whole parameters in each process (plain or DDP "
                    f"training); this run shards them ({acc.distributed_type.name})"
                )
            if resume is None:
                self.ema = EMA(policy, t.ema_decay)
            else:  # policy/ holds the average; the raw parameters continue training
                from safetensors.torch import load_file

                raw = resume[0] / TRAIN_WEIGHTS
                if not raw.is_file():
                    raise TrainError(
                        f"{resume[0]} was saved without train.ema_decay (no {TRAIN_WEIGHTS}): "
                        "resume it with the same setting, or start a new train.output_dir"
                    )
                self.ema = EMA(policy, t.ema_decay, shadow=trained_state(policy))
                load_trained_state(policy, load_file(raw), raw)
        if self.cfg.train.gradient_checkpointing:
            what = policy.enable_gradient_checkpointing()
            log.info("gradient checkpointing: %s", what)
        optimizer, scheduler = self._optimizer(policy)
        step, micro = 0, 0
        if resume is not None:
            path, state = resume
            optimizer.load_state_dict(ckpt.load_optimizer_state(path))
            scheduler.load_state_dict(state["scheduler"])
            step, micro = state["step"], state["micro_step"]
            rng_file = path / f"rng_rank{acc.process_index}.json"
            ckpt.set_rng_state(json.loads(rng_file.read_text()))
            if self.is_main:
                self._truncate_metrics(step)
                log.info("resumed from %s (step %d)", path, step)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
            )
        model, optimizer = acc.prepare(policy, optimizer)
        if acc.log_with and self.is_main:
            acc.init_trackers(self.cfg.name, config=self.cfg.model_dump(mode="json"))

        d = self.cfg.data
        accum = t.grad_accum_steps
        sampler = StepBatchSampler(
            len(train_ds),
            d.batch_size,
            seed=t.seed,
            rank=acc.process_index,
            world=acc.num_processes,
            start=micro,
            stop=t.max_steps * accum,
        )
        loader = self._loader(train_ds, sampler)
        global_batch = d.batch_size * acc.num_processes * accum
        window: dict[str, list[float]] = {}
        t_start = time.perf_counter()
        t_window, n_window = t_start, 0
        last_saved = step
        bar = self._progress(step)
        model.train()
        grad_norm = None
        stopped_early = False
        for batch in loader:
            batch = self._batches_to_device(batch)
            with acc.accumulate(model):
                out = model(batch)
                acc.backward(out["loss"])
                if acc.sync_gradients and self.cfg.optim.max_grad_norm:
                    grad_norm = acc.clip_grad_norm_(
                        model.parameters(), self.cfg.optim.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            for k, v in out.items():
                window.setdefault(k, []).append(float(v.detach()))
            if not acc.sync_gradients:
                continue
            scheduler.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(model), step)
            step += 1
            n_window += 1
            epoch = sampler.epoch_of(micro)
            if step % t.log_every == 0 or step == t.max_steps:
                now = time.perf_counter()
                row = {
                    "step": step,
                    "epoch": round(epoch, 4),
                    "lr": scheduler.get_last_lr()[0],
                    **{k: float(np.mean(v)) for k, v in window.items()},
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "samples_per_s": round(n_window * global_batch / max(now - t_window, 1e-9), 2),
                    "memory_mb": round(_memory_mb(), 1),
                }
                if len(scheduler.get_last_lr()) > 2:
                    row["lr_energy"] = scheduler.get_last_lr()[-1]
                self._log(row)
                window, t_window, n_window = {}, now, 0
                if bar is not None:
                    bar[0].update(
                        bar[1],
                        completed=step,
                        loss=f"{row['loss']:.4f}",
                        lr=f"{row['lr']:.2e}",
                        sps=f"{row['samples_per_s']:.0f}",
                    )
            elif bar is not None:
                bar[0].update(bar[1], completed=step)
            if t.val_every and val_ds is not None and step % t.val_every == 0:
                self._validate(model, val_ds, step)
            if step % t.save_every == 0 and step < t.max_steps:
                self.save_checkpoint(step, micro, model, optimizer, scheduler, epoch)
                last_saved = step
            if t.max_minutes is not None and step < t.max_steps:
                if self.is_main and time.perf_counter() - t_start > 60 * t.max_minutes:
                    acc.set_trigger()
                if acc.check_trigger():
                    stopped_early = True
                    break
        if bar is not None:
            bar[0].stop()
        final = None
        if step > 0 and step != last_saved:
            final = self.save_checkpoint(
                step, micro, model, optimizer, scheduler, sampler.epoch_of(micro)
            )
        elif step > 0:
            final = self.run_dir / f"checkpoint-{step}"
        if acc.log_with:
            acc.end_training()
        wall = time.perf_counter() - t_start
        # what each process saw and ended with: different data, identical parameters (DDP)
        first = torch.tensor(sampler.batch(0), dtype=torch.long, device=acc.device)
        checksum = torch.tensor(
            [sum(float(p.detach().double().sum()) for p in model.parameters())],
            dtype=torch.float64,
            device=acc.device,
        )
        first_all = acc.gather(first[None]).cpu().tolist()
        checksums = acc.gather(checksum).cpu().tolist()
        summary = {
            "run_dir": str(self.run_dir),
            "steps": step,
            "stopped_by_time": stopped_early,
            "checkpoint": str(final) if final else None,
            "wall_s": round(wall, 1),
            "train_episodes": len(split["train"]),
            "val_episodes": len(split["test"]),
            "train_frames": len(train_ds),
            "processes": acc.num_processes,
            "first_batch_per_process": first_all,
            "param_checksum_per_process": checksums,
        }
        if self.is_main:
            write_json(self.run_dir / "train_summary.json", summary)
        return summary

    def _loader(self, ds, sampler):
        kwargs: dict[str, Any] = {}
        if self.cfg.data.num_workers > 0:
            kwargs = {"multiprocessing_context": "forkserver", "persistent_workers": False}
        return torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=_collate,
            pin_memory=torch.cuda.is_available(),
            # its own generator: a loader draws a seed when iterated, which must not consume
            # the global stream (dropout, noise) that a resumed run restores
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
            **kwargs,
        )

    def _batches_to_device(self, batch):
        dev = self.accelerator.device
        return {
            k: (
                v.to(dev)
                if torch.is_tensor(v)
                else {c: x.to(dev) for c, x in v.items()}
                if isinstance(v, dict)
                else v
            )
            for k, v in batch.items()
        }

    def _validate(self, model, val_ds, step: int) -> None:
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        policy = self.accelerator.unwrap_model(model)
        B = self.cfg.data.batch_size
        n_batches = min(self.cfg.train.val_batches, -(-len(val_ds) // B))
        sampler = StepBatchSampler(len(val_ds), B, seed=1, stop=n_batches)
        t0 = time.perf_counter()
        sums: dict[str, list[float]] = {}
        was = policy.training
        policy.eval()
        rng = torch.get_rng_state()  # validation must not shift the training random stream
        with torch.no_grad():
            for batch in self._loader(val_ds, sampler):
                out = policy(self._batches_to_device(batch))
                for k, v in out.items():
                    sums.setdefault(k, []).append(float(v))
                if time.perf_counter() - t0 > self.cfg.train.val_max_seconds:
                    break
        torch.set_rng_state(rng)
        policy.train(was)
        row = {"step": step, **{f"val_{k}": float(np.mean(v)) for k, v in sums.items()}}
        row["val_batches"] = len(next(iter(sums.values()), []))
        self._log(row)
        self.accelerator.wait_for_everyone()

    def _log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log(
                {k: v for k, v in row.items() if isinstance(v, int | float)}, step=row["step"]
            )

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows a killed run logged after the checkpoint it resumes from."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, path)

    def _progress(self, start: int):
        if not self.show_progress:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn(
                "loss {task.fields[loss]} lr {task.fields[lr]} {task.fields[sps]} samples/s"
            ),
        )
        task = p.add_task(
            "train", total=self.cfg.train.max_steps, completed=start, loss="-", lr="-", sps="-"
        )
        p.start()
        return p, task


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    return Trainer(cfg, progress=progress).run()
