"""Training on MLX as `df.train` trains; `main` (and `dfmlx train`) is df.train's entry point
with df_mlx.libdfdata's loader in place of libdfdata's Rust one.

Kept from df.train, and checked against it in parity/test_train.py:
- `load_opt`: the `[optim]` optimizer (adamw by default; Adam/AdamW always with amsgrad, SGD
  always Nesterov), its lr, weight decay, betas and momentum, the mask-only / DF-only
  parameter selections; the update formulas are torch's (df_mlx.optim).
- `setup_lrs` / `setup_wds`: the cosine lr schedule with warm-up and the cosine weight-decay
  schedule, one value per global iteration, written into the parameter group before each step.
- the step: loss of `df_mlx.loss.Loss` on the model's outputs, gradients, clipping to a total
  norm of 1 (torch's clip_grad_norm_ formula, non-finite norms skip the step), the update.
- `run_epoch`'s mean batch loss, NaN skipping (at most MAX_NANS), logging every LOG_FREQ steps
  with audio summaries; `train_loop`: per epoch a train and a validation run, model and
  optimizer checkpoints, the `.best` checkpoint by VALIDATION_CRITERIA, early stopping with
  `check_patience`, batch-size scheduling, and the test run on the best model.

Different on purpose: the epoch functions take any object with libdfdata's loader methods
(df_mlx.libdfdata.DataLoader; `BatchLoader` keeps batches in memory); checkpoints are safetensors (df_mlx.checkpoint);
gradients come from `nn.value_and_grad`, which returns zeros, not None, for parameters the loss
does not reach: `train_step` treats an all-zero gradient as None so that, as in torch, those
parameters are neither decayed nor counted as stepped. `main(resume=False)` refuses a
checkpoint directory that holds an earlier run (`start_over` moves it aside first); step logs
count from 1 to the number of steps, as the progress bar does; the loops check for Ctrl-C
between steps (df_mlx.interrupt); before the first epoch, df_mlx.config_check reports config
settings nothing reads and loss sets that train neither the mask nor the DF decoder.
"""

import glob
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from loguru import logger
from mlx.utils import tree_flatten
from tqdm import tqdm

from df_mlx import config_check, distributed, interrupt, optim
from df_mlx.checkpoint import check_patience, read_cp, write_cp
from df_mlx.config import Csv, config
from df_mlx.libdfdata import Batch, DataLoader, noisy_features
from df_mlx.logger import log_metrics
from df_mlx.loss import Istft, Loss
from df_mlx.lr import cosine_scheduler
from df_mlx.model import ModelParams
from df_mlx.utils import as_complex, as_real, check_finite_module, get_norm_alpha, make_np
from df_mlx.checkpoint import cleanup, load_model  # noqa: F401  (re-exported, as df.train)
from df_mlx.libdf import DF  # noqa: F401  (re-exported, as df.train)
from df_mlx.logger import init_logger, log_model_summary  # noqa: F401  (re-exported, as df.train)
from df_mlx.utils import check_manual_seed, detach_hidden, get_device, get_host  # noqa: F401  (re-exported, as df.train)

should_stop = False  # set by a caller's signal handler: stop after the current epoch
debug = False
log_timings = False
state = None  # the df_mlx.libdf.DF of the model's STFT, for audio summaries and losses
MAX_NANS = 50

Grads = Dict[str, Optional[mx.array]]


def make_batch(clean, noise, snrs: Sequence[float], df_state, nb_df: int) -> Batch:
    """Mix clean [B, T] and noise [B, T] audio at `snrs` (dB) and compute df's model inputs
    (libdf STFT, erb_norm'd ERB features, unit_norm'd spectral features) with df_mlx.libdf.
    libdfdata also augments (reverb, gains, filters); this keeps only the mixing, so batches
    stay reproducible without the Rust loader."""
    clean, noise = np.asarray(clean, np.float32), np.asarray(noise, np.float32)
    snrs = np.asarray(snrs, np.float32)
    gain = np.sqrt(np.mean(clean**2, -1) / np.maximum(np.mean(noise**2, -1), 1e-10) / 10 ** (snrs / 10))
    noisy = (clean + gain[:, None].astype(np.float32) * noise).astype(np.float32)
    speech_spec, noisy_spec = df_state.analysis(clean), df_state.analysis(noisy)
    feat_erb, feat_spec = noisy_features(noisy_spec, df_state.erb_widths(), nb_df, get_norm_alpha(False))
    return Batch(mx.array(speech_spec[:, None]), mx.array(noisy_spec[:, None]), mx.array(feat_erb[:, None]),
                 mx.array(feat_spec[:, None]), mx.array(snrs), mx.arange(len(snrs)))


