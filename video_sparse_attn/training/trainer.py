"""The fine-tuning loop behind ``scripts/finetune.py`` (accelerate; one or many processes).

Outputs under ``--output-dir``:
    checkpoint-<step>/          accelerate ``save_state`` (model or LoRA adapter, optimizer, scheduler,
                                RNG, sampler) + ``run_settings.json`` + ``checkpoint_manifest.json``,
                                written atomically (see `checkpoints`); ``--resume-from-checkpoint``
                                continues at <step>
    transformer/                full fine-tune: ``save_pretrained`` folder (config.json +
                                diffusion_pytorch_model.safetensors) and ``ssta_config.json``
    transformer_lora/           LoRA: ``pytorch_lora_weights.safetensors`` (load with
                                ``transformer.load_lora_adapter(folder)``) and ``ssta_config.json``
    train_log.jsonl             one JSON line per optimizer step: step, loss, lr, SSTA sparse_type,
                                topk, window and mean block density
    train_log.png               loss and density over the steps (when matplotlib is installed)
    run_args.json               the arguments and SSTA config this run actually used

A second run into an ``--output-dir`` that holds a run is refused unless it resumes
(``--resume-from-checkpoint``) or replaces it (``--overwrite``). A resume keeps the run's settings
(``run_settings.json`` in each checkpoint; only those in `RESUME_MAY_CHANGE` may differ) and continues
it exactly: same batches, noise, learning rate and sparsity at every step. Resuming from an earlier
checkpoint than the newest, or from another folder's checkpoint into a folder that holds a run, is
refused unless ``--overwrite`` discards what would be mixed with it (the later checkpoints, the other run).

The run stops with one line (`video_sparse_attn.cli.CommandError`) and never writes a checkpoint past:
  - a non-finite loss or gradient norm: exit status 1, raised before the optimizer step, so the weights
    and every checkpoint stay finite (with fp16 loss scaling an overflowing step is skipped instead,
    as the scaler intends, and logged with ``"skipped": true``);
  - SIGINT / SIGTERM: the current optimizer step finishes, a checkpoint is saved, exit status 128 +
    the signal number; a second signal stops at once (no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
from typing import Any, Dict, List, Optional

import torch

from ..cli import CommandError, UsageError, add_ssta_arguments
from .args import ssta_config_from_args
from .checkpoints import (check_output_dir, complete_checkpoints, latest_checkpoint, publish_folder, read_settings,
                          save_checkpoint, step_of, verify_checkpoint)
from .context_parallel import group_batch, setup_context_parallel
from .data import LatentVideoDataset, collate_samples, make_synthetic_dataset
from .plot import plot_train_log
from .flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, flow_matching_loss, sample_sigmas
from ..families import family_of
from .models import latent_channels, latent_grid, load_transformer, text_dims, tiny_transformer, transformer_inputs
from .sparsity import SparsityRamp, set_sparse_attention

__all__ = ["train", "FINAL_FULL_DIR", "FINAL_LORA_DIR", "SSTA_CONFIG_NAME", "latest_checkpoint",
           "RESUME_MAY_CHANGE"]

logger = logging.getLogger(__name__)

FINAL_FULL_DIR = "transformer"
FINAL_LORA_DIR = "transformer_lora"
SSTA_CONFIG_NAME = "ssta_config.json"
ADAPTER_FILE = "lora_adapter.safetensors"
TINY_IMAGE_TOKENS = 8
RUN_ARGS_NAME = "run_args.json"
# arguments a resume may change: where and how often to save, how long to train, how to report, and
# choices that do not change the numbers (kernel backend, recomputation, loader processes)
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "overwrite", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "no_progress_bar", "dataloader_num_workers",
    "gradient_checkpointing", "backend"})


def _noise_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """A CPU generator per micro-batch: the same draws after a resume, independent across ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step * 7_919 + rank * 104_729) % (2**63))


def _open_dataset(root: str) -> LatentVideoDataset:
    try:
        return LatentVideoDataset(root)
    except (OSError, ValueError) as e:
        raise UsageError(f"--data {root!r}: {e}") from None


