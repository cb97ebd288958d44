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
- The trainer sees only the policy interface (`vlatune.policies.base`): `compute_loss`,
  `param_groups`, `save` and the `prepare` hook; the family comes from `policy.type`
  (`vlatune.policies.registry`). A parameter group with its own `warmup_steps` (the composed
  family's energy model) gets that warm-up instead of `optim.schedule`.
- Only the main process writes checkpoints, metrics and trackers; every process saves its own
  RNG state.
- Fault injection for tests: VLATUNE_FAULT=after_checkpoint:<step> or during_checkpoint:<step>
  SIGKILLs the process at that point.
"""

from __future__ import annotations

import json
import logging
import math
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


def _without_episodes(split: dict[str, Any], bad: list[int]) -> dict[str, Any]:
    """The split without the episodes validation found bad (listed under "skipped")."""
    if not bad:
        return split
    drop = set(bad)
    out = dict(split)
    out["train"] = [e for e in split["train"] if e not in drop]
    out["test"] = [e for e in split["test"] if e not in drop]
    out["skipped"] = sorted(drop | set(split.get("skipped", [])))
    return out


def _check_stats_finite(stats: dict[str, Any], source) -> None:
    """Normalisation statistics must be finite (validation makes NaN data impossible; a stats
    file edited or written by an older version could still hold NaN)."""
    for feature, s in stats.items():
        if not isinstance(s, dict):
            continue
        for name, v in s.items():
            arr = np.asarray(v, dtype=object)
            try:
                vals = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if arr.size and not np.isfinite(vals).all():
                raise TrainError(
                    f"{source}: key '{feature}.{name}': non-finite statistics (NaN or inf); "
                    "expected finite numbers: check the data with `vlatune data check` and "
                    "remove the stats file to recompute it"
                )


def _remove_created(run_dir: Path, before: set[Path] | None) -> None:
    """Remove what a refused run created: the whole run folder if it did not exist before,
    else the entries it added."""
    if before is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p not in before:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


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
    def _validate_data(self, reader, path: Path) -> list[int]:
        """The shared validation pass, before anything is written: cameras asked for exist,
        and no episode has a blocking problem (NaN / inf, shapes, lengths, channels, ...).
        Refuses with every problem listed, or, with data.skip_bad_episodes, returns the bad
        episodes (logged) for the split to leave out."""
        from vlatune.data.validate import validate_dataset

        d = self.cfg.data
        unknown = [c for c in d.cameras if c not in reader.info.cameras]
        if unknown:
            raise TrainError(
                f"{path}: key 'data.cameras': camera(s) {unknown} not in the dataset "
                f"(its cameras: {reader.info.cameras}); nothing was written"
            )
        report = validate_dataset(reader, images="sample")
        for p in report.warnings[:20]:
            if self.is_main:
                log.warning("data: %s", p)
        if not report.blocking:
            return []
        if not d.skip_bad_episodes or report.dataset_level:
            report.raise_if_blocking("training", "set data.skip_bad_episodes=true")
        bad = report.bad_episodes
        if self.is_main:
            log.warning(
                "data.skip_bad_episodes: leaving out %d of %d episode(s) %s:\n%s",
                len(bad),
                len(reader),
                bad,
                report.lines(report.blocking),
            )
        return bad

    def _data(self, resumed_policy):
        from vlatune.data import open_dataset
        from vlatune.data.split import held_out_warning, split_episodes
        from vlatune.data.stats import dataset_stats
        from vlatune.data.training import FrameDataset

        d = self.cfg.data
        if d.path is None:
            raise TrainError("data.path is not set: give the dataset folder (data.path=DIR)")
        path = Path(d.path)
        if not path.exists():
            raise TrainError(f"data.path {path} does not exist")
        reader = open_dataset(path, format=d.format)
        if self.is_main:
            how = "auto-detected" if d.format == "auto" else "data.format"
            log.info(
                "data: %s: %s (%s), %d episodes, %d frames",
                path,
                reader.info.format,
                how,
                reader.info.num_episodes,
                reader.info.num_frames,
            )
        bad = self._validate_data(reader, path)
        fingerprint = check_reused_data_files(self.run_dir, reader, path)
        split_file = self.run_dir / "split.json"
        if split_file.is_file():
            split = json.loads(split_file.read_text())
        else:
            split = split_episodes(reader, d.val_fraction, seed=self.cfg.train.seed)
            warning = held_out_warning(split, "data.val_fraction=0")
            if warning and self.is_main:
                log.warning("validation split: %s", warning)
        split = _without_episodes(split, bad)
        if not split["train"]:
            raise TrainError(f"{path}: no training episodes after the validation split")
        stats_file = self.run_dir / "stats.json"
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text())
        else:
            stats = dataset_stats(reader, episodes=split["train"])
        _check_stats_finite(stats, stats_file if stats_file.is_file() else path)
        reader.close()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(split_file, split)
            write_json(stats_file, stats)
            write_json(self.run_dir / FINGERPRINT_FILE, fingerprint)
        from vlatune.data.training import normalizers_from_stats

        policy = resumed_policy
        # the datasets' default chain (its normalised chunks fit a composed FAST tokenizer); the
        # policy's own processor replaces it below, so a resumed policy keeps its statistics
        a_norm, s_norm = normalizers_from_stats(d, stats)
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
            from vlatune.policies import registry

            try:
                policy = registry.build(self.cfg, stats, chunks=train_ds.action_chunks)
            except NotImplementedError as e:
                raise TrainError(str(e)) from None
        processor = getattr(policy, "processor", None)
        if processor is None:
            raise TrainError(
                f"policy.type '{self.cfg.policy.type}': {type(policy).__name__} has no "
                "`processor` (vlatune.policies.processor): the loader cannot prepare its inputs"
            )
        # the policy's own chain from here on, in the loader workers (training mode for the
        # training split): the same object `predict` runs at evaluation
        for ds in (train_ds, val_ds):
            if ds is not None:
                ds.use_processor(processor)
        prepare = getattr(policy, "prepare", None)  # optional hook of the policy interface
        if prepare is not None:
            line = prepare([train_ds, val_ds])
            if line and self.is_main:
                log.info("%s", line)
        return policy, train_ds, val_ds, split

    def _clip_gradients(self, acc, model, optimizer):
        """`optim.max_grad_norm` over the parameters; a parameter group with its own
        `max_grad_norm` (the energy model: its own optimiser in the seed) is clipped on its own
        and left out of the global norm. Returns the global norm before clipping (or None)."""
        own = [g for g in optimizer.param_groups if g.get("max_grad_norm")]
        for g in own:
            acc.clip_grad_norm_(g["params"], g["max_grad_norm"])
        limit = self.cfg.optim.max_grad_norm
        if not limit:
            return None
        if not own:
            return acc.clip_grad_norm_(model.parameters(), limit)
        mine = {id(p) for g in own for p in g["params"]}
        rest = [p for p in model.parameters() if id(p) not in mine]
        return acc.clip_grad_norm_(rest, limit)

    def _steps_from_epochs(self, frames: int) -> None:
        """`train.max_epochs` -> `train.max_steps` (the seed recipes count epochs); a
        `train.max_steps` given as well and smaller wins (a short test run of a recipe)."""
        t = self.cfg.train
        if t.max_epochs is None:
            return
        world = self.accelerator.num_processes
        global_batch = self.cfg.data.batch_size * world * t.grad_accum_steps
        steps = max(1, math.ceil(t.max_epochs * frames / global_batch))
        if "max_steps" in t.model_fields_set and t.max_steps < steps:
            how = f"train.max_steps={t.max_steps} (smaller than {t.max_epochs:g} epochs = {steps})"
            steps = t.max_steps
        else:
            how = f"train.max_epochs={t.max_epochs:g} x {frames} frames / batch {global_batch}"
        t.max_steps = steps
        if self.is_main:
            log.info("training for %d steps: %s", steps, how)

    def _optimizer(self, policy):
        o = self.cfg.optim
        try:
            groups = policy.param_groups(o)
        except ValueError as e:  # a family refusing (everything frozen)
            raise TrainError(f"policy.param_groups: {e}") from None
        if not groups:
            raise TrainError("no trainable parameters (check policy.freeze)")
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        main = lr_multiplier(
            o.schedule, self.cfg.train.max_steps, o.warmup_steps, o.decay_steps, o.decay_factor
        )
        lambdas = [  # a group with its own warm-up (energy model): linear, then constant
            (lambda s, w=g["warmup_steps"]: min(1.0, (s + 1) / w) if w else 1.0)
            if "warmup_steps" in g
            else main
            for g in groups
        ]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return opt, sched

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, micro_step: int, model, optimizer, scheduler, epoch):
        """Written under `.checkpoint-<step>.tmp/` and renamed when complete; on any failure
        (a full disk) the temporary folder is removed and the error names the file."""
        final = self.run_dir / f"checkpoint-{step}"
        tmp = self.run_dir / f".checkpoint-{step}.tmp"
        try:
            return self._save_checkpoint(
                step, micro_step, model, optimizer, scheduler, epoch, final, tmp
            )
        except Exception as e:
            from vlatune.fsutil import disk_full_error, with_final_name

            full = disk_full_error(e, tmp) if not isinstance(e, OSError) else None
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise with_final_name(e, tmp, final) from None
            if full is not None:
                raise with_final_name(full, tmp, final) from e
            raise
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_checkpoint(
        self, step: int, micro_step: int, model, optimizer, scheduler, epoch, final, tmp
    ):
        acc = self.accelerator
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            ckpt.mark_owner(tmp)
        acc.wait_for_everyone()
        write_json(tmp / f"rng_rank{acc.process_index}.json", ckpt.rng_state())
        if self.is_main:
            policy = acc.unwrap_model(model).policy
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
        """Train; a run refused before its first step (bad data, unknown camera, config
        mismatch) leaves nothing behind: what it created in the run folder is removed."""
        before = set(self.run_dir.iterdir()) if self.run_dir.is_dir() else None
        if self.is_main:
            ckpt.clean_stale(self.run_dir)
        self._started = False
        try:
            return self._run()
        except BaseException:
            if self.is_main and not self._started:
                _remove_created(self.run_dir, before)
            raise

    def _run(self) -> dict[str, Any]:
        from accelerate.utils import set_seed

        from vlatune.policies import registry
        from vlatune.policies.base import LossModule

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
            family = registry.get(self.cfg.policy.type)
            policy = registry.piece(family, "load")(path / "policy")
            policy.train()
        policy, train_ds, val_ds, split = self._data(policy)
        self._steps_from_epochs(len(train_ds))
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
            enable = getattr(policy, "enable_gradient_checkpointing", None)
            if enable is None:
                raise TrainError(
                    f"train.gradient_checkpointing: policy.type '{self.cfg.policy.type}' has no "
                    "gradient checkpointing; set train.gradient_checkpointing=false"
                )
            log.info("gradient checkpointing: %s", enable())
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
        elif self.is_main:  # a fresh start: rows (or a torn line) of a run killed before any
            self._truncate_metrics(0)  # checkpoint would be followed by this run's rows
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False)
            )
        model, optimizer = acc.prepare(LossModule(policy), optimizer)  # forward = compute_loss
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
        self._started = True
        for batch in loader:
            batch = self._batches_to_device(batch)
            with acc.accumulate(model):
                loss, metrics = model(batch)
                self._check_finite_loss(loss, step + 1, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = self._clip_gradients(acc, model, optimizer)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            for k, v in metrics.items():
                window.setdefault(k, []).append(float(v))
            if not acc.sync_gradients:
                continue
            scheduler.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(model).policy, step)
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
                for g in optimizer.param_groups:  # groups with their own warm-up (lr_energy)
                    if "warmup_steps" in g:
                        row[f"lr_{g.get('name', 'group')}"] = g["lr"]
                self._log(row)
                window, t_window, n_window = {}, now, 0
                if bar is not None:
                    bar.set(
                        step,
                        loss=f"{row['loss']:.4f}",
                        lr=f"{row['lr']:.2e}",
                        samples_per_s=f"{row['samples_per_s']:.0f}",
                    )
            elif bar is not None:
                bar.set(step)
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
            bar.close()
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

    def _check_finite_loss(self, loss, step: int, batch) -> None:
        """Stop (before the update, so no weight turns NaN) when the loss is NaN or inf,
        naming the step and the batch's episodes; agreed across processes."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(bad)], device=self.accelerator.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            return
        eps = batch.get("episode")
        eps = sorted({int(e) for e in eps.tolist()}) if torch.is_tensor(eps) else eps
        frames = batch.get("frame")
        frames = frames.tolist() if torch.is_tensor(frames) else frames
        raise TrainError(
            f"step {step}: the loss is {float(loss.detach()):g} (not finite) on a batch of "
            f"episodes {eps} (frames {frames}); training stopped before the update, the last "
            f"checkpoint in {self.run_dir} is intact. Check these episodes with `vlatune data "
            "check`, or lower optim.lr / set optim.max_grad_norm if the data is fine"
        )

    def _loader(self, ds, sampler):
        from vlatune.data.training import make_loader

        return make_loader(
            ds,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
            batch_sampler=sampler,
        )

    def _batches_to_device(self, batch):
        from vlatune.policies.processor import batch_to_device

        return batch_to_device(batch, self.accelerator.device)

    def _validate(self, model, val_ds, step: int) -> None:
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return
        policy = self.accelerator.unwrap_model(model).policy
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
                _, metrics = policy.compute_loss(self._batches_to_device(batch))
                for k, v in metrics.items():
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
        from vlatune.fsutil import remove_path, tmp_path, with_final_name

        tmp = tmp_path(path)  # fsutil's name: a stale one is cleaned at the next start
        try:
            tmp.write_text("".join(x + "\n" for x in keep))
            os.replace(tmp, path)
        except OSError as e:
            remove_path(tmp)
            raise with_final_name(e, tmp, path) from None

    def _progress(self, start: int):
        """Training progress (vlatune.progress): a bar with the time left on a terminal; when the
        output is a log file or a pipe, a plain line every few seconds with the step, the loss
        and the time left at the measured step rate."""
        if not self.show_progress:
            return None
        from vlatune.progress import Progress

        return Progress(total=self.cfg.train.max_steps, desc="train", start=start, unit="steps")


FINGERPRINT_FILE = "data_fingerprint.json"  # which dataset split.json / stats.json came from
DATA_SUFFIXES = (".hdf5", ".h5", ".parquet", ".mp4", ".jsonl")


def data_fingerprint(reader, path: Path) -> dict[str, Any]:
    """A cheap identity of a dataset: its path, format, episode count and lengths,
    instructions, and the names and sizes of its data files (HDF5, parquet, mp4, jsonl; a
    split or stats file a user writes next to the data does not change it). No data is read."""
    import hashlib

    n = len(reader)
    lengths = [int(reader.episode_length(i)) for i in range(n)]
    content = hashlib.sha256(
        json.dumps([lengths, [reader.instruction(i) for i in range(n)]]).encode()
    ).hexdigest()
    if path.is_dir():
        files = sorted(
            (str(p.relative_to(path)), p.stat().st_size)
            for p in path.rglob("*")
            if p.suffix in DATA_SUFFIXES
            and p.is_file()
            and not any(x.startswith(".") for x in p.relative_to(path).parts)
        )
    else:
        files = [(path.name, path.stat().st_size)]
    return {
        "path": str(path.resolve()),
        "format": reader.info.format,
        "episodes": n,
        "frames": sum(lengths),
        "episodes_sha256": content,
        "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
    }


def check_reused_data_files(run_dir: Path, reader, path: Path) -> dict[str, Any]:
    """`split.json` / `stats.json` of an earlier run in `run_dir` are reused only when they were
    made from the same dataset (content fingerprint; a moved copy with the same content is
    accepted with a warning); otherwise a TrainError names the files to delete. Returns the
    dataset's fingerprint (written beside them)."""
    fingerprint = data_fingerprint(reader, path)
    reused = [f for f in ("split.json", "stats.json") if (run_dir / f).is_file()]
    if not reused:
        return fingerprint
    saved_file = run_dir / FINGERPRINT_FILE
    if not saved_file.is_file():
        log.warning(
            "%s: %s reused without a record of the dataset they came from (a run of an older "
            "vlatune); cannot check they belong to %s. Delete them to recompute.",
            run_dir,
            " and ".join(reused),
            path,
        )
        return fingerprint
    saved = json.loads(saved_file.read_text())
    differ = [k for k in fingerprint if k != "path" and saved.get(k) != fingerprint[k]]
    if differ:
        shown = ", ".join(
            f"{k} {saved.get(k)} then, {fingerprint[k]} now"
            for k in differ
            if not k.endswith("sha256")
        ) or ", ".join(differ)
        files = " and ".join(str(run_dir / f) for f in reused)
        raise TrainError(
            f"{files} were made from another dataset ({saved.get('path')}: {shown}) than "
            f"data.path {path}; delete {files} (and the run's checkpoints) to recompute them "
            "from this data, or use a new train.output_dir"
        )
    if saved.get("path") != fingerprint["path"]:
        log.warning(
            "%s were made from %s; data.path %s has the same content (moved or copied): reused",
            " and ".join(reused),
            saved.get("path"),
            path,
        )
    return fingerprint


def train(cfg: Config, progress: bool = True) -> dict[str, Any]:
    return Trainer(cfg, progress=progress).run()
