"""What a training loop runs on: the resumable data order, the non-finite-loss stop, SIGTERM, pre-flight checks of
the output folder and the chunk size, the running validation loss, rank agreement and the distributed teardown."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic_io import write_json
from .checkpointing import list_checkpoints, save_checkpoint, start_or_resume
from .options import jsonable

logger = logging.getLogger("actprior.training")


class NonFiniteLossError(RuntimeError):
    """Training stopped because a batch gave a NaN or inf loss (before the optimizer stepped on it)."""


def check_finite_loss(loss: torch.Tensor, step: int, batch: dict, output_dir: str) -> None:
    """Stop training at once when ``loss`` is not finite, naming the step and the batch's windows (embodiment,
    episode, frame; those whose actions or history are themselves non-finite or huge first). Called before
    ``backward``, so no NaN reaches the weights and the checkpoints already on disk stay the latest good ones."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    emb = batch.get("embodiment") or []
    eps = batch.get("episode_index")
    frames = batch.get("frame_index")
    n = len(emb)
    suspects = []
    for key in ("actions", "history", "state"):
        x = batch.get(key)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2:
            flat = x.detach().reshape(x.shape[0], -1).float()
            bad = (~torch.isfinite(flat)).any(1) | (flat.abs().amax(1) > 1e6)
            suspects += [(key, int(i)) for i in torch.nonzero(bad).flatten().tolist()]

    def where(i):
        parts = [emb[i] if i < len(emb) else "?"]
        if isinstance(eps, torch.Tensor):
            parts.append(f"episode {int(eps[i])}")
        if isinstance(frames, torch.Tensor):
            parts.append(f"frame {int(frames[i])}")
        return " ".join(parts)

    if suspects:
        detail = "; ".join(f"{key} of {where(i)} is non-finite or beyond 1e6 in normalized units"
                           for key, i in suspects[:5])
    else:
        detail = "windows: " + ", ".join(where(i) for i in range(min(n, 8))) + (" ..." if n > 8 else "")
    ckpts = list_checkpoints(output_dir)
    latest = ckpts[-1] if ckpts else None
    raise NonFiniteLossError(
        f"Non-finite loss ({float(loss.detach()):g}) at step {step + 1}: {detail}. Training stopped before the optimizer "
        f"used it; {'the latest good checkpoint is ' + latest if latest else 'no checkpoint was written'}. Check those "
        "episodes with `actprior validate` (a value far outside the dataset's statistics), or lower --learning_rate.")


def endless_batches(mixture, batch_size: int, consumed: int, rank: int = 0, world: int = 1,
                    collate=None, num_workers: int = 0) -> Iterator[dict]:
    """Batches from a ``MixtureDataset`` forever, epoch after epoch, resumable.

    ``consumed`` counts draws already used by all processes together; the mixture's draw ``k`` of epoch
    ``e`` is a fixed function of ``(seed, e, k)``, so a resumed run sees exactly the batches an uninterrupted
    one would. Rank ``r`` of ``world`` takes draws ``r, r + world, ...``. ``mixture.num_samples`` must be a
    multiple of ``batch_size * world`` so no draw is dropped at an epoch's end.
    """
    per_step = batch_size * world
    if mixture.num_samples % per_step:
        raise ValueError(f"mixture.num_samples={mixture.num_samples} must be a multiple of batch_size x processes={per_step}.")
    epoch, start = divmod(int(consumed), mixture.num_samples)
    while True:
        mixture.set_epoch(epoch)
        mixture.set_start(start)
        loader = torch.utils.data.DataLoader(
            mixture, batch_size=batch_size, sampler=list(range(rank, len(mixture), world)),
            collate_fn=collate, num_workers=num_workers, persistent_workers=False,
            # Its own generator: a new iterator must not draw from the global RNG, or a resumed run
            # (which creates its iterator at a different step) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(epoch),
        )
        yield from loader
        epoch, start = epoch + 1, 0