def _prepare_dataset(args: argparse.Namespace, transformer, accelerator) -> LatentVideoDataset:
    root = args.data
    if root is None:  # synthetic: (re)written unless the folder holds exactly what these settings ask for
        root = os.path.join(args.output_dir, "synthetic_data")
        dims = text_dims(transformer)
        want = {"family": family_of(transformer).name, "num_samples": args.synthetic_samples,
                "seed": args.seed,
                "latent_shape": [latent_channels(transformer), *args.synthetic_latent_thw],
                "text_dims": [dims["text_dim"], dims["text_dim_2"], dims["pooled_dim"]]}
        with accelerator.main_process_first():
            meta_path = os.path.join(root, "metadata.json")
            if accelerator.is_main_process:
                if os.path.isfile(meta_path):
                    with open(meta_path) as f:
                        meta = json.load(f)
                    if not meta.get("synthetic"):    # a dataset someone put there: never deleted
                        raise UsageError(f"{root} holds a dataset this command did not generate; pass it "
                                         f"with --data {root}, or move it out of --output-dir")
                    if {k: meta.get(k) for k in want} != want:
                        accelerator.print(f"{root}: synthetic data of other settings; writing it again")
                        shutil.rmtree(root)
                if not os.path.isfile(meta_path):
                    make_synthetic_dataset(root, args.synthetic_samples, want["latent_shape"],
                                           dims["text_dim"], text_dim_2=dims["text_dim_2"],
                                           pooled_dim=dims["pooled_dim"], family=want["family"],
                                           seed=args.seed)
    return _open_dataset(root)


def _check_dataset_fits(dataset: LatentVideoDataset, transformer, args: argparse.Namespace) -> None:
    """UsageError (one line) when the samples' text widths or latent sizes do not fit the model."""
    what = f"--data {dataset.root!r}" if args.data is not None else "--synthetic-latent-thw"
    dims = text_dims(transformer)
    for key, dim in (("prompt_embeds", "text_dim"), ("prompt_embeds_2", "text_dim_2"),
                     ("pooled_prompt_embeds", "pooled_dim")):
        widths = dataset.text_widths.get(key, set())
        if dims[dim] is not None and widths - {dims[dim]}:
            raise UsageError(f"{what}: {key} is {sorted(widths - {dims[dim]})[0]} wide, the model takes "
                             f"{dims[dim]}")
    patch = tuple(family_of(transformer).patch_thw(transformer))
    for thw in sorted(dataset.latent_thws):
        if any(n % p for n, p in zip(thw, patch)):
            raise UsageError(f"{what}: latent (T, H, W) {thw} is not a multiple of the model's patch {patch}")


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume from (None: a new run); a bad one → UsageError naming it."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    path = args.resume_from_checkpoint
    try:
        step_of(path)
        verify_checkpoint(path)
    except ValueError as e:
        raise UsageError(f"--resume-from-checkpoint: {e}") from None
    return path


def _resume_conflicts(args: argparse.Namespace, resume_path: Optional[str], previous: List[str]) -> List[str]:
    """What in --output-dir a resume from ``resume_path`` would be mixed with: the checkpoints after
    its step (it is this folder's) or the run the folder holds (it is another folder's). UsageError
    unless --overwrite; with it, the paths to discard."""
    if resume_path is None:
        return []
    step = step_of(resume_path)
    parent = os.path.dirname(os.path.normpath(os.path.abspath(resume_path)))
    if os.path.realpath(parent) == os.path.realpath(args.output_dir):
        later = [p for s, p in complete_checkpoints(args.output_dir) if s > step]
        if later and not args.overwrite:
            names = ", ".join(os.path.basename(p) for p in later)
            raise UsageError(f"--resume-from-checkpoint {resume_path}: {args.output_dir!r} holds {names} "
                             f"after step {step}; resume from 'latest', or pass --overwrite to discard them")
        return later
    if previous and not args.overwrite:
        names = ", ".join(sorted(os.path.basename(p) for p in previous)[:4])
        raise UsageError(f"--resume-from-checkpoint {resume_path} is another folder's checkpoint and "
                         f"--output-dir {args.output_dir!r} holds another run ({names}); pass an empty "
                         "--output-dir, or --overwrite to replace that run")
    return previous


def _run_settings(args: argparse.Namespace, target, num_processes: int) -> Dict[str, Any]:
    """The settings a resume must keep: every argument but `RESUME_MAY_CHANGE` and the SSTA flags
    (compared through the resolved SSTA config instead), paths made absolute."""
    probe = argparse.ArgumentParser(add_help=False)
    add_ssta_arguments(probe)
    ssta_flags = {a.dest for a in probe._actions}
    out = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and k not in ssta_flags}
    for k in ("model", "data"):
        out[k] = os.path.abspath(out[k]) if out.get(k) else None
    out.update(ssta_config=target.to_dict() if target else None, num_processes=num_processes)
    return json.loads(json.dumps(out, default=str))   # tuples → lists, as read back from the file