class BatchLoader:
    """In-memory samples per split behind the methods df.train calls on libdfdata's
    PytorchDataLoader: len(split), get_batch_size, set_batch_size, iter_epoch(split, seed).
    Incomplete last batches are dropped; training order is shuffled by the epoch seed."""

    def __init__(self, splits: Dict[str, Batch], batch_size: int, batch_size_eval: Optional[int] = None):
        self.splits = splits
        self.batch_sizes = {"train": batch_size}
        self.batch_size_eval = batch_size_eval or batch_size

    def get_batch_size(self, split: str) -> int:
        return self.batch_sizes.get(split, self.batch_size_eval)

    def set_batch_size(self, batch_size: int, split: str):
        self.batch_sizes[split] = batch_size

    def len(self, split: str) -> int:
        return len(self.splits[split]) // self.get_batch_size(split) if split in self.splits else 0

    def __len__(self) -> int:
        return self.len("train")

    def iter_epoch(self, split: str, seed: int) -> Iterator[Batch]:
        samples = self.splits[split]
        order = np.arange(len(samples))
        if split == "train":
            order = np.random.default_rng(seed).permutation(order)
        bs = self.get_batch_size(split)
        for i in range(self.len(split)):
            batch = samples.slice(order[i * bs : (i + 1) * bs])
            yield batch.local_share() if split == "train" else batch


def _param_names(model, mask_only: bool, df_only: bool) -> List[str]:
    """The trainable parameters df.train.load_opt hands to the optimizer."""
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    if mask_only:
        return [n for n in names if not ("dfrnn" in n or "df_dec" in n)]
    if df_only:
        return [n for n in names if "df" in n.lower()]
    return names


def load_opt(cp_dir: Optional[str], model, mask_only: bool = False, df_only: bool = False,
             epoch: Union[str, int] = "latest") -> optim.Optimizer:
    """The optimizer df.train.load_opt builds from `[optim]`, with its state restored from
    `cp_dir` when there is one. The config keys and defaults are df's."""
    lr = config("LR", 5e-4, float, section="optim")
    momentum = config("momentum", 0, float, section="optim")  # For sgd, rmsprop
    decay = config("weight_decay", 0.05, float, section="optim")
    optimizer = config("optimizer", "adamw", str, section="optim").lower()
    betas = config("opt_betas", [0.9, 0.999], Csv(float), section="optim", save=False)
    params = _param_names(model, mask_only, df_only)
    supported = {
        "adam": lambda p: optim.Adam(p, lr=lr, weight_decay=decay, betas=betas, amsgrad=True),
        "adamw": lambda p: optim.AdamW(p, lr=lr, weight_decay=decay, betas=betas, amsgrad=True),
        "sgd": lambda p: optim.SGD(p, lr=lr, momentum=momentum, nesterov=True, weight_decay=decay),
        "rmsprop": lambda p: optim.RMSprop(p, lr=lr, momentum=momentum, weight_decay=decay),
    }
    if optimizer not in supported:
        raise ValueError(f"Unsupported optimizer: {optimizer}. Must be one of {list(supported.keys())}")
    opt = supported[optimizer](params)
    logger.debug(f"Training with optimizer {opt}")
    if cp_dir is not None:
        try:
            read_cp(opt, "opt", cp_dir, log=False, epoch=epoch)
        except ValueError as e:
            logger.error(f"Could not load optimizer state: {e}")
    for group in opt.param_groups:
        group.setdefault("initial_lr", lr)
    return opt


