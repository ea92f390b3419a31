"""Training: config sections, optimizer, loss, sharded jitted steps, and the loop.

Top to bottom:
- Config: `TrainConfig`; `default_sections()` gives the 'train', 'mesh', 'checkpoint' and 'data'
  sections of a run config (`config.model` comes from the model's presets).
- Optimizer: AdamW with warmup + cosine decay, global-norm clipping, no weight decay on
  norms, biases and 1-D parameters (`make_optimizer`, `decay_mask`).
- Loss: masked mean cross-entropy with optional z-loss and logit soft-cap (`loss_sums`).
- `Trainer`: parameter and optimizer-state shardings from the model's logical axis names
  (`sharding.LOGICAL_AXIS_RULES`), and `jax.jit` train/eval steps with explicit in/out
  shardings (pjit). The model is split once into (graphdef, params); the steps are pure
  functions of a `TrainState` that rebuild the model with `nnx.merge` inside, under the mesh
  (`jax.sharding.use_abstract_mesh`), so `retention_kernel='pallas'` runs its kernels per
  device shard (`layers.run_retention`). Gradient accumulation is a scan over micro-batches
  inside the train step.
- Loop: `train_and_evaluate(config, workdir)`: resume, train, log, evaluate, sample,
  checkpoint, stop cleanly on SIGTERM or a non-finite loss, summarise.
- Inference: `restore_params`, `load_model` and `evaluate_checkpoint` read a workdir back
  (experiments/eval.py and experiments/generate.py are these calls).

Mixed precision is the model's business: `config.model.dtype` is the compute dtype and
`param_dtype` the parameter dtype; the optimizer state takes the parameters' dtype (float32).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from retnet_jax import data as data_lib
from retnet_jax import generate as generate_lib
from retnet_jax import model as model_lib
from retnet_jax import sharding
from retnet_jax.checkpoint import BEST_METRIC, CheckpointConfig, Checkpointer
from retnet_jax.checkpoint import check_resumable, load_config, save_config

__all__ = [
    "TrainConfig", "default_sections", "make_schedule", "decay_mask", "make_optimizer",
    "loss_sums", "TrainState", "Trainer", "make_trainer", "evaluate", "sample_text",
    "NonFiniteLossError", "train_and_evaluate", "restore_params", "inference_config",
    "load_model", "evaluate_checkpoint", "data_config", "from_section", "use_compilation_cache",
]

Params = Any  # nested dict of arrays, the model's nnx.Param values (`nnx.to_pure_dict`)
Batch = Mapping[str, jax.Array]

# Model config fields a saved model may be loaded with other values of (`inference_config`): how
# the same function of the same parameters is computed, not what was learned.
INFERENCE_MODEL_FIELDS = frozenset(
    {"dtype", "remat", "remat_policy", "scan_layers", "chunk_size", "retention_kernel",
     "decode_kernel", "max_seq_len", "attention_impl", "state_dtype", "decode_projections"})
# Model config fields that may change when resuming: those, and training choices that change
# the function but not which parameters there are.
RESUMABLE_MODEL_FIELDS = INFERENCE_MODEL_FIELDS | {"logit_soft_cap"}
# Data config fields that may change when resuming: they leave the training stream as it was.
RESUMABLE_DATA_FIELDS = frozenset({"eval_batches", "prefetch"})
SUMMARY_FILE = "summary.json"  # in the workdir: `train_and_evaluate`'s return value


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and sampling settings (the 'train' config section).

    Attributes:
        num_steps: optimizer steps in the whole run (the schedule's length).
        learning_rate: peak learning rate, reached after `warmup_steps` linear warmup.
        warmup_steps: linear warmup from 0.
        end_lr_ratio: the cosine decay ends at `learning_rate * end_lr_ratio`.
        b1, b2, eps: AdamW moments and epsilon.
        weight_decay: decoupled weight decay, on matrices only (see `decay_mask`).
        max_grad_norm: clip gradients to this global norm; 0 disables.
        grad_accum_steps: split each batch into this many micro-batches, accumulating
            gradients (same update as the whole batch at once, less activation memory).
        z_loss: coefficient of log(Z)^2 added to each counted token's loss (PaLM); 0 is off.
        seed: parameter initialisation and sampling seed (data order: `data.seed`).
        log_every: steps between metric logs (and NaN checks, and SIGTERM checks).
        eval_every: steps between evaluations (each followed by a sample and a checkpoint).
        sample_prompt: text a sample continues (after BOS); '' disables sampling.
        sample_tokens: new tokens per sample.
        sample_temperature: 0 is greedy.
        sample_top_k: keep the k likeliest tokens when sampling; 0 keeps all.
        tensorboard: also write TensorBoard events (if tensorboardX is installed).
        progress_bar: show a tqdm progress bar.
    """

    num_steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 20
    eval_every: int = 100
    sample_prompt: str = "def "
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    sample_top_k: int = 0
    tensorboard: bool = True
    progress_bar: bool = True


