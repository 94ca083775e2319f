"""The training loop: ``train_and_evaluate(config)`` and ``evaluate_checkpoint(config)``.

Sections: setup (mesh, dataset, model, optimizer) -> state (fresh / fine-tune / resume,
created already sharded) -> jitted steps -> loop (progress, metrics, NaN check,
checkpoints, SIGTERM) -> final eval, plot, fused export of the EMA weights.

Under ``jax.jit`` with the batch sharded over the mesh, BatchNorm statistics are
computed over the *global* batch (sync-BN); Apple's PyTorch DDP run normalised per GPU
(128 images).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from fastvit_jax.training import checkpoint as ckpt_lib
from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training.config import TrainConfig, check_or_write_workdir_config
from fastvit_jax.training.ema import ema_update
from fastvit_jax.training.losses import eval_sums, soft_cross_entropy, topk_correct
from fastvit_jax.training.metrics import MetricWriter, plot_curves
from fastvit_jax.training.mixup import mixup_cutmix
from fastvit_jax.training.optimizer import lr_schedule, make_optimizer
from fastvit_jax.training.state import TrainState, create_state

log = logging.getLogger("fastvit_jax.training")

EXPORT_DIRNAME = "export"


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN/Inf; carries the step number."""

    def __init__(self, step: int, loss: float, last_checkpoint: Optional[int]):
        self.step = step
        self.loss = loss
        self.last_checkpoint = last_checkpoint
        where = f"step {last_checkpoint}" if last_checkpoint is not None else "none saved yet"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}; the run was stopped and the bad state was "
            f"not saved. Last good checkpoint: {where}. Try a lower --lr, --clip_grad, or float32."
        )


def create_model(*args, **kwargs):  # indirection so tests can substitute a tiny model
    import fastvit_jax

    return fastvit_jax.create_model(*args, **kwargs)


def resolve_dtype(name: str):
    if name in (None, "", "auto"):
        return jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu", "cuda", "rocm") else jnp.float32
    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]


@dataclasses.dataclass
class Plan:
    """Step counts derived from the config and the dataset size."""

    steps_per_epoch: int
    schedule_steps: int  # cosine length T
    warmup_steps: int
    total_steps: int  # steps this run trains to


def make_plan(config: TrainConfig, num_train: int) -> Plan:
    spe = num_train // config.global_batch_size
    if spe < 1:
        raise ValueError(
            f"the training split has {num_train} examples, fewer than one global batch "
            f"({config.global_batch_size}); lower --global_batch_size"
        )
    if config.num_epochs is not None:
        schedule = int(round(config.num_epochs * spe))
        total = schedule + int(round(config.cooldown_epochs * spe))
        if config.num_steps is not None:
            total = min(total, config.num_steps)
    else:
        schedule = total = int(config.num_steps)
    warm = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_epochs * spe))
    return Plan(spe, max(schedule, 1), warm, total)


# ------------------------------------------------------------------------------------------
# Pretrained / exported weights.


def _flat(tree) -> Dict[tuple, Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree)


def _is_head(key: tuple) -> bool:
    return len(key) >= 1 and key[0] == "head"