def setup_lrs(steps_per_epoch: int) -> np.ndarray:
    """One learning rate per global iteration: linear warm-up, then cosine (cycles)."""
    lr = config.get("lr", float, "optim")
    num_epochs = config.get("max_epochs", int, "train")
    lr_min = config("lr_min", 1e-6, float, section="optim")
    lr_warmup = config("lr_warmup", 1e-4, float, section="optim")
    if not lr_warmup < lr:
        raise ValueError(f"[optim] lr_warmup ({lr_warmup}) must be below lr ({lr})")
    return cosine_scheduler(
        lr, lr_min, epochs=num_epochs, niter_per_ep=steps_per_epoch,
        warmup_epochs=config("warmup_epochs", 3, int, section="optim"), start_warmup_value=lr_warmup,
        initial_ep_per_cycle=config("lr_cycle_epochs", -1, int, section="optim"),
        cycle_decay=config("lr_cycle_decay", 0.5, float, section="optim"),
        cycle_mul=config("lr_cycle_mul", 1.0, float, section="optim"),
    )


def setup_wds(steps_per_epoch: int) -> Optional[np.ndarray]:
    """One weight decay per global iteration (cosine from weight_decay to weight_decay_end), or
    None without `weight_decay_end`. A zero weight_decay becomes 1e-12, as in df, because the
    schedule only touches groups whose weight decay is positive."""
    decay = config("weight_decay", 0.05, float, section="optim")
    decay_end = config("weight_decay_end", -1, float, section="optim")
    if decay_end == -1:
        return None
    if decay == 0.0:
        decay = 1e-12
        logger.warning("Got 'weight_decay_end' value > 0, but weight_decay is disabled.")
        logger.warning(f"Setting initial weight decay to {decay}.")
        config.overwrite("optim", "weight_decay", decay)
    num_epochs = config.get("max_epochs", int, "train")
    return cosine_scheduler(decay, decay_end, niter_per_ep=steps_per_epoch, epochs=num_epochs)


def setup_losses() -> Loss:
    """df's Loss for the global `state`, with an Istft of its window (time-domain losses)."""
    if state is None:
        raise ValueError("df_mlx.train.state (the model's DF) must be set before setup_losses")
    p = ModelParams()
    return Loss(state, Istft(p.fft_size, p.hop_size, mx.array(state.fft_window().copy())))


def apply_schedules(opt: optim.Optimizer, it: int, lrs: Optional[np.ndarray], wds: Optional[np.ndarray]):
    """Write iteration `it`'s lr (times a group's lr_scale) and weight decay into the groups,
    before the step as run_epoch does; a group without weight decay keeps none."""
    for group in opt.param_groups:
        if lrs is not None:
            group["lr"] = lrs[it] * group.get("lr_scale", 1)
        if wds is not None and group["weight_decay"] > 0:
            group["weight_decay"] = wds[it]


def forward_loss(model, losses: Loss, batch: Batch) -> Tuple[mx.array, tuple]:
    """The model on the noisy spectrum and features, then df's loss against the clean one."""
    noisy = batch.noisy
    enh, m, lsnr, other = model(spec=as_real(noisy), feat_erb=batch.feat_erb, feat_spec=as_real(batch.feat_spec))
    own = distributed.own  # under mlx.launch: without the padding of this rank's share
    err = losses(own(batch.speech), own(noisy), own(enh), own(m), own(lsnr), snrs=own(batch.snr))
    return err, (enh, m, lsnr, other)


def _block_sum(x: mx.array) -> mx.array:
    """Sum in blocks of 1024, then the block sums: MLX's CPU reduction runs one float32
    accumulator, which drifts on 1e5-element sums; torch's vectorised norm does not."""
    flat = x.reshape(-1)
    pad = (-flat.shape[0]) % 1024
    if pad:
        flat = mx.concatenate([flat, mx.zeros((pad,), flat.dtype)])
    return flat.reshape(-1, 1024).sum(axis=1).sum()


def _norm(x: mx.array) -> mx.array:
    return mx.sqrt(_block_sum(mx.square(x)))