# Fields of `data.make_datasets`; None leaves data.py's default (a placeholder of that type).
DATA_DEFAULTS: dict[str, tuple[type, Any]] = {
    "name": (str, "stdlib"),
    "path": (str, None),
    "hf_subset": (str, None),
    "hf_split": (str, "train"),
    "text_field": (str, "text"),
    "seq_len": (int, 128),
    "batch_size": (int, 16),
    "seed": (int, 0),
    "eval_batches": (int, None),
    "max_bytes": (int, 2_000_000),
    "val_fraction": (float, 0.03),
    "num_kv_pairs": (int, None),
    "num_tokens": (int, None),
    "vocab_size": (int, None),
}


def default_sections() -> dict[str, ml_collections.ConfigDict]:
    """The 'train', 'mesh', 'checkpoint' and 'data' sections of a run config, with defaults."""
    data = ml_collections.ConfigDict()
    for key, (kind, value) in DATA_DEFAULTS.items():
        data[key] = ml_collections.config_dict.placeholder(kind) if value is None else value
    return {
        "train": ml_collections.ConfigDict(dataclasses.asdict(TrainConfig())),
        "mesh": ml_collections.ConfigDict(dataclasses.asdict(sharding.MeshConfig())),
        "checkpoint": ml_collections.ConfigDict(dataclasses.asdict(CheckpointConfig())),
        "data": data,
    }