def check_output_dir_writable(output_dir: str, min_free_mb: float = 50.0) -> None:
    """Fail before training if ``output_dir`` can't be written or its disk is (nearly) full."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"--output_dir {output_dir} is not writable ({e.strerror or e}). Choose a folder you can write to, or "
            "free space on its disk."
        ) from None
    free_mb = shutil.disk_usage(output_dir).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(errno.ENOSPC, f"--output_dir {output_dir}: only {free_mb:.0f} MiB free on its disk; checkpoints "
                      f"need at least {min_free_mb:.0f} MiB. Free space or choose another --output_dir.")


def check_chunk_fits(datasets: Sequence, chunk_size: int, what: str = "--chunk_size") -> None:
    """Refuse an action chunk longer than every episode of a dataset: each of its windows would be mostly padding.

    ``datasets``: loaded ``TrajectoryDataset``s (``episode_lengths``, ``root``); ``chunk_size``: ``H`` in frames.
    """
    for ds in datasets:
        lengths = np.asarray(ds.episode_lengths, dtype=np.int64)
        if lengths.size and int(chunk_size) > int(lengths.max()):
            shown = ", ".join(str(int(n)) for n in lengths[:12]) + (", ..." if lengths.size > 12 else "")
            raise ValueError(
                f"{what} is {chunk_size} frames, longer than every episode of {ds.root} (episode lengths: {shown}; "
                f"the longest has {int(lengths.max())} frames), so no window would hold a full chunk. Use a chunk of "
                f"at most {int(lengths.max())} frames, or record longer episodes."
            )


def close_distributed(accelerator, destroy_timeout_s: float = 60.0) -> None:
    """Wait for every rank (rank 0 may still be evaluating and saving), then end the trackers and tear the
    process group down. Ending earlier on one rank leaves the other blocked on it. Call on every rank.

    ``destroy_process_group`` now and then never returns on gloo even after a barrier (pytorch/pytorch#75097).
    Everything is saved by then, so a teardown that does not finish within ``destroy_timeout_s`` is logged and the
    process ends at once with status 0 (``os._exit``: the interpreter's own teardown would wait on the same process
    group), instead of holding the process, and the launcher, forever."""
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    done = threading.Event()

    def destroy():
        accelerator.state.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="actprior-destroy-process-group", daemon=True).start()
    if not done.wait(destroy_timeout_s):
        logger.warning("rank %d: torch.distributed.destroy_process_group() did not return within %.0f s "
                       "(pytorch/pytorch#75097); the run is complete and saved, exiting without it.",
                       accelerator.process_index, destroy_timeout_s)
        for handler in logging.getLogger().handlers + logger.handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class PreemptionGuard:
    """Turns SIGTERM (the usual preemption signal) into a flag the loop checks at step boundaries, so the
    run writes a last checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def fixed_val_batches(val_sets: dict, batch_size: int, collate, seed: int, max_per_embodiment: int = 2) -> list[dict]:
    """A few fixed held-out batches per embodiment for the running validation loss (same windows every time)."""
    out = []
    rng = np.random.default_rng(seed)
    for emb in sorted(val_sets):
        for ds in val_sets[emb][:max_per_embodiment]:
            idx = rng.choice(len(ds), size=min(batch_size, len(ds)), replace=False)
            out.append(collate([ds[int(i)] for i in idx]))
    return out


@torch.no_grad()
def validation_loss(model, batches: list[dict], device, seed: int, loss_key: str) -> float:
    """Mean of ``output.<loss_key>`` over ``batches`` in eval mode, with noise and times from a fixed seed."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(getattr(model(**to_device(b, device), generator=gen), loss_key).item() for b in batches)
    model.train()
    return total / len(batches)


def ranks_agree(accelerator, model) -> bool:
    """True when every process holds bit-identical trainable weights (DDP must keep them so; frozen ones never change).
    One parameter at a time, so no copy of the whole model is made. Call on every rank."""
    params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    digest = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i, p in enumerate(params):
        flat = p.detach().flatten().double()
        weights = (torch.arange(flat.numel(), device=flat.device) + i) % 9973
        digest += torch.stack([flat.sum(), (flat * weights).sum()]).to(digest.device)
    gathered = accelerator.gather(digest[None]).reshape(-1, 2)
    return bool(torch.all(gathered == gathered[0]))


# --------------------------------------------------------------------------------------------- the loop
def make_accelerator(args):
    """The run's ``Accelerator`` from the shared options. Without any accelerator device it says so (``cpu=True``):
    then ``accelerate launch --multi_gpu --num_processes N`` is real DDP over gloo."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
    )


def global_batch(args, accelerator, train_sets: Sequence, more: str) -> tuple[int, int]:
    """``(windows per optimizer step and accumulation micro-step over all processes, training windows)``; refuses a
    global batch larger than the corpus (``more``: how to get more data)."""
    per_step = args.batch_size * accelerator.num_processes
    total = sum(len(t) for t in train_sets)
    if per_step * args.gradient_accumulation_steps > total:
        raise ValueError(
            f"A global batch of {per_step * args.gradient_accumulation_steps} windows (batch_size {args.batch_size} x "
            f"{accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation) exceeds the "
            f"{total} training windows of the corpus. Lower --batch_size or {more}."
        )
    return per_step, total