def _check_settings(resume_path: str, settings: Dict[str, Any], accelerator) -> None:
    """UsageError naming each setting that differs from the checkpoint's run."""
    saved = read_settings(resume_path)
    if saved is None:
        accelerator.print(f"{resume_path} holds no run settings (an older version wrote it); not compared")
        return
    diff = []
    for key in sorted(set(saved) | set(settings)):
        was, now = saved.get(key), settings.get(key)
        if isinstance(was, dict) and isinstance(now, dict):   # the SSTA config: name its fields
            diff += [f"{key}.{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
                     if was.get(k) != now.get(k)]
        elif was != now:
            diff.append(f"{key} {was} -> {now}")
    if diff:
        raise UsageError(f"--resume-from-checkpoint {resume_path} was written with other settings: "
                         f"{'; '.join(diff)}. A resume keeps them (the optimizer, scheduler and data order "
                         "come from the checkpoint); start a new run to change them")


def _truncate_log(log_path: str, step: int) -> int:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites the steps after it); lines that
    are not JSON (the end of a line a killed process was writing) are dropped. Returns how many."""
    if not os.path.isfile(log_path):
        return 0
    kept, torn = [], 0
    with open(log_path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(log_path, "w") as f:
        f.writelines(kept)
    return torn


class _StopSignals:
    """SIGINT / SIGTERM while training: the current optimizer step finishes, a checkpoint is saved, then
    `CommandError`. A second signal stops at once (KeyboardInterrupt). Installed in the main thread only."""

    def __init__(self, accelerator):
        self.accelerator, self.signum, self._previous = accelerator, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step, once a checkpoint is saved "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        flag = self.signum is not None
        if self.accelerator.num_processes > 1:   # every rank stops at the same step (saving is collective)
            t = torch.tensor([float(flag)], device=self.accelerator.device)
            flag = self.accelerator.reduce(t, "sum").item() > 0
        return flag

    def error(self, step: int, checkpoint: str) -> CommandError:
        signum = self.signum or signal.SIGTERM     # another rank's signal
        return CommandError(f"training stopped by {signal.Signals(signum).name} at step {step}; {checkpoint} "
                            "saved, continue with --resume-from-checkpoint latest",
                            exit_code=128 + int(signum))


def _diverged(what: str, value: float, step: int, output_dir: str) -> CommandError:
    last = latest_checkpoint(output_dir)
    return CommandError(f"training stopped: non-finite {what} ({value}) at step {step}, before the optimizer "
                        f"step (the weights are not updated); the last complete checkpoint is "
                        f"{last or 'none'}")


def _add_lora(transformer, args: argparse.Namespace) -> None:
    from peft import LoraConfig

    targets = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()} | {
        ".".join(name.split(".")[-2:]) for name, _ in transformer.named_modules()}
    targets = [t for t in targets if t in present]
    if not targets:
        raise ValueError(f"none of --lora-target-modules {args.lora_target_modules!r} exist in "
                         f"{type(transformer).__name__}")
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                       init_lora_weights="gaussian", target_modules=targets))


def _register_lora_state_hooks(accelerator, args) -> None:
    """Checkpoints of a LoRA run hold the adapter only (not the frozen base weights)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                          os.path.join(output_dir, ADAPTER_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(os.path.join(input_dir, ADAPTER_FILE)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint adapter has unexpected keys {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _release_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (the process group stays) so that `train` can run
    again in the same process with other settings (e.g. another mixed precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train(args: argparse.Namespace) -> Dict:
    """Run fine-tuning as ``args`` (see `args.build_parser`) says.

    Returns ``{"global_step", "losses" (this run's per-step losses), "final_dir", "ssta_config",
    "transformer" (the trained, unwrapped model, SSTA still installed)}``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # -- every user-facing check before the model is loaded
    try:
        previous = check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tiny = args.model is None
    target = ssta_config_from_args(args, tiny)
    if args.data is not None:
        _open_dataset(args.data)
    resume_path = _resume_path(args)
    if resume_path is None and args.resume_from_checkpoint and previous and not args.overwrite:
        raise UsageError(f"--resume-from-checkpoint latest: no complete checkpoint in {args.output_dir!r}, "
                         "which holds a run; pass --overwrite to start again there")
    if resume_path is not None:
        previous = _resume_conflicts(args, resume_path, previous)   # discarded in _train (with --overwrite)

    os.makedirs(args.output_dir, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    try:
        settings = _run_settings(args, target, accelerator.num_processes)
        if resume_path is not None:
            _check_settings(resume_path, settings, accelerator)
        return _train(args, accelerator, tiny, target, previous, resume_path, settings)
    except BaseException:
        _release_accelerate_state()  # a later `train` in this process starts clean
        raise


def _discard(paths: List[str], accelerator) -> None:
    """Delete ``paths`` (folders or files) on the main process; every process waits for it."""
    if accelerator.is_main_process:
        for path in paths:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def _train(args: argparse.Namespace, accelerator, tiny: bool, target, previous: List[str],
           resume_path: Optional[str], settings: Dict[str, Any]) -> Dict:
    """The run itself, once every argument is checked and the accelerator exists (see `train`)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    set_seed(args.seed)
    if args.overwrite and previous and not args.resume_from_checkpoint:
        _discard(previous, accelerator)                   # the replaced run

    # -- model
    transformer = tiny_transformer(args.tiny_family, seed=args.seed) if tiny else load_transformer(args.model)
    family = family_of(transformer).name
    image_tokens = args.image_tokens or (TINY_IMAGE_TOKENS if tiny else None)
    image_kw = {"image_tokens": image_tokens} if image_tokens else {}  # HunyuanVideo-1.5 only
    lora = args.lora_rank > 0
    transformer.requires_grad_(not lora)
    weight_dtype = torch.float32  # full fine-tune keeps fp32 master weights; autocast does the rest
    if lora:
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, weight_dtype)
        cast = {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}
        transformer.to(accelerator.device, **cast)
        _add_lora(transformer, args)
        cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA weights stay fp32
    else:
        transformer.to(accelerator.device)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    cp = setup_context_parallel(args, transformer, accelerator)   # --cp N: 1 when off
    params = [p for p in transformer.parameters() if p.requires_grad]

    # -- data and sparsity
    dataset = _prepare_dataset(args, transformer, accelerator)
    if dataset.family != family:
        raise UsageError(f"dataset {dataset.root!r} was written for {dataset.family!r}, model is {family!r}")
    _check_dataset_fits(dataset, transformer, args)
    grid = latent_grid(transformer, dataset.latent_shape[1:])
    ramp = SparsityRamp(target, grid, args.dense_warmup_steps, args.sparsity_ramp_steps) if target else None

    # -- optimisation
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                         collate_fn=collate_samples, num_workers=args.dataloader_num_workers,
                                         drop_last=len(dataset) >= args.train_batch_size)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, loader, lr_scheduler)
    if lora:
        _register_lora_state_hooks(accelerator, args)
    model = accelerator.unwrap_model(transformer)
    if accelerator.is_main_process and args.report_to:
        scalars = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("video_sparse_attn-finetune", config=scalars)
    # -- resume
    global_step = 0
    log_path = os.path.join(args.output_dir, "train_log.jsonl")
    if args.resume_from_checkpoint:
        if resume_path is None:
            accelerator.print("no checkpoint found under --output-dir; starting a new run")
        else:
            try:
                verify_checkpoint(resume_path)
                accelerator.load_state(resume_path)
            except Exception as e:  # a corrupt file surfaces as any of several library errors
                raise UsageError(f"checkpoint {resume_path} cannot be loaded ({type(e).__name__}: {e})") from e
            global_step = step_of(resume_path)
            accelerator.print(f"resumed from {resume_path} at step {global_step}")
            if args.overwrite and previous:   # only now: a checkpoint that fails to load discards nothing
                _discard(previous, accelerator)           # the checkpoints after it, or the replaced run
        if accelerator.is_main_process and _truncate_log(log_path, global_step):
            accelerator.print(f"{log_path}: dropped a torn line (the previous process stopped while "
                              "writing it)")

    if accelerator.is_main_process:  # the values this run actually uses (defaults and tiny choices resolved)
        used = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
        used.update(ssta_config=target.to_dict() if target else None, latent_grid=list(grid),
                    image_tokens=image_tokens, family=family, num_processes=accelerator.num_processes)
        with open(os.path.join(args.output_dir, RUN_ARGS_NAME), "w") as f:
            json.dump(used, f, indent=2, default=str)

    steps_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    current = ramp.config_at(global_step) if ramp else None
    stats = None
    if target is not None:
        from ..processors import SSTAStats

        stats = SSTAStats(time=False)  # block density of every SSTA call, read once per step
    set_sparse_attention(model, current, args.backend, stats)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=args.no_progress_bar or not accelerator.is_local_main_process)
    losses: List[float] = []
    micro_step = first_epoch * len(loader) + skip_batches  # micro-batches drawn before (noise seeds)
    accum_loss, accum_count = 0.0, 0
    fp16_scaler = getattr(accelerator, "scaler", None) is not None
    clip = args.max_grad_norm if args.max_grad_norm > 0 else math.inf   # inf: the norm, not clipped
    transformer.train()
    with _StopSignals(accelerator) as stop:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= args.max_train_steps:
                break
            loader.set_epoch(epoch)
            batches = loader
            if epoch == first_epoch and skip_batches:  # resume mid-epoch: same order, seen batches skipped
                batches = accelerator.skip_first_batches(loader, skip_batches)
            for batch in batches:
                with accelerator.accumulate(transformer):
                    batch = group_batch(batch, cp)
                    gen = _noise_generator(args.seed, micro_step, accelerator.process_index // cp)
                    latents = batch["latents"]
                    sigmas = sample_sigmas(latents.shape[0], gen, args.weighting_scheme, args.timestep_shift)
                    noisy, target_v = add_noise(latents, sigmas, gen)
                    timesteps = sigmas.to(noisy.device) * NUM_TRAIN_TIMESTEPS
                    kwargs = transformer_inputs(model, batch, noisy.to(weight_dtype), timesteps,
                                                args.guidance_scale, **image_kw)
                    with accelerator.autocast():
                        pred = transformer(**kwargs)[0]
                    loss = flow_matching_loss(pred, target_v)
                    mean_loss = accelerator.reduce(loss.detach(), "mean").item()  # the same on every rank
                    if not math.isfinite(mean_loss):
                        raise _diverged("loss", mean_loss, global_step + 1, args.output_dir)
                    accelerator.backward(loss * cp if cp > 1 else loss)   # see context_parallel
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(params, clip)
                        if norm is not None and not fp16_scaler and not math.isfinite(float(norm)):
                            raise _diverged("gradient norm", float(norm), global_step + 1, args.output_dir)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_step += 1
                accum_loss += mean_loss
                accum_count += 1

                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                # the mean over the micro-batches of this step (fewer at the end of an epoch)
                record = {"step": global_step, "loss": accum_loss / accum_count,
                          "lr": lr_scheduler.get_last_lr()[0]}
                if fp16_scaler and accelerator.optimizer_step_was_skipped:
                    record["skipped"] = True   # fp16 loss scaling: gradients overflowed, the step was skipped
                if current is not None:
                    record.update(sparse_type=current.sparse_type, topk=current.topk,
                                  window=list(current.kernel_thw))
                    if stats.records:
                        record["density"] = stats.summary()["mean_density"]
                        stats.reset()
                losses.append(record["loss"])
                accum_loss, accum_count = 0.0, 0
                density = {"density": f"{record['density']:.2f}"} if "density" in record else {}
                progress.set_postfix(loss=f"{record['loss']:.4f}", **density)
                accelerator.log(record, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if ramp is not None and ramp.config_at(global_step) != current:
                    current = ramp.config_at(global_step)
                    set_sparse_attention(model, current, args.backend, stats)
                saved = None
                if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                    saved = save_checkpoint(accelerator, args.output_dir, global_step,
                                            args.checkpoints_total_limit, settings)
                if stop.requested():
                    saved = saved or save_checkpoint(accelerator, args.output_dir, global_step,
                                                     args.checkpoints_total_limit, settings)
                    progress.close()
                    raise stop.error(global_step, saved)
                if global_step >= args.max_train_steps:
                    break
    progress.close()

    # -- final weights + SSTA config beside them
    accelerator.wait_for_everyone()
    final_dir = os.path.join(args.output_dir, FINAL_LORA_DIR if lora else FINAL_FULL_DIR)
    if accelerator.is_main_process:
        def write(folder):   # into a temporary folder, renamed when complete (a crash keeps the old one)
            if lora:
                model.save_lora_adapter(folder)
            else:
                model.save_pretrained(folder, safe_serialization=True)
            if target is not None:
                target.save(os.path.join(folder, SSTA_CONFIG_NAME))

        publish_folder(final_dir, write)
        plot_train_log(log_path)
    accelerator.end_training()
    _release_accelerate_state()
    return {"global_step": global_step, "losses": losses, "final_dir": final_dir, "ssta_config": target,
            "transformer": model}