def clip_grad_norm_(grads: Grads, max_norm: float, error_if_nonfinite: bool = False) -> Tuple[Grads, mx.array]:
    """torch.nn.utils.clip_grad_norm_ on {name: grad or None}: the 2-norm of the per-tensor
    norms, every gradient times min(1, max_norm / (norm + 1e-6)). Returns (clipped, norm)."""
    present = {k: g for k, g in grads.items() if g is not None}
    if not present:
        return dict(grads), mx.array(0.0)
    total = _norm(mx.stack([_norm(g) for g in present.values()]))
    if error_if_nonfinite and not bool(mx.isfinite(total).item()):
        raise RuntimeError(
            "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = mx.minimum((1.0 / (total + mx.array(1e-6, mx.float32))) * max_norm, 1.0)
    return {k: None if g is None else g * coef for k, g in grads.items()}, total


def _none_if_unreached(grads: Grads) -> Grads:
    """Map all-zero gradients to None: MLX's zeros for parameters outside the loss graph stand
    for torch's `p.grad is None` (one evaluation for all peaks)."""
    names = [k for k, g in grads.items() if g is not None]
    if not names:
        return dict(grads)
    peaks = np.array(mx.stack([mx.max(mx.abs(grads[k])) for k in names]))
    zero = {k for k, peak in zip(names, peaks) if peak == 0}
    return {k: None if k in zero else g for k, g in grads.items()}


def compute_grads(model, losses: Loss, batch: Batch, zero_grad_is_none: bool = True) -> Tuple[mx.array, tuple, Grads]:
    """Loss, model outputs and the raw gradient of every trainable parameter, by name; with
    several ranks the loss and gradients are those of the global batch, the ranks' shares
    weighted by their sizes."""

    def weighed_loss():
        err, outputs = forward_loss(model, losses, batch)
        return distributed.weigh(err), outputs

    with distributed.share_of(batch.global_size):
        (err, outputs), grads = nn.value_and_grad(model, weighed_loss)()
    err, grads = distributed.average_gradients(err, grads)
    flat: Grads = dict(tree_flatten(grads))
    return err, outputs, _none_if_unreached(flat) if zero_grad_is_none else flat


@dataclass
class StepResult:
    loss: mx.array
    grad_norm: mx.array  # total norm before clipping
    grads: Grads  # raw gradients (before clipping); None where the loss does not reach
    outputs: tuple  # enhanced spectrum, ERB mask, lsnr, DF coefficients/alpha


def train_step(model, opt: optim.Optimizer, losses: Loss, batch: Batch, max_norm: float = 1.0,
               zero_grad_is_none: bool = True) -> StepResult:
    """One optimizer step as in run_epoch: gradients, clip to `max_norm` (raising RuntimeError
    on a non-finite norm, before anything is updated), the update. The caller sets lr/wd
    (apply_schedules) first."""
    opt.zero_grad()
    err, outputs, grads = compute_grads(model, losses, batch, zero_grad_is_none)
    clipped, total = clip_grad_norm_(grads, max_norm, error_if_nonfinite=True)
    opt.step(model, clipped)
    mx.eval(err, model.parameters(), opt.state)
    distributed.step_done()
    return StepResult(err, total, grads, outputs)


def _skip_non_finite(e: Exception, model, n_nans: int, what: str) -> int:
    """df's NaN policy: a loss or gradient that is not finite skips the batch (after checking
    that the weights are still finite), at most MAX_NANS times; other errors propagate."""
    msg = str(e)
    if "nan" not in msg.lower() and "finite" not in msg.lower():
        raise e
    logger.warning(f"NaN in {what}: {msg}. Skipping batch.")
    check_finite_module(model)
    if n_nans + 1 > MAX_NANS:
        raise e
    return n_nans + 1


def run_epoch(model, epoch: int, loader, split: str, opt: optim.Optimizer, losses: Loss, summary_dir: Optional[str],
              lr_scheduler_values: Optional[np.ndarray] = None, wd_scheduler_values: Optional[np.ndarray] = None,
              progress: bool = True, step: Optional[Callable[[Batch, int, int], StepResult]] = None) -> float:
    """One pass over `split` (training steps for "train"); returns the mean batch loss.
    `step(batch, i, it)` replaces `train_step` for training batches (df_mlx.train_gan's G/D step)."""
    log_freq = config("LOG_FREQ", cast=int, default=100, section="train")
    bs = loader.get_batch_size(split)
    logger.info(f"Start {split} epoch {epoch} with batch size {bs}")
    is_train = split == "train"
    model.train(is_train)
    losses.store_losses = debug or not is_train
    n_steps = loader.len(split)
    start_steps = epoch * n_steps
    l_mem: List[mx.array] = []
    n_nans = 0
    batches = loader.iter_epoch(split, epoch if is_train else 42)
    for i, batch in enumerate(tqdm(batches, total=n_steps, desc=f"[{epoch}] {split}", disable=not progress,
                                   leave=False)):
        interrupt.where = f"epoch {epoch}, {split} step {i + 1}/{n_steps}"
        interrupt.check()
        apply_schedules(opt, start_steps + i, lr_scheduler_values, wd_scheduler_values)
        try:
            if is_train:
                result = train_step(model, opt, losses, batch) if step is None else step(batch, i, start_steps + i)
                err, outputs = result.loss, result.outputs
            else:
                err, outputs = forward_loss(model, losses, batch)
                mx.eval(err)
        except (ValueError, RuntimeError) as e:
            distributed.step_done()
            n_nans = _skip_non_finite(e, model, n_nans, "training step" if is_train else "loss")
            continue
        l_mem.append(mx.stop_gradient(err))
        if i % log_freq == 0:
            _log_step(epoch, i, n_steps, l_mem, opt, losses, batch, outputs, summary_dir, split,
                      lr_scheduler_values is not None, wd_scheduler_values is not None)
    if not l_mem:
        raise ValueError(f"{split} epoch {epoch}: no loss (no batches, or every batch was skipped as non-finite)")
    return float(mx.stack(l_mem).mean().item())


def _log_step(epoch, i, n_steps, l_mem, opt, losses, batch, outputs, summary_dir, split, log_lr, log_wd):
    """run_epoch's periodic log line (mean of the last 100 losses, lr, wd) and audio summary.
    Steps count from 1 to n_steps, as the progress bar does (df logs 0 to n_steps - 1)."""
    l_dict = {"loss": float(mx.stack(l_mem[-100:]).mean().item())}
    if log_lr:
        l_dict["lr"] = opt.param_groups[0]["lr"]
    if log_wd:
        l_dict["wd"] = opt.param_groups[0]["weight_decay"]
    if log_timings and batch.timings is not None:
        l_dict["t_sample"] = float(np.sum(batch.timings[:-1]))
        l_dict["t_batch"] = float(np.mean(batch.timings[-1]))
    if debug:
        bs = len(batch)
        l_dict.update({n: float(mx.stack(vals[-bs:]).mean().item()) for n, vals in losses.get_summaries()})
    step = str(i + 1).rjust(len(str(n_steps)))
    log_metrics(f"[{epoch}] [{step}/{n_steps}]", l_dict)
    if summary_dir is not None and state is not None and distributed.is_writer():
        enh, _, lsnr, _ = outputs
        with interrupt.writing():
            summary_write(batch.speech, batch.noisy, enh, batch.snr, lsnr, summary_dir, prefix=split)


def summary_write(clean, noisy, enh, snrs, lsnr, summary_dir: str, prefix="train", idx: Optional[int] = None):
    """Clean, noisy and enhanced audio of one batch item (float WAV) and its lsnr estimate."""
    from df_mlx.io import save_audio

    p = ModelParams()
    if idx is None:
        idx = random.randrange(snrs.shape[0])
    snr = np.array(snrs[idx]).item()

    def synthesis(x) -> np.ndarray:
        return state.synthesis(make_np(as_complex(mx.stop_gradient(x))))

    for name, x in (("clean", clean), ("noisy", noisy), ("enh", enh)):
        save_audio(os.path.join(summary_dir, f"{prefix}_{name}_snr{snr}.wav"), synthesis(x[idx]), p.sr,
                   dtype=np.float32)
    np.savetxt(os.path.join(summary_dir, f"{prefix}_lsnr_snr{snr}.txt"), np.array(lsnr[idx]), fmt="%.3f")


def _batch_size_schedule() -> List[Tuple[int, int]]:
    """BATCH_SIZE_SCHEDULING '<epoch>/<batch size>,...' (first epoch 0) as pairs."""
    entries: List[str] = config("BATCH_SIZE_SCHEDULING", [], Csv(str), section="train")
    schedule = [(int(e), int(b)) for e, b in (s.split("/") for s in entries)]
    if schedule and schedule[0][0] != 0:
        raise ValueError("BATCH_SIZE_SCHEDULING must start at epoch 0")
    return schedule


def _epoch_metrics(loss: float, losses: Loss) -> Dict[str, float]:
    metrics = {"loss": loss}
    metrics.update({n: float(mx.stack(vals).mean().item()) for n, vals in losses.get_summaries()})
    return metrics


def train_loop(model, opt: optim.Optimizer, loader, losses: Loss, checkpoint_dir: str, summary_dir: Optional[str],
               epoch: int = 0, resume: bool = True, progress: bool = True,
               train_epoch: Optional[Callable] = None) -> Tuple[Optional[float], int]:
    """df.train.main's epochs from a built model, optimizer and loader (main also parses
    arguments and builds libdfdata's loader, which df_mlx does not have). Returns the test
    loss of the best checkpoint and its epoch; (None, epoch) when `should_stop` was set.
    `train_epoch` (run_epoch's signature) replaces run_epoch for the training epochs."""
    bs = config("BATCH_SIZE", 1, int, section="train")
    schedule = _batch_size_schedule()
    prev_bs = bs
    max_epochs = config("MAX_EPOCHS", 10, int, section="train")
    lrs, wds = setup_lrs(len(loader)), setup_wds(len(loader))
    if not resume and os.path.isfile(os.path.join(checkpoint_dir, ".patience")):
        distributed.on_writer(os.remove, os.path.join(checkpoint_dir, ".patience"))
    criteria = config("VALIDATION_CRITERIA", "loss", section="train")
    rule = config("VALIDATION_CRITERIA_RULE", "min", section="train").replace("less", "min").replace("more", "max")
    patience = config("EARLY_STOPPING_PATIENCE", 5, int, section="train")
    start_eval = config("START_EVAL", False, cast=bool, section="train")
    config_check.warn_unread()
    config_check.warn_untrained(losses)
    if start_eval:
        val_loss = run_epoch(model, epoch - 1, loader, "valid", opt, losses, summary_dir, progress=progress)
        log_metrics(f"[{epoch - 1}] [valid]", _epoch_metrics(val_loss, losses))
    losses.reset_summaries()
    for epoch in range(epoch, max_epochs):
        if schedule:
            scheduled = min([b for e, b in schedule if e <= epoch][-1], bs)
            if scheduled != prev_bs:
                logger.info(f"Batch scheduling | Setting batch size to {scheduled}")
                loader.set_batch_size(scheduled, "train")
                lrs, wds = setup_lrs(len(loader)), setup_wds(len(loader))
                prev_bs = scheduled
        train_loss = (train_epoch or run_epoch)(model, epoch, loader, "train", opt, losses, summary_dir, lrs, wds,
                                                progress)
        metrics = {"loss": train_loss, "lr": opt.param_groups[0]["lr"]}
        if debug:
            metrics.update({n: float(mx.stack(v).mean().item()) for n, v in losses.get_summaries()})
        log_metrics(f"[{epoch}] [train]", metrics)
        interrupt.where = f"epoch {epoch}, writing its checkpoints"
        with interrupt.writing():
            distributed.on_writer(write_cp, model, "model", checkpoint_dir, epoch + 1)
            distributed.on_writer(write_cp, opt, "opt", checkpoint_dir, epoch + 1)
        losses.reset_summaries()
        metrics = _epoch_metrics(run_epoch(model, epoch, loader, "valid", opt, losses, summary_dir,
                                           progress=progress), losses)
        with interrupt.writing():  # the .best copy and .patience belong with the epoch's checkpoints
            distributed.on_writer(write_cp, model, "model", checkpoint_dir, epoch + 1, metric=metrics[criteria],
                                  cmp=rule)
            log_metrics(f"[{epoch}] [valid]", metrics)
            improving = distributed.writer_decides(check_patience, checkpoint_dir, max_patience=patience,
                                                   new_metric=metrics[criteria], cmp=rule, raise_=False)
        if not improving:
            break
        if distributed.any_rank(should_stop):  # df exits the process here: no test run
            logger.info("Stopping training due to timeout")
            return None, epoch
        losses.reset_summaries()
    best = read_cp(model, "model", checkpoint_dir, epoch="best", log=False)
    epoch = 0 if best is None else best
    logger.info(f"Testing {_tested_checkpoint(checkpoint_dir, best)}")
    test_loss = run_epoch(model, epoch, loader, "test", opt, losses, summary_dir, progress=progress)
    log_metrics(f"[{epoch}] [test]", _epoch_metrics(test_loss, losses))
    logger.info("Finished training")
    return test_loss, epoch


def _tested_checkpoint(checkpoint_dir: str, epoch: Optional[int]) -> str:
    """Which weights the test run evaluates, for the log: the file read_cp loaded."""
    from df_mlx.checkpoint import EXTENSION

    if epoch is None:
        return "the untrained model (no checkpoint found)"
    path = os.path.join(checkpoint_dir, f"model_{epoch}.{EXTENSION}")
    return f"epoch {epoch}: {path + '.best' if os.path.isfile(path + '.best') else path}"


def earlier_checkpoints(checkpoint_dir: str) -> List[str]:
    """The training state a run left in `checkpoint_dir`: checkpoints of any network or
    optimizer (model, opt, disc, d_opt, ...), their .best copies, and the .best / .patience
    records."""
    from df_mlx.checkpoint import EXTENSION

    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(n for n in os.listdir(checkpoint_dir)
                  if n.endswith((f".{EXTENSION}", f".{EXTENSION}.best")) or n in (".best", ".patience"))


def move_aside(checkpoint_dir: str) -> str:
    """Rename `checkpoint_dir` to `<checkpoint_dir>.<UTC timestamp>` (never over an existing
    path) so that a new run starts empty and the old one stays whole; returns the new name."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = f"{checkpoint_dir}.{stamp}", 1
    while os.path.lexists(target):
        target, n = f"{checkpoint_dir}.{stamp}-{n}", n + 1
    os.rename(checkpoint_dir, target)
    return target


def resumable_epoch(checkpoint_dir: str) -> Optional[int]:
    """The latest epoch with both a model and an optimizer checkpoint (None without one): a run
    killed between writing the two resumes from the epoch before, where both agree (df resumes
    each from its own latest file and would pair a new model with the previous optimizer)."""
    from df_mlx.checkpoint import EXTENSION, get_epoch

    def epochs(name: str) -> set:
        return {get_epoch(f) for f in glob.glob(os.path.join(checkpoint_dir, f"{name}_*.{EXTENSION}"))}

    both = epochs("model") & epochs("opt")
    return max(both) if both else None


class TrainSetupError(ValueError):
    """Arguments, config or data that stop training before its first step."""


def setup_errors() -> tuple:
    """The errors of bad arguments, configs or data, which `dfmlx train` reports in one line."""
    from df_mlx.libdfdata import DatasetError

    return TrainSetupError, DatasetError, FileNotFoundError, KeyError


def get_sigusr1_handler(base_dir: str):
    """df's timeout handler: stop after the current epoch and leave a `continue` file."""

    def handler(*_args):
        global should_stop
        logger.warning("Received timeout signal. Stopping after current epoch")
        should_stop = True
        continue_file = os.path.join(base_dir, "continue")
        logger.warning(f"Writing {continue_file}")
        open(continue_file, "w").close()

    return handler


def setup_dataloader(data_config_file: str, data_dir: str, p: ModelParams, seed: int, log_level: str):
    """df.train's loader, with df's config keys and defaults, as df_mlx.libdfdata.DataLoader."""

    bs = config("BATCH_SIZE", 1, int, section="train")
    bs_eval = config("BATCH_SIZE_EVAL", 0, int, section="train")
    return DataLoader(
        ds_dir=data_dir, ds_config=data_config_file, sr=p.sr, batch_size=bs,
        batch_size_eval=bs_eval if bs_eval > 0 else bs, num_workers=config("NUM_WORKERS", 4, int, section="train"),
        max_len_s=config("MAX_SAMPLE_LEN_S", 5.0, float, section="train"), fft_size=p.fft_size,
        hop_size=p.hop_size, nb_erb=p.nb_erb, nb_spec=p.nb_df, norm_alpha=get_norm_alpha(log=False),
        p_reverb=config("p_reverb", 0.2, float, section="distortion"),
        p_bw_ext=config("p_bandwidth_ext", 0.0, float, section="distortion"),
        p_clipping=config("p_clipping", 0.0, float, section="distortion"),
        p_zeroing=config("p_zeroing", 0.0, float, section="distortion"),
        p_air_absorption=config("p_air_absorption", 0.0, float, section="distortion"),
        p_interfer_sp=config("p_interfer_sp", 0.0, float, section="distortion"),
        prefetch=config("NUM_PREFETCH_BATCHES", 32, int, section="train"),
        overfit=config("OVERFIT", False, bool, section="train"), seed=seed, min_nb_erb_freqs=p.min_nb_freqs,
        log_timings=config("LOG_TIMINGS", False, bool, section="train", save=False),
        global_sampling_factor=config("GLOBAL_DS_SAMPLING_F", 1.0, float, section="train"),
        snrs=config("DATALOADER_SNRS", [-5, 0, 5, 10, 20, 40], Csv(int), section="train"),
        gains=config("DATALOADER_GAINS", [-6, 0, 6], Csv(int), section="train"), log_level=log_level,
    )


def main(data_config_file: str, data_dir: str, base_dir: str, resume: bool = True, log_level: Optional[str] = None,
         debug_: bool = False, progress: bool = True, loop: Optional[Callable] = None,
         start_over: bool = False) -> Tuple[Optional[float], int]:
    """df.train's entry point: the model of `base_dir/config.ini` trained on the dataset config's
    HDF5 files in `data_dir`; checkpoints, summaries and train.log under `base_dir`, resuming
    from its latest checkpoint unless `resume` is False. Returns (test loss, best epoch).
    `loop` (train_loop's signature) replaces train_loop (df_mlx.train_gan adds the discriminator).

    Unlike df, `resume=False` refuses a checkpoint directory that holds an earlier run (df
    trains into it, its history cleanup deletes the new epochs' files and the test run reads
    the old run's best): `start_over` first moves those checkpoints aside (move_aside)."""
    import signal

    from df_mlx.checkpoint import load_model
    from df_mlx.libdf import DF
    from df_mlx.logger import init_logger
    from df_mlx.utils import check_manual_seed

    global debug, state, should_stop
    if not os.path.isfile(data_config_file):
        raise TrainSetupError(f"Dataset config not found at {data_config_file}")
    if not os.path.isdir(data_dir):
        raise TrainSetupError(f"Data directory not found at {data_dir}")
    checkpoint_dir = os.path.join(base_dir, "checkpoints")
    resume = resume and not start_over
    earlier = earlier_checkpoints(checkpoint_dir)
    if earlier and not resume and not start_over:
        raise TrainSetupError(
            f"{checkpoint_dir} holds an earlier run ({len(earlier)} files): resume it (without --no-resume), "
            "or pass --start-over to move it aside and train from scratch")
    os.makedirs(base_dir, exist_ok=True)
    summary_dir = os.path.join(base_dir, "summaries")
    os.makedirs(summary_dir, exist_ok=True)
    debug, should_stop = debug_, False
    if log_level is not None and debug and log_level.lower() != "debug":
        raise TrainSetupError("Either specify debug or a manual log level")
    log_level = log_level or ("DEBUG" if debug else "INFO")
    writer = distributed.is_writer()  # the other ranks log warnings and errors only, and to no file
    init_logger(file=os.path.join(base_dir, "train.log") if writer else None, level=log_level if writer else "WARNING",
                model=base_dir)
    if earlier and start_over and distributed.is_writer():  # rank 0 moves them; the others do not resume
        logger.info(f"Starting over: the earlier run's checkpoints are now in {move_aside(checkpoint_dir)}")
    config_file = os.path.join(base_dir, "config.ini")
    config.load(config_file, allow_reload=True)
    seed = check_manual_seed(config("SEED", 42, int, section="train"))
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, get_sigusr1_handler(base_dir))
    p = ModelParams()
    state = DF(sr=p.sr, fft_size=p.fft_size, hop_size=p.hop_size, nb_bands=p.nb_erb, min_nb_erb_freqs=p.min_nb_freqs)
    os.makedirs(checkpoint_dir, exist_ok=True)
    mask_only = config("MASK_ONLY", False, bool, section="train")
    df_only = config("DF_ONLY", False, bool, section="train")
    distributed.check_batch_size(config("BATCH_SIZE", 1, int, section="train"))
    loader = setup_dataloader(data_config_file, data_dir, p, seed, log_level)
    resume_from = (resumable_epoch(checkpoint_dir) or "latest") if resume else None
    cp_dir = checkpoint_dir if resume else None
    model, epoch = load_model(cp_dir, state, mask_only=mask_only, train_df_only=df_only, epoch=resume_from)
    opt = load_opt(cp_dir, model, mask_only, df_only, epoch=resume_from or "latest")
    distributed.check_same_start(epoch, model=dict(tree_flatten(model.parameters())), opt=dict(tree_flatten(opt.state)))
    losses = setup_losses()
    distributed.on_writer(config.save, config_file)
    return (loop or train_loop)(model, opt, loader, losses, checkpoint_dir, summary_dir, epoch=epoch, resume=resume,
                                progress=progress)