def merge_pretrained(fresh: dict, loaded: dict) -> tuple:
    """Loaded weights into the fresh variables; the head is kept fresh if its shape differs.

    Returns (variables, notes). Raises ValueError on a structural mismatch outside the head.
    """
    out, notes = {}, []
    for col in ("params", "batch_stats"):
        f = _flat(fresh.get(col, {}))
        l_ = _flat(loaded.get(col, {}))
        missing = [k for k in f if k not in l_ and not _is_head(k)]
        extra = [k for k in l_ if k not in f and not _is_head(k)]
        bad = [k for k in f if k in l_ and tuple(np.shape(l_[k])) != tuple(f[k].shape) and not _is_head(k)]
        if missing or extra or bad:
            show = lambda ks: ", ".join("/".join(k) for k in ks[:5]) + (" ..." if len(ks) > 5 else "")  # noqa: E731
            msg = [f"the checkpoint does not match the train-form model ({col}):"]
            if missing:
                msg.append(f"  missing {len(missing)}: {show(missing)}")
            if extra:
                msg.append(f"  unexpected {len(extra)}: {show(extra)}")
            if bad:
                msg.append(f"  wrong shape {len(bad)}: {show(bad)}")
            msg.append("(a fused/reparameterized export can be evaluated with --eval_only but not fine-tuned)")
            raise ValueError("\n".join(msg))
        merged = {}
        head_reset = False
        for k, v in f.items():
            if k in l_ and tuple(np.shape(l_[k])) == tuple(v.shape):
                merged[k] = jnp.asarray(l_[k], v.dtype)
            else:
                merged[k] = v
                head_reset = head_reset or _is_head(k)
        if head_reset:
            notes.append(f"new classifier head ({col}): checkpoint head shape differs from num_classes")
        out[col] = traverse_util.unflatten_dict(merged)
    return out, notes


def load_checkpoint_variables(path: str) -> dict:
    import fastvit_jax

    v = fastvit_jax.load_variables(path)
    return {k: v[k] for k in ("params", "batch_stats") if k in v}


def _tree_matches(a: dict, b: dict) -> bool:
    fa, fb = _flat(a), _flat(b)
    return set(fa) == set(fb) and all(tuple(np.shape(fa[k])) == tuple(fb[k].shape) for k in fa)


# ------------------------------------------------------------------------------------------
# Steps.


def make_train_step(model, tx, schedule, config: TrainConfig, num_classes: int) -> Callable:
    def train_step(state: TrainState, batch: dict, base_key: jax.Array):
        rng = jax.random.fold_in(base_key, state.step)
        k_mix, k_drop = jax.random.split(rng)
        images, targets, _ = mixup_cutmix(
            k_mix,
            batch["image"],
            batch["label"],
            num_classes=num_classes,
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing,
        )

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                rngs={"dropout": k_drop},
                mutable=["batch_stats"],
            )
            return soft_cross_entropy(logits, targets), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        batch_stats = updates.get("batch_stats", state.batch_stats)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, config.ema_decay),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, config.ema_decay),
        )
        metrics = {
            "loss": loss,
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
            "top1": topk_correct(logits, batch["label"], 1).mean(),
        }
        return new_state, metrics

    return train_step


def make_eval_step(model, *, with_ema: bool = True) -> Callable:
    def eval_step(variables_pair, batch):
        out = {}
        for prefix, variables in variables_pair.items():
            logits = model.apply(variables, batch["image"], train=False)
            sums = eval_sums(logits, batch["label"], batch["mask"])
            out.update({f"{prefix}{k}": v for k, v in sums.items()})
        return out

    return eval_step


# ------------------------------------------------------------------------------------------
# Helpers.


def _to_host(tree):
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _make_augment(config: TrainConfig):
    from fastvit_jax.data.pipeline import TrainAugment

    return TrainAugment(
        randaugment=config.randaugment or None,
        random_erase_prob=config.reprob,
        color_jitter=config.color_jitter,
        rrc_scale=tuple(config.rrc_scale),
        hflip=config.hflip,
    )


class _SigtermFlag:
    """Installs a SIGTERM handler that sets a flag (main thread only); restores on exit."""

    def __init__(self):
        self.flag = threading.Event()
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: will checkpoint and stop after the current step")
        self.flag.set()

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
        return False

    def is_set(self) -> bool:
        if jax.process_count() > 1:  # every host must agree, or the collective save hangs
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([self.flag.is_set()], np.int32))
            return bool(np.asarray(flags).any())
        return self.flag.is_set()