def train(args, accelerator, *, stage: str, model, optimizer, lr_scheduler, train_data, collate, val_sets: dict,
          val_loss: str, logged: Sequence[str], forward_kwargs=None, after_step=None,
          postfix: Sequence[str] = ("loss",)) -> tuple[dict, list[dict]]:
    """The one training loop of both stages, on a prepared ``model`` / ``optimizer``: resume (or start), the
    resumable data order, gradient accumulation, clipping, the non-finite-loss stop, logging (running means of the
    outputs named in ``logged``, the learning rate, the data-wait share, ``val_<val_loss>`` every ``--eval_every``
    steps), checkpoints every ``--checkpoint_every`` steps and at the end, SIGTERM (a last checkpoint, then stop),
    and the ranks' agreement. Call on every rank.

    A stage supplies its batches (``train_data``, a ``MixtureDataset``, and ``collate``), ``forward_kwargs(step)``
    (extra model arguments, e.g. the step of a schedule) and ``after_step(step)`` (after each optimizer step).
    Returns ``(result, history)``: ``result`` has ``step``, ``interrupted``, ``ranks_identical``,
    ``num_processes``, ``windows_per_second`` and ``data_wait_fraction``.
    """
    state = dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler)
    step, history = start_or_resume(accelerator, args.output_dir, args.resume_from_checkpoint,
                                    args.overwrite_output_dir, **state, options=jsonable(vars(args)))
    per_step = args.batch_size * accelerator.num_processes
    consumed = step * args.gradient_accumulation_steps * per_step
    batches = endless_batches(train_data, args.batch_size, consumed, accelerator.process_index,
                              accelerator.num_processes, collate, args.num_workers)
    val_batches = fixed_val_batches(val_sets, args.batch_size, collate, seed=args.seed)
    if accelerator.is_main_process:
        accelerator.init_trackers(f"actprior-{stage}", config={k: v for k, v in vars(args).items()
                                                               if isinstance(v, (int, float, str, bool))})

    guard = PreemptionGuard()
    start_step = step
    bar = tqdm(total=args.max_steps, initial=step, desc=stage,
               disable=args.no_progress or not accelerator.is_main_process)
    model.train()
    data_wait = compute = 0.0
    running: dict[str, float] = {}
    interrupted = False
    accumulation = args.gradient_accumulation_steps
    while step < args.max_steps:
        for _ in range(accumulation):
            t0 = time.perf_counter()
            batch = to_device(next(batches), accelerator.device)
            t1 = time.perf_counter()
            with accelerator.accumulate(model):
                out = model(**batch, **(forward_kwargs(step) if forward_kwargs else {}))
                check_finite_loss(out.loss, step, batch, args.output_dir)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            data_wait += t1 - t0
            compute += time.perf_counter() - t1
            for k in logged:
                if getattr(out, k, None) is not None:  # e.g. shortcut_loss: shortcut models only
                    running[k] = running.get(k, 0.0) + getattr(out, k).item() / accumulation
        lr_scheduler.step()
        step += 1
        if after_step is not None:
            after_step(step)
        bar.update(1)

        if step % args.log_every == 0 or step == args.max_steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            logs = {k: v / n for k, v in running.items()}
            logs.update(lr=lr_scheduler.get_last_lr()[0], data_wait_fraction=data_wait / max(1e-9, data_wait + compute))
            running = {}
            if args.eval_every and (step % args.eval_every == 0 or step == args.max_steps) and val_batches:
                logs[f"val_{val_loss}"] = validation_loss(model, val_batches, accelerator.device, args.seed, val_loss)
            accelerator.log(logs, step=step)
            history.append({"step": step, **{k: float(v) for k, v in logs.items()}})
            bar.set_postfix({k: f"{logs[k]:.4g}" for k in postfix if k in logs})
            if bar.disable and accelerator.is_main_process:
                logger.info("step %d/%d %s", step, args.max_steps, " ".join(f"{k}={v:.4g}" for k, v in logs.items()))

        stop_now = guard.requested
        if step % args.checkpoint_every == 0 or step == args.max_steps or stop_now:
            save_checkpoint(accelerator, args.output_dir, step, {"history": history, "args": jsonable(vars(args))},
                            keep_last=args.keep_last, **state)
        if stop_now:
            logger.warning("SIGTERM received: checkpoint written at step %d; resume with --resume_from_checkpoint latest",
                           step)
            interrupted = True
            break
    bar.close()
    guard.close()

    timed = max(1e-9, data_wait + compute)
    result = {"step": step, "interrupted": interrupted, "ranks_identical": ranks_agree(accelerator, model),
              "num_processes": accelerator.num_processes,
              "windows_per_second": (step - start_step) * per_step * accumulation / timed,
              "data_wait_fraction": data_wait / timed}
    return result, history


def end_run(args, accelerator, result: dict) -> dict:
    """Write ``run_summary.json`` (main process) and tear the processes down; returns ``result``. Call on every rank."""
    if accelerator.is_main_process:
        write_json(os.path.join(args.output_dir, "run_summary.json"), result)
    close_distributed(accelerator)
    return result