def from_section(cls: type, section: Any) -> Any:
    """Builds the dataclass `cls` from a config section (ConfigDict, mapping or None).

    Missing fields take the dataclass defaults.

    Raises:
        ValueError: naming any field of the section that `cls` does not have (a typo).
    """
    values = dict(section.items()) if section is not None else {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return cls(**values)


def data_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.data` (default: `DATA_DEFAULTS`) as a dict for `data.make_datasets`; None
    fields are left out, so data.py's defaults apply."""
    section = config.get("data")
    values = dict(section.items()) if section is not None else {
        key: value for key, (_, value) in DATA_DEFAULTS.items()}
    return {key: value for key, value in values.items() if value is not None}


# ----------------------------------------------------------------------------- optimizer


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate by step: linear warmup to the peak, then cosine decay to the end value."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.end_lr_ratio)


_NO_DECAY_NAMES = ("norm", "bias", "scale")


def decay_mask(params: Params) -> Any:
    """True for parameters that get weight decay: >= 2-D and not a norm, bias or scale.

    Args:
        params: nested dict of arrays (or ShapeDtypeStructs).

    Returns:
        The same structure with a bool at each leaf.
    """
    def decays(path, leaf) -> bool:
        names = "/".join(str(getattr(k, "key", k)) for k in path).lower()
        return leaf.ndim >= 2 and not any(n in names for n in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with `schedule` and decay masked by `decay_mask`."""
    clip = (optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0
            else optax.identity())
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)


# ----------------------------------------------------------------------------- loss


def loss_sums(logits: jax.Array, batch: Batch, *, z_loss: float = 0.0
              ) -> dict[str, jax.Array]:
    """Sums over the counted targets of one batch (so micro-batches add up exactly).

    Args:
        logits: float [B, T, V]; computed in float32.
        batch: 'targets' int32 [B, T] and 'loss_mask' float32 [B, T].
        z_loss: coefficient of log(Z)^2 in the objective. (A logit soft-cap, if any, is
            applied by the model: `ModelConfig.logit_soft_cap`.)

    Returns:
        float32 scalars: 'objective' (cross-entropy + z-loss, what is differentiated),
        'loss' (cross-entropy), 'correct' (argmax hits) and 'tokens' (sum of loss_mask).
    """
    logits = logits.astype(jnp.float32)
    targets, mask = batch["targets"], batch["loss_mask"]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"objective": jnp.sum((nll + z_loss * jnp.square(log_z)) * mask),
            "loss": jnp.sum(nll * mask),
            "correct": jnp.sum(correct * mask),
            "tokens": jnp.sum(mask)}


# ----------------------------------------------------------------------------- trainer


class TrainState(NamedTuple):
    """Everything a step changes; a pytree.

    Attributes:
        step: int32 [], optimizer steps taken.
        params: the model's parameters (nested dict of arrays, `param_dtype`).
        opt_state: optax state of `Trainer.tx` (float32 moments shaped like params).
        rng: uint32 [2], the run's key; samples use `fold_in(rng, step)`.
    """

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array


class Trainer:
    """Sharded, jitted init/train/eval steps for one model config on one mesh.

    The model runs under the mesh's abstract mesh, so Pallas retention kernels run on each
    device's [batch, time, heads, dim] shard (batch over `sharding.BATCH_AXES`, heads over
    'tensor'; see `layers.retention_kernel_specs`).

    Attributes:
        graphdef: the model's structure; `nnx.merge(graphdef, params)` is the model.
        state_shardings: a TrainState of NamedShardings (params and optimizer moments by
            `sharding.LOGICAL_AXIS_RULES`, the rest replicated).
        abstract_state: a TrainState of ShapeDtypeStructs carrying those shardings.
        init: `() -> TrainState`, created directly sharded.
        train_step: `(TrainState, batch) -> (TrainState, metrics)`; donates its state.
        eval_step: `(params, batch) -> loss_sums` (without 'objective').
        loss_and_grads: `(params, batch) -> (grads, sums)`; mean gradients of the objective
            over the batch's counted tokens, and the `loss_sums` summed over micro-batches.
        Batches are dicts of global arrays [B, T] sharded by `sharding.batch_sharding`.
    """

    def __init__(self, model_config: Any, config: TrainConfig, mesh: Mesh):
        self.model_config, self.config, self.mesh = model_config, config, mesh
        self.graphdef, abstract_params, param_specs = _abstract_model(model_config)
        self.schedule = make_schedule(config)
        self.tx = make_optimizer(config, self.schedule)
        repl = sharding.replicated(mesh)
        param_shardings = sharding.tree_shardings(abstract_params, param_specs, mesh)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt,
                                              param_shardings,
                                              transform_non_params=lambda _: repl)
        self.state_shardings = TrainState(step=repl, params=param_shardings,
                                          opt_state=opt_shardings, rng=repl)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._init), self.state_shardings)
        batch = sharding.batch_sharding(mesh)
        self._micro_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
        self.init = jax.jit(self._init, out_shardings=self.state_shardings)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch),
                                  out_shardings=(self.state_shardings, repl),
                                  donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(param_shardings, batch),
                                 out_shardings=repl)
        self.loss_and_grads = jax.jit(self._loss_and_grads,
                                      in_shardings=(param_shardings, batch),
                                      out_shardings=(param_shardings, repl))

    def model(self, params: Params) -> Any:
        """The model with `params` (for sampling or inspection)."""
        return nnx.merge(self.graphdef, params)

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ValueError unless each micro-batch splits evenly over the batch axes."""
        k = self.config.grad_accum_steps
        shards = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
        if k < 1 or batch_size % k or (batch_size // k) % shards:
            raise ValueError(
                f"data.batch_size={batch_size} must split into train.grad_accum_steps={k} "
                f"micro-batches whose size is divisible by the mesh's batch axes "
                f"{sharding.BATCH_AXES} (total size {shards})")

    def _init(self) -> TrainState:
        init_key, rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
        model = model_lib.RetNetLM(self.model_config, rngs=nnx.Rngs(init_key))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params), rng=rng)

    def _sums(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        # The mesh in context while tracing lets `layers.run_retention` run the Pallas kernels
        # per shard (shard_map); the arrays' shardings come from the steps' in_shardings.
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            logits = nnx.merge(self.graphdef, params)(batch["inputs"])
        return loss_sums(logits, batch, z_loss=self.config.z_loss)

    def _grads_and_sums(self, params: Params, batch: Batch) -> tuple[Params, dict]:
        """Gradients of the summed objective of one (micro-)batch, and its sums."""
        def objective(p):
            sums = self._sums(p, batch)
            return sums["objective"], sums
        return jax.grad(objective, has_aux=True)(params)

    def _loss_and_grads(self, params: Params, batch: Batch) -> tuple[Params, dict]:
        k = self.config.grad_accum_steps
        if k == 1:
            grads, sums = self._grads_and_sums(params, batch)
        else:
            micro = jax.tree.map(self._split_micro, batch)

            def add(total, micro_batch):
                return jax.tree.map(jnp.add, total, self._grads_and_sums(params, micro_batch)), None

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                 jax.eval_shape(self._grads_and_sums, params,
                                                jax.tree.map(lambda x: x[0], micro)))
            (grads, sums), _ = jax.lax.scan(add, zeros, micro)
        scale = 1.0 / jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
        return grads, sums

    def _split_micro(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [k, B / k, ...]; micro-batch i is rows i, i + k, ... (shard-local)."""
        k = self.config.grad_accum_steps
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, self._micro_sharding)

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        grads, sums = self._loss_and_grads(state.params, batch)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        tokens = jnp.maximum(sums["tokens"], 1.0)
        metrics = {"loss": sums["loss"] / tokens, "accuracy": sums["correct"] / tokens,
                   "grad_norm": optax.tree.norm(grads),
                   "update_norm": optax.tree.norm(updates),
                   "learning_rate": self.schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    def _eval_step(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        sums = self._sums(params, batch)
        del sums["objective"]
        return sums


def _abstract_model(model_config: Any) -> tuple[nnx.GraphDef, Params, Any]:
    """(graphdef, abstract params, logical PartitionSpecs) of the model, without allocating.

    Raises:
        ValueError: if the model holds state other than nnx.Param (the steps would drop it).
    """
    abstract = nnx.eval_shape(lambda: model_lib.RetNetLM(model_config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-Param state, which the train step does not "
                         f"carry: {rest}")
    specs = nnx.get_partition_spec(params)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(specs)


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Trainer:
    """A Trainer from a run config (`config.model`, `config.train`, `config.mesh`).

    Trainers are cached by (model config, train config, mesh), so repeated runs in one
    process (notebooks, tests, resuming) reuse the compiled steps.
    """
    mesh = mesh or sharding.make_mesh(from_section(sharding.MeshConfig, config.get("mesh")))
    return _cached_trainer(model_lib.ModelConfig.from_config(config.model),
                           from_section(TrainConfig, config.get("train")), mesh)


_cached_trainer = functools.lru_cache(maxsize=4)(Trainer)


# ----------------------------------------------------------------------------- eval, sample


def evaluate(trainer: Trainer, params: Params, batches: Iterable[Mapping[str, np.ndarray]]
             ) -> dict[str, float]:
    """Loss over this host's rows of evaluation batches (all hosts must call it together).

    Args:
        trainer: gives `eval_step` and the mesh.
        params: the parameters.
        batches: numpy batches from `data` ({'inputs', 'targets', 'loss_mask'}: [b, T]).

    Returns:
        'eval_loss' (nats per counted token), 'eval_bits_per_byte' (eval_loss / ln 2; for
        byte-level text each token is a byte), 'eval_perplexity', 'eval_accuracy',
        'eval_tokens'.
    """
    totals = None
    for batch in batches:
        sums = trainer.eval_step(params, sharding.put_batch(batch, trainer.mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("the evaluation data has no batches")
    totals = jax.device_get(totals)
    tokens = max(float(totals["tokens"]), 1.0)
    loss = float(totals["loss"]) / tokens
    return {"eval_loss": loss, "eval_bits_per_byte": loss / math.log(2),
            "eval_perplexity": math.exp(min(loss, 80.0)),
            "eval_accuracy": float(totals["correct"]) / tokens, "eval_tokens": tokens}


def sample_text(model: Any, prompt: str, *, max_new_tokens: int, temperature: float,
                rng: jax.Array, top_k: int = 0, top_p: float | None = None,
                num_samples: int = 1) -> list[str]:
    """Continues BOS + `prompt` `num_samples` times with `generate`, stopping at EOS.

    Args:
        model: a RetNetLM.
        prompt: text; its UTF-8 bytes are the prompt tokens.
        max_new_tokens, temperature, top_p: as `generate.generate`; top_k 0 keeps all tokens.
        rng: PRNG key (unused when temperature is 0).
        num_samples: independent continuations, generated as one batch.

    Returns:
        `num_samples` strings, each the prompt followed by its continuation.
    """
    prompt_ids = np.concatenate([[data_lib.BOS], data_lib.encode(prompt)]).astype(np.int32)
    outputs = generate_lib.generate(model, [prompt_ids] * num_samples,
                                    max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k or None, top_p=top_p,
                                    stop_tokens=(data_lib.EOS,), rng=rng)
    return [prompt + data_lib.decode(ids) for ids in outputs]


# ----------------------------------------------------------------------------- loop helpers


class NonFiniteLossError(RuntimeError):
    """The loss, gradient norm or update norm became NaN or Inf; the run stopped."""


class StopSignal:
    """While entered, SIGTERM only sets a flag, which the loop turns into save-and-exit.

    Signal handlers can only be installed from the main thread; elsewhere SIGTERM keeps its
    default behaviour.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process got the signal (a collective: every process must call it)."""
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


class MetricsWriter:
    """Metrics to `<workdir>/metrics.jsonl` and, optionally, TensorBoard; process 0 only.

    tensorboardX is imported lazily; without it only JSONL is written.
    """

    def __init__(self, workdir: str, *, tensorboard: bool):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("tensorboardX is not installed: writing metrics.jsonl only")
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        """One JSONL record; floats go to TensorBoard as scalars, strings as text."""
        if not self._active:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, str):
                    self._tb.add_text(key, value, step)
                else:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _print(*lines: str) -> None:
    """Prints on process 0, above the progress bar."""
    if jax.process_index() == 0:
        for line in lines:
            tqdm.write(line)


_FINITE_METRICS = ("loss", "grad_norm", "update_norm")  # finite => the new params are finite


def _check_finite(window: list[dict[str, float]], first_step: int,
                  checkpointer: Checkpointer) -> None:
    """Raises NonFiniteLossError at the first step of `window` with a NaN/Inf loss or norm."""
    for offset, metrics in enumerate(window):
        if not all(math.isfinite(metrics[key]) for key in _FINITE_METRICS):
            checkpointer.wait()
            raise NonFiniteLossError(
                f"step {first_step + offset}: loss {metrics['loss']}, grad norm "
                f"{metrics['grad_norm']}, update norm {metrics['update_norm']}: stopping. "
                f"The last good checkpoint, step {checkpointer.latest_step()}, is kept in "
                f"{checkpointer.directory}. Try a "
                "lower train.learning_rate, longer train.warmup_steps, or train.z_loss=1e-4.")


def _mean(window: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([m[key] for m in window])) for key in window[0]}


def _resume_or_init(trainer: Trainer, checkpointer: Checkpointer,
                    train_data: data_lib.BatchIterator, config: ml_collections.ConfigDict,
                    workdir: str) -> TrainState:
    """The latest checkpoint's state (data iterator repositioned) or a fresh one.

    Raises:
        ValueError: naming the fields, if the workdir's model or data config differs from
            `config`'s (beyond RESUMABLE_MODEL_FIELDS / RESUMABLE_DATA_FIELDS).
    """
    step = checkpointer.latest_step()
    if step is None:
        save_config(workdir, config)
        # A summary left by a run whose checkpoints were deleted must not outlive them.
        stale = os.path.join(workdir, SUMMARY_FILE)
        if jax.process_index() == 0 and os.path.exists(stale):
            os.remove(stale)
        return trainer.init()
    saved_config = load_config(workdir)
    saved = dataclasses.asdict(model_lib.ModelConfig.from_config(saved_config.model))
    check_resumable(saved, dataclasses.asdict(trainer.model_config), RESUMABLE_MODEL_FIELDS)
    check_resumable(data_config(saved_config), data_config(config), RESUMABLE_DATA_FIELDS,
                    what="data config")
    abstract = trainer.abstract_state
    params, rest, data_state = checkpointer.restore(
        step, params=abstract.params,
        train={"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng})
    train_data.set_state(data_state)
    _print(f"resumed from {checkpointer.directory} step {step}")
    return TrainState(rest["step"], params, rest["opt_state"], rest["rng"])


def _save(checkpointer: Checkpointer, state: TrainState, train_data: data_lib.BatchIterator,
          metrics: Mapping[str, float] | None) -> None:
    checkpointer.save(int(state.step), params=state.params,
                      train={"step": state.step, "opt_state": state.opt_state,
                             "rng": state.rng},
                      data=train_data.get_state(), metrics=metrics)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains `config.model` on `config.data`, resuming from `workdir` if it has checkpoints.

    Logs to `<workdir>/metrics.jsonl` (and TensorBoard), evaluates and samples every
    `train.eval_every` steps and at the end, checkpoints (see `checkpoint`), and writes
    `<workdir>/summary.json`. SIGTERM saves a checkpoint and returns early. Called again on
    a run that already finished, it returns the run's summary.json unchanged (or, if none
    was written, evaluates the final checkpoint).

    Args:
        config: run config with sections model, data, train, mesh, checkpoint.
        workdir: directory for config.json, checkpoints, metrics and the summary.
        stop_at_step: save and return after this global step (the schedule still spans
            `train.num_steps`); None runs to the end.

    Returns:
        The run summary (also in summary.json): steps, wall time, tokens/s, epochs (times the
        training tokens cover a text corpus; None for tasks), last evaluation, the data's
        unigram entropy, the last sample, and whether the run completed.

    Raises:
        NonFiniteLossError: if the loss becomes NaN/Inf; the last good checkpoint is kept.
        ValueError: for an inconsistent config, naming the fields.
    """
    wall_start = time.time()
    train_config = from_section(TrainConfig, config.get("train"))
    trainer = make_trainer(config)
    datasets = data_lib.make_datasets(data_config(config), process_index=jax.process_index(),
                                      process_count=jax.process_count())
    _check_vocab(trainer.model_config.vocab_size, datasets)
    trainer.check_batch_size(datasets.train.batch_size)
    checkpoint_config = from_section(CheckpointConfig, config.get("checkpoint"))
    checkpointer = Checkpointer(workdir, checkpoint_config)
    writer = MetricsWriter(workdir, tensorboard=train_config.tensorboard)
    try:
        state = _resume_or_init(trainer, checkpointer, datasets.train, config, workdir)
        finished = _finished_summary(workdir, int(state.step), train_config.num_steps)
        if finished is not None:
            _print(f"{workdir} finished at step {finished['step']}; its summary is kept",
                   *_summary_lines(finished))
            return finished
        with StopSignal() as stop:
            loop = _Loop(trainer, datasets, checkpointer, writer, stop, train_config,
                         checkpoint_config.save_every,
                         tokens_per_step=datasets.train.batch_size * data_config(config)["seq_len"])
            state = loop.run(state, stop_at_step)
        checkpointer.wait()
    finally:
        checkpointer.close()
        writer.close()
    summary = loop.summary(state, time.time() - wall_start)
    if jax.process_index() == 0:  # whole or absent, never half-written: a rerun reads it
        path = os.path.join(workdir, SUMMARY_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
    _print(*_summary_lines(summary))
    return summary


def _finished_summary(workdir: str, step: int, num_steps: int) -> dict[str, Any] | None:
    """The summary.json of a run already trained to `num_steps` (resumed at `step`), or None.

    A caller stopped after training but before using the result (e.g. an ablation grid
    killed during its extra evaluations) gets the same summary back, throughput included.
    The workdir is shared by all processes (as Orbax's checkpoints need), so every process
    reads the same file and takes the same branch.
    """
    path = os.path.join(workdir, SUMMARY_FILE)
    if step < num_steps or not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("completed") and summary.get("step") == step else None


def _check_vocab(model_vocab: int, datasets: data_lib.Datasets) -> None:
    if model_vocab < datasets.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={model_vocab} is smaller than the data's vocabulary "
            f"{datasets.vocab_size} ({datasets.metadata.get('name')}); set "
            f"--config.model.vocab_size={datasets.vocab_size}")


class _Loop:
    """The steps of one `train_and_evaluate` call and the statistics its summary reports."""

    def __init__(self, trainer: Trainer, datasets: data_lib.Datasets,
                 checkpointer: Checkpointer, writer: MetricsWriter, stop: StopSignal,
                 config: TrainConfig, save_every: int, *, tokens_per_step: int):
        self.trainer, self.datasets, self.checkpointer = trainer, datasets, checkpointer
        self.writer, self.stop, self.config, self.save_every = writer, stop, config, save_every
        self.tokens_per_step = tokens_per_step
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.last_eval: dict[str, float] = {}
        self.last_sample = ""
        self.completed = False

    def run(self, state: TrainState, stop_at_step: int | None) -> TrainState:
        """Steps from `state.step` to the end (or `stop_at_step`, or SIGTERM); the last state.

        Metrics are fetched (and checked for NaN/Inf, and SIGTERM looked at) only every
        `log_every` steps and before every evaluation and save, so steps stay asynchronous.
        """
        config = self.config
        step = int(state.step)
        end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)
        bar = tqdm(total=config.num_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=not config.progress_bar or jax.process_index() != 0)
        window: list[dict[str, jax.Array]] = []
        window_tokens, mark = 0, None
        while step < end:
            batch = sharding.put_batch(next(self.datasets.train), self.trainer.mesh)
            state, metrics = self.trainer.train_step(state, batch)
            step += 1
            bar.update(1)
            window.append(metrics)
            if mark is None:  # the first step compiles: leave it out of the throughput
                jax.block_until_ready(metrics)
                mark = time.time()
            else:
                window_tokens += batch["inputs"].size
            evaluate_now = _every(step, config.eval_every) or step == config.num_steps
            save_now = evaluate_now or step == end or _every(step, self.save_every)
            if not (save_now or _every(step, config.log_every)):
                continue
            values = [jax.device_get(m) for m in window]
            _check_finite(values, step - len(window) + 1, self.checkpointer)
            seconds = time.time() - mark
            self.train_seconds += seconds
            self.train_tokens += window_tokens
            logged = _mean(values) | {"tokens_per_s": window_tokens / max(seconds, 1e-9)}
            self.writer.write(step, logged)
            bar.set_postfix(loss=f"{logged['loss']:.3f}", tok_s=f"{logged['tokens_per_s']:.0f}")
            window, window_tokens = [], 0
            stop_now = self.stop.agreed()
            eval_metrics = self._evaluate_and_sample(state, step) if evaluate_now else None
            if save_now or stop_now:
                _save(self.checkpointer, state, self.datasets.train, eval_metrics)
            if stop_now:
                _print(f"SIGTERM: saved step {step} in {self.checkpointer.directory}; exiting")
                break
            mark = time.time()
        bar.close()
        self.completed = step >= config.num_steps
        if self.completed and not self.last_eval:
            # Resumed from the final checkpoint without its summary: evaluate it (not logged
            # again), so the summary still has the final evaluation.
            self.last_eval = evaluate(self.trainer, state.params, self.datasets.make_eval())
        return state

    def _evaluate_and_sample(self, state: TrainState, step: int) -> dict[str, float]:
        """Evaluates, samples, logs both; returns the metrics that rank checkpoints."""
        self.last_eval = evaluate(self.trainer, state.params, self.datasets.make_eval())
        record = dict(self.last_eval)
        if self.config.sample_prompt:
            self.last_sample = sample_text(
                self.trainer.model(state.params), self.config.sample_prompt,
                max_new_tokens=self.config.sample_tokens,
                temperature=self.config.sample_temperature, top_k=self.config.sample_top_k,
                rng=jax.random.fold_in(state.rng, step))[0]
            record["sample"] = self.last_sample
        self.writer.write(step, record)
        entropy = self.datasets.metadata.get("unigram_entropy_bits")
        _print(f"step {step}: eval {_eval_line(self.last_eval, entropy)}",
               *([f"sample: {self.last_sample!r}"] if self.last_sample else []))
        return {BEST_METRIC: self.last_eval["eval_loss"]}

    def summary(self, state: TrainState, wall_seconds: float) -> dict[str, Any]:
        """JSON-able run summary; see `train_and_evaluate`."""
        corpus_tokens = self.datasets.metadata.get("train_tokens")
        return {"step": int(state.step), "completed": self.completed,
                "epochs": (int(state.step) * self.tokens_per_step / corpus_tokens
                           if corpus_tokens else None),
                "wall_time_s": wall_seconds, "train_time_s": self.train_seconds,
                # None when this call timed no step (e.g. it resumed at the end)
                "tokens_per_s": (self.train_tokens / max(self.train_seconds, 1e-9)
                                 if self.train_tokens else None),
                "unigram_entropy_bits": self.datasets.metadata.get("unigram_entropy_bits"),
                **self.last_eval, "sample": self.last_sample}


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _eval_line(metrics: Mapping[str, Any], entropy: float | None) -> str:
    """An evaluation's numbers: for byte-level text (which has a unigram `entropy`) loss,
    bits/byte against that baseline and perplexity; for tasks (None) loss and accuracy."""
    if entropy is None:
        return f"loss {metrics['eval_loss']:.4f}, accuracy {metrics['eval_accuracy']:.4f}"
    return (f"loss {metrics['eval_loss']:.4f}, {metrics['eval_bits_per_byte']:.3f} bits/byte "
            f"vs unigram entropy {entropy:.3f}, perplexity {metrics['eval_perplexity']:.2f}")


def _summary_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = [f"run summary: step {summary['step']}"
             f"{'' if summary['completed'] else ' (stopped early)'}, wall time "
             f"{summary['wall_time_s']:.0f} s, "
             + (f"{summary['tokens_per_s']:,.0f} tokens/s" if summary.get("tokens_per_s")
                else "no step timed")]
    if "eval_loss" in summary:
        lines.append(f"validation: {_eval_line(summary, summary.get('unigram_entropy_bits'))}")
    if (summary.get("epochs") or 0) > 1:
        lines.append(f"note: training saw its corpus {summary['epochs']:.1f} times; compare "
                     "validation with training loss for overfitting")
    if summary["sample"]:
        lines.append(f"sample: {summary['sample']!r}")
    return lines


# ----------------------------------------------------------------------------- inference


def restore_params(trainer: Trainer, workdir: str, *, step: int | None = None,
                   best: bool = False) -> tuple[Params, int]:
    """Parameters of a saved step (default: the latest; `best`: lowest eval loss).

    Returns:
        (params sharded as `trainer.state_shardings.params`, the step).

    Raises:
        FileNotFoundError: if the workdir has no checkpoint.
    """
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        if step is None:
            step = checkpointer.best_step() if best else checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        return checkpointer.restore_params(step, trainer.abstract_state.params), step
    finally:
        checkpointer.close()


def inference_config(workdir: str, model_overrides: Mapping[str, Any] | None = None
                     ) -> ml_collections.ConfigDict:
    """A workdir's run config with `model_overrides` applied: model config fields from
    INFERENCE_MODEL_FIELDS to load the trained model with (e.g. {'state_dtype': 'bfloat16',
    'decode_kernel': 'pallas'} for decoding, {'dtype': 'float32'} to evaluate a bf16 run
    in float32).

    Raises:
        ValueError: naming any other field (it would change what the parameters mean), or a
            field given a value of another type than the saved config's.
    """
    config = load_config(workdir)
    overrides = dict(model_overrides or {})
    refused = sorted(set(overrides) - INFERENCE_MODEL_FIELDS)
    if refused:
        raise ValueError(f"model_overrides {refused} would change the trained model; only "
                         f"{sorted(INFERENCE_MODEL_FIELDS)} may differ")
    for field, value in overrides.items():
        try:
            config.model[field] = value
        except TypeError as e:       # ConfigDict keeps each saved field's type
            raise ValueError(f"model_overrides[{field!r}] = {value!r}: {e}") from e
    return config


def _restore(workdir: str, step: int | None, best: bool,
             model_overrides: Mapping[str, Any] | None
             ) -> tuple[Trainer, Params, ml_collections.ConfigDict, int]:
    """(trainer, params, config, step) of a saved step under `inference_config`'s config."""
    config = inference_config(workdir, model_overrides)
    trainer = make_trainer(config)
    params, step = restore_params(trainer, workdir, step=step, best=best)
    return trainer, params, config, step


def load_model(workdir: str, *, step: int | None = None, best: bool = False,
               model_overrides: Mapping[str, Any] | None = None
               ) -> tuple[Any, ml_collections.ConfigDict, int]:
    """A trained model from a workdir: (RetNetLM, the run config, the step restored).

    Builds the mesh from the run's config; see `restore_params` for `step` and `best`, and
    `inference_config` for `model_overrides` (the returned config has them).
    """
    trainer, params, config, step = _restore(workdir, step, best, model_overrides)
    return trainer.model(params), config, step


def evaluate_checkpoint(workdir: str, *, step: int | None = None, best: bool = False,
                        model_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluates a saved step on the run's evaluation data; see `evaluate`, `restore_params`
    and `inference_config` (`model_overrides`).

    Returns:
        `evaluate`'s metrics plus 'step' and the data's 'unigram_entropy_bits' (text only).
    """
    trainer, params, config, step = _restore(workdir, step, best, model_overrides)
    datasets = data_lib.make_datasets(data_config(config), process_index=jax.process_index(),
                                      process_count=jax.process_count())
    return {"step": step, **evaluate(trainer, params, datasets.make_eval()),
            "unigram_entropy_bits": datasets.metadata.get("unigram_entropy_bits")}


def use_compilation_cache(directory: str) -> None:
    """Keeps every compiled XLA program in `directory` ('~' expanded; '' leaves JAX's own
    setting, e.g. the JAX_COMPILATION_CACHE_DIR variable, as it is).

    Every `make_trainer` traces and compiles its steps anew; with the cache, programs that
    compiled before (the same model and shapes: another seed of an ablation cell, a resumed
    run, the evaluation at the training length) load from disk instead. On a 2-core CPU a
    tiny ablation run's second seed took 3.3 s instead of 6.5 s; on an H100 the compiles are
    about 30 s of an 80 s gpu-scale run.
    """
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