def run_eval(eval_fn, variables_pair, config: TrainConfig, mesh, *, num_classes: int) -> Dict[str, float]:
    """One pass over the validation split; returns mean loss / top1 / top5 per prefix."""
    from fastvit_jax.data.pipeline import device_prefetch, make_eval_dataset

    bs = config.eval_batch_size or config.global_batch_size
    div = math.lcm(mesh_lib.batch_size_divisor(mesh), jax.process_count())
    bs = max(div, (bs // div) * div)
    ds = make_eval_dataset(
        config.dataset,
        config.data_dir,
        batch_size=bs,  # global
        image_size=config.image_size,
        crop_pct=config.eval_crop_pct,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    it = device_prefetch(ds, mesh_lib.batch_sharding(mesh))
    totals: Dict[str, float] = {}
    pending = []
    for batch in it:
        pending.append(eval_fn(variables_pair, {k: batch[k] for k in ("image", "label", "mask")}))
    for sums in jax.device_get(pending):
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {}
    for prefix in variables_pair:
        n = max(totals.get(f"{prefix}count", 0.0), 1.0)
        for k in ("loss", "top1", "top5"):
            out[f"{prefix}{k}"] = totals.get(f"{prefix}{k}", float("nan")) / n
    out["num_examples"] = totals.get(f"{next(iter(variables_pair))}count", 0.0)
    return out


def _export_fused(workdir: str, variables: dict, config: TrainConfig, step: int, extra: dict) -> str:
    import fastvit_jax

    host = _to_host(variables)
    fused = fastvit_jax.reparameterize(host)
    path = os.path.join(workdir, EXPORT_DIRNAME, f"fastvit_{config.variant}_ema_fused.safetensors")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = {
            "variant": config.variant,
            "num_classes": str(config.num_classes),
            "image_size": str(config.image_size),
            "step": str(step),
            "dataset": config.dataset,
            "weights": "ema",
            "inference_mode": "true",
            **{k: str(v) for k, v in extra.items()},
        }
        fastvit_jax.save_variables(path, fused, metadata=meta)
    return path


# ------------------------------------------------------------------------------------------
# Model, optimizer and the jitted functions. Cached per (config fields that shape them,
# mesh), so a restart in the same process (tests, notebooks) reuses the compilations.

_BUILD_FIELDS = (
    "variant", "num_classes", "drop_path", "image_size", "global_batch_size", "lr", "base_batch_size",
    "warmup_lr", "min_lr", "weight_decay", "clip_grad", "mixup", "cutmix", "mixup_switch_prob",
    "label_smoothing", "ema_decay", "fsdp_min_size",
)
_BUILD_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_BUILD_CACHE_SIZE = 4


@dataclasses.dataclass
class _Built:
    model: Any
    tx: Any
    schedule: Callable
    abstract: Any
    shardings: Any
    repl: Any
    batch_sharding: Any
    init_variables: Callable  # rng -> variables (host-side use)
    init_state: Callable  # rng -> sharded TrainState
    state_from_variables: Callable  # variables -> sharded TrainState
    train_step: Callable
    eval_step: Callable


def _build(config: TrainConfig, plan: Plan, mesh, dtype) -> _Built:
    key = (create_model, str(jnp.dtype(dtype)), plan.schedule_steps, plan.warmup_steps, mesh,
           *(getattr(config, f) for f in _BUILD_FIELDS))
    if key in _BUILD_CACHE:
        _BUILD_CACHE.move_to_end(key)
        return _BUILD_CACHE[key]
    model = create_model(config.variant, num_classes=config.num_classes, drop_path_rate=config.drop_path, dtype=dtype)
    schedule = lr_schedule(
        config.peak_lr,
        total_steps=plan.schedule_steps,
        warmup_steps=plan.warmup_steps,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
    )
    tx = make_optimizer(schedule, weight_decay=config.weight_decay, clip_grad=config.clip_grad)
    x0 = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)

    def init_variables(r):
        return _init(model, x0, r)

    abstract = jax.eval_shape(lambda r: create_state(init_variables(r), tx), jax.random.PRNGKey(0))
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=config.fsdp_min_size)
    repl = mesh_lib.replicated(mesh)
    bsh = mesh_lib.batch_sharding(mesh)
    built = _Built(
        model=model,
        tx=tx,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        repl=repl,
        batch_sharding=bsh,
        init_variables=jax.jit(init_variables),
        init_state=jax.jit(lambda r: create_state(init_variables(r), tx), out_shardings=shardings),
        state_from_variables=jax.jit(lambda v: create_state(v, tx), out_shardings=shardings),
        # The step: explicit shardings, the state donated.
        train_step=jax.jit(
            make_train_step(model, tx, schedule, config, config.num_classes),
            in_shardings=(shardings, {"image": bsh, "label": bsh}, repl),
            out_shardings=(shardings, repl),
            donate_argnums=(0,),
        ),
        eval_step=jax.jit(make_eval_step(model), out_shardings=repl),
    )
    _BUILD_CACHE[key] = built
    while len(_BUILD_CACHE) > _BUILD_CACHE_SIZE:
        _BUILD_CACHE.popitem(last=False)
    return built


# ------------------------------------------------------------------------------------------
# Main entry points.


def _setup(config: TrainConfig):
    from fastvit_jax.data.pipeline import dataset_info

    info = dataset_info(config.dataset, config.data_dir)  # DatasetNotFoundError propagates
    num_classes = config.num_classes or info.num_classes
    if config.num_classes and config.num_classes != info.num_classes:
        raise ValueError(f"--num_classes {config.num_classes} but dataset {config.dataset!r} has {info.num_classes}")
    config = config.replace(num_classes=int(num_classes))
    mesh = mesh_lib.create_mesh(config.mesh)
    div = mesh_lib.batch_size_divisor(mesh)
    if config.global_batch_size % div or config.global_batch_size % jax.process_count():
        raise ValueError(
            f"--global_batch_size {config.global_batch_size} is not divisible by the {div} devices of the "
            f"batch axes of mesh {dict(mesh.shape)} (and {jax.process_count()} processes)"
        )
    return config, info, mesh


def train_and_evaluate(
    config: TrainConfig,
    *,
    step_callback: Optional[Callable[[int, Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Trains (resuming from ``<workdir>/checkpoints`` if present), evaluates, exports.

    Returns a summary dict: final_step, losses ({step: loss} seen by this process in this
    call), eval (final metrics), preempted, export_path, plot_path, resumed_from, state
    (the final TrainState), model (the train-form linen module), mesh.
    """
    from fastvit_jax.data.pipeline import device_prefetch, make_train_dataset

    t_start = time.perf_counter()
    config.validate()
    if config.eval_only:
        return evaluate_checkpoint(config)
    config, info, mesh = _setup(config)
    is_main = jax.process_index() == 0
    check_or_write_workdir_config(config.workdir, config, write=is_main)
    plan = make_plan(config, info.num_train)
    dtype = resolve_dtype(config.dtype)

    b = _build(config, plan, mesh, dtype)
    shardings, abstract, repl = b.shardings, b.abstract, b.repl

    # ---- State: fresh, fine-tuned from --init_from, or resumed; created sharded.
    init_rng, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
    checkpointer = ckpt_lib.Checkpointer(config.workdir, max_to_keep=config.keep_checkpoints)
    latest = checkpointer.latest_step()
    resumed_from = None
    if latest is not None:
        state = checkpointer.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), latest)
        resumed_from = int(latest)
        log.info("resumed from %s step %d", checkpointer.directory, latest)
        if config.init_from:
            log.info("--init_from ignored: resuming from the workdir's checkpoint")
    else:
        if config.init_from:
            fresh = jax.device_get(b.init_variables(init_rng))
            merged, notes = merge_pretrained(fresh, load_checkpoint_variables(config.init_from))
            for n in notes:
                log.warning(n)
            state = b.state_from_variables(merged)
        else:
            state = b.init_state(init_rng)
    start_step = int(jax.device_get(state.step))
    log.info("state ready at step %d (%.1fs since start)", start_step, time.perf_counter() - t_start)

    bsh, train_step, eval_step = b.batch_sharding, b.train_step, b.eval_step
    base_key = jax.device_put(base_key, repl)

    writer = MetricWriter(config.workdir, enabled=is_main)
    result: Dict[str, Any] = {
        "resumed_from": resumed_from,
        "losses": {},
        "preempted": False,
        "eval": None,
        "export_path": None,
        "plot_path": None,
        "workdir": os.path.abspath(config.workdir),
        "config": config,
        "plan": plan,
        "model": b.model,
        "mesh": mesh,
    }

    def do_eval(step):
        pair = {"": state.variables(False), "ema_": state.variables(True)}
        m = run_eval(eval_step, pair, config, mesh, num_classes=config.num_classes)
        writer.write(step, "eval", {k: v for k, v in m.items()})
        log.info(
            "eval step %d: top1 %.2f%% top5 %.2f%% loss %.4f | EMA top1 %.2f%% top5 %.2f%% loss %.4f",
            step, 100 * m["top1"], 100 * m["top5"], m["loss"], 100 * m["ema_top1"], 100 * m["ema_top5"],
            m["ema_loss"],
        )
        return m

    # ---- Loop.
    ds = make_train_dataset(
        config.dataset,
        config.data_dir,
        global_batch_size=config.global_batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=_make_augment(config),
    )
    batches = device_prefetch(ds, bsh)

    pbar = None
    if config.progress and is_main and start_step < plan.total_steps:
        from tqdm.auto import tqdm

        pbar = tqdm(total=plan.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    desc=f"fastvit_{config.variant}")

    pending = []  # (step, device metrics) not yet checked / logged
    last_saved = [latest]
    t_last = [time.perf_counter()]
    steps_since = [0]

    def flush(step):
        """Fetch pending metrics, stop on NaN/Inf, log averages. Returns the last loss."""
        if not pending:
            return None
        host = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending.clear()
        for s, m in zip(steps, host):
            if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                checkpointer.wait()
                raise NonFiniteLossError(s, float(m["loss"]), last_saved[0])
            result["losses"][s] = float(m["loss"])
        now = time.perf_counter()
        img_s = steps_since[0] * config.global_batch_size / max(now - t_last[0], 1e-9)
        t_last[0], steps_since[0] = now, 0
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        avg["img_per_s"] = img_s
        avg["epoch"] = step / plan.steps_per_epoch
        writer.write(step, "train", avg)
        if pbar is not None:
            pbar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{avg['lr']:.2e}", img_s=f"{img_s:.0f}")
        return avg["loss"]

    def save(step):
        flush(step)  # never save a state whose loss we have not checked
        if checkpointer.save(step, state):
            last_saved[0] = step

    step = start_step
    try:
        with _SigtermFlag() as sigterm:
            while step < plan.total_steps:
                batch = next(batches)
                state, metrics = train_step(state, {"image": batch["image"], "label": batch["label"]}, base_key)
                step += 1
                if step == start_step + 1:  # compilation: keep it out of img/s
                    jax.block_until_ready(metrics)
                    log.info("first step done (compilation included) %.1fs since start", time.perf_counter() - t_start)
                    t_last[0] = time.perf_counter()
                else:
                    steps_since[0] += 1
                pending.append((step, metrics))
                if pbar is not None:
                    pbar.update(1)
                if step % config.log_every == 0:
                    flush(step)
                if step_callback is not None:
                    step_callback(step, metrics)
                if step % config.checkpoint_every == 0 or step == plan.total_steps:
                    save(step)
                # Multi-host: agreeing on the flag is a collective, so only every log_every steps.
                if (jax.process_count() == 1 or step % config.log_every == 0) and sigterm.is_set():
                    save(step)
                    checkpointer.wait()
                    result["preempted"] = True
                    msg = f"preempted (SIGTERM) at step {step}: checkpoint saved to {checkpointer.directory}"
                    log.warning(msg)
                    if pbar is not None:
                        pbar.write(msg)
                    break
                if config.eval_every and step % config.eval_every == 0 and step < plan.total_steps:
                    flush(step)
                    do_eval(step)
            flush(step)
    finally:
        if pbar is not None:
            pbar.close()
        checkpointer.close()

    result["final_step"] = step
    result["state"] = state
    if result["preempted"]:
        writer.close()
        return result

    # ---- End: evaluate raw and EMA, plot, export the fused EMA weights.
    log.info("training done %.1fs since start", time.perf_counter() - t_start)
    result["eval"] = do_eval(step)
    log.info("final eval done %.1fs since start", time.perf_counter() - t_start)
    writer.close()
    if config.plot and is_main:
        result["plot_path"] = plot_curves(config.workdir)
    if config.export:
        result["export_path"] = _export_fused(
            config.workdir, state.variables(ema=True), config, step,
            {"ema_top1": f"{result['eval']['ema_top1']:.6f}"},
        )
    log.info("plot/export done %.1fs since start", time.perf_counter() - t_start)
    return result


def evaluate_checkpoint(config: TrainConfig) -> Dict[str, float]:
    """--eval_only: evaluate --init_from (safetensors file or a trainer workdir), or the workdir.

    A train-form file is evaluated as is; a fused (reparameterized) export with
    ``create_model(..., inference_mode=True)``. Orbax workdirs give raw and EMA metrics.
    """
    config, info, mesh = _setup(config)
    dtype = resolve_dtype(config.dtype)
    repl = mesh_lib.replicated(mesh)
    src = config.init_from or config.workdir
    x0 = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)

    if os.path.isdir(src):
        workdir = src
        if os.path.isdir(os.path.join(src, "checkpoints")) is False and os.path.basename(src.rstrip("/")) == "checkpoints":
            workdir = os.path.dirname(src.rstrip("/"))
        model = create_model(config.variant, num_classes=config.num_classes, dtype=dtype)
        # Same optimizer-state structure as the run that wrote it (only clip_grad changes it);
        # the optimizer state is restored and dropped.
        clip = config.clip_grad
        saved_cfg = os.path.join(workdir, "config.json")
        if os.path.exists(saved_cfg):
            with open(saved_cfg) as f:
                clip = TrainConfig.from_json(f.read()).clip_grad
        tx = make_optimizer(lr_schedule(1e-3, total_steps=1), weight_decay=0.05, clip_grad=clip)
        abstract = jax.eval_shape(lambda: create_state(_init(model, x0), tx))
        shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=config.fsdp_min_size)
        c = ckpt_lib.Checkpointer(workdir, async_save=False)
        if c.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint found under {c.directory}")
        state = c.restore(ckpt_lib.abstract_with_shardings(abstract, shardings))
        c.close()
        pair = {"": state.variables(False), "ema_": state.variables(True)}
    else:
        loaded = load_checkpoint_variables(src)
        fc = loaded["params"]["head"]["fc"]["kernel"]
        if fc.shape[-1] != config.num_classes:
            raise ValueError(
                f"{src} has a {fc.shape[-1]}-class head but dataset {config.dataset!r} has "
                f"{config.num_classes} classes"
            )
        train_model = create_model(config.variant, num_classes=config.num_classes, dtype=dtype)
        if _tree_matches(loaded.get("params", {}), jax.eval_shape(lambda: _init(train_model, x0))["params"]):
            model = train_model
        else:
            model = create_model(config.variant, num_classes=config.num_classes, dtype=dtype, inference_mode=True)
            if not _tree_matches(loaded.get("params", {}), jax.eval_shape(lambda: _init(model, x0))["params"]):
                raise ValueError(f"{src} matches neither the train-form nor the fused fastvit_{config.variant}")
        loaded.setdefault("batch_stats", {})
        pair = {"": jax.device_put(loaded, repl)}
    eval_step = jax.jit(make_eval_step(model), out_shardings=repl)
    m = run_eval(eval_step, pair, config, mesh, num_classes=config.num_classes)
    if jax.process_index() == 0 and config.workdir:
        MetricWriter(config.workdir, tensorboard=False).write(-1, "eval_only", m)
    return m


def _init(model, x0, rng=None):
    rng = jax.random.PRNGKey(0) if rng is None else rng
    v = model.init({"params": rng}, x0, train=False)
    v = flax.core.unfreeze(v) if isinstance(v, flax.core.FrozenDict) else dict(v)
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
