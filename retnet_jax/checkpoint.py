"""Orbax checkpoints of a training run, and the run's saved config.

A workdir holds:
    config.json          the full run config, written once; resuming checks the model section.
    checkpoints/<step>/  one Orbax checkpoint per saved step, with the items
        params   the model parameters (a nested dict of arrays), restorable on their own;
        train    {'step', 'opt_state', 'rng'};
        data     the training iterator's JSON state (`BatchIterator.get_state()`);
        metrics  evaluation metrics, for checkpoints saved right after an evaluation.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save leaves the previous steps intact; leftover temporary directories are ignored and
cleaned up. The last `keep` steps are kept, plus the step with the lowest evaluation loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointConfig", "Checkpointer", "BEST_METRIC", "save_config", "load_config",
    "check_resumable",
]

BEST_METRIC = "eval_loss"  # the metric, lower is better, that picks the best checkpoint
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep.

    Attributes:
        save_every: save every this many steps (also after every evaluation, at the end and on
            SIGTERM); 0 saves only at those times.
        keep: how many of the latest checkpoints to keep (the best one is kept besides).
        async_save: write checkpoints in a background thread while training goes on.
    """

    save_every: int = 500
    keep: int = 3
    async_save: bool = True


class Checkpointer:
    """Saves and restores training state under `<workdir>/checkpoints` with Orbax.

    Every process of a multi-process run must create it and call `save`/`restore` together.
    `read_only=True` is for readers (evaluation, sampling), possibly beside a running job:
    it never saves, deletes or cleans up temporary directories.
    """

    def __init__(self, workdir: str, config: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False):
        if config.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {config.keep}")
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=config.keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric, best_mode="min", preservation_policy=policy,
            enable_async_checkpointing=config.async_save, read_only=read_only,
            cleanup_tmp_directories=not read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1)
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest evaluation loss (latest if none has metrics), or None."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, *, params: Any, train: Any, data: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        """Starts saving one checkpoint (asynchronously if configured); see the module doc.

        Args:
            step: the number of optimizer steps taken.
            params: pytree of (possibly sharded) arrays.
            train: pytree of arrays: optimizer state, step, RNG key.
            data: JSON-able training iterator state.
            metrics: evaluation metrics including `BEST_METRIC`, or None.
        """
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  train=ocp.args.StandardSave(train),
                                  data=ocp.args.JsonSave(dict(data)))
        self._manager.save(step, args=args, metrics=dict(metrics) if metrics else None,
                           force=True)

    def restore(self, step: int, *, params: Any, train: Any) -> tuple[Any, Any, dict]:
        """Restores a full checkpoint onto abstract targets.

        Args:
            step: which checkpoint.
            params, train: pytrees of `jax.ShapeDtypeStruct` with `.sharding` set, matching
                what was saved; the arrays come back with those shardings.

        Returns:
            (params, train, data): restored pytrees and the data iterator's state.
        """
        args = ocp.args.Composite(params=ocp.args.StandardRestore(params),
                                  train=ocp.args.StandardRestore(train),
                                  data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["params"], restored["train"], dict(restored["data"])

    def restore_params(self, step: int, params: Any) -> Any:
        """Restores only the parameters (for evaluation and sampling); see `restore`."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(params))
        return self._manager.restore(step, args=args)["params"]

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()


def _best_metric(metrics: Mapping[str, float]) -> float:
    """The value, lower is better, that ranks checkpoints saved with metrics."""
    return metrics[BEST_METRIC]


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run config to `<workdir>/config.json` (process 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run config saved by `save_config`.

    Raises:
        FileNotFoundError: naming the file, if the workdir has no saved config.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any],
                    allowed: frozenset[str] = frozenset(), *, what: str = "model config",
                    hint: str = "Use a new --workdir, or restore these values.") -> None:
    """Raises if two config sections differ in a field other than `allowed`.

    Args:
        saved: the section (fields -> values) the checkpoint was trained with.
        current: the same section of this run.
        allowed: fields free to change on resume (e.g. compute dtype, remat).
        what: the section's name in the error ('model config', 'data config', ...).
        hint: the error's last sentence: what to do instead.

    Raises:
        ValueError: naming each differing field with its saved and current value.
    """
    keys = sorted((set(saved) | set(current)) - allowed)
    old = {key: _jsonish(saved.get(key, "<absent>")) for key in keys}
    new = {key: _jsonish(current.get(key, "<absent>")) for key in keys}
    diffs = [f"{key}: checkpoint {old[key]!r} vs config {new[key]!r}"
             for key in keys if old[key] != new[key]]
    if diffs:
        raise ValueError(f"cannot resume: the {what} differs from the checkpoint's in "
                         + "; ".join(diffs)
                         + ". " + hint)


def _jsonish(value: Any) -> Any:
    """Normalises tuples to lists, as a JSON round trip does, for comparison."""
    if isinstance(value, (tuple, list)):
        return [_jsonish(v) for v in value]
    return value
