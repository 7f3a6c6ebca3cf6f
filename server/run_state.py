"""What resuming a run needs, written atomically at the end of every round.

After a server crash the ServerApp of the resumed run reads it back and goes on
from the next round (:mod:`medfed.server.resume` submits that run). The global model
itself is the round's checkpoint (``checkpoints/round-NNN.npz``); beside it, under
``resume/``:

- ``strategy-round-NNN.npz``: the strategy's state (server optimizer moments,
  FedAvgM momentum, ...), no pickle;
- ``state.json``: the round it belongs to, the strategy state's manifest, the
  server's random-number states, the aggregated metrics so far. Written last: a
  crash between the files leaves the previous round's ``state.json`` pointing at
  the previous round's files, which are removed only after it is replaced.

A strategy keeps its state in attributes (Flower's FedOpt family: ``m_t``, ``v_t``,
``current_arrays``; FedAvgM: ``momentum_vector``): every attribute holding numpy
arrays (alone, in a dict or list, or as an ArrayRecord), a number, a string or None is
saved and put back; others (callables, clients) are the strategy's configuration and
come from the run's options again. A strategy whose state lives elsewhere implements
``state_dict()`` and ``load_state_dict(state)``, as Opacus's accountants and PyTorch
modules do, and then only that is saved.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_savez, atomic_write

#: Attributes through which one strategy wraps another (medfed's secure aggregation,
#: Flower's DP wrappers).
WRAPPED_ATTRIBUTES = ("inner", "strategy")


class ResumeError(MedfedError):
    """A run's saved state cannot be read back: the run cannot be resumed."""


def _chain(strategy: Any) -> list[Any]:
    """The strategy and every strategy it wraps, outermost first."""
    out = [strategy]
    while True:
        inner = next(
            (
                getattr(out[-1], a)
                for a in WRAPPED_ATTRIBUTES
                if hasattr(out[-1], a) and hasattr(getattr(out[-1], a), "aggregate_train")
            ),
            None,
        )
        if inner is None or any(inner is s for s in out):
            return out
        out.append(inner)


def _saveable(value: Any) -> bool:
    """Whether :func:`_encode` can save ``value`` (else it is configuration, not state)."""
    if value is None or isinstance(value, bool | int | float | str | np.ndarray | ArrayRecord):
        return True
    if isinstance(value, dict):
        return all(isinstance(v, np.ndarray) for v in value.values())
    if isinstance(value, list | tuple):
        return all(isinstance(v, np.ndarray) for v in value)
    return False


def _encode(value: Any, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One attribute's value as a manifest entry; its arrays go into ``arrays``."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool | int | float | str):
        return {"kind": "scalar", "value": value}
    if isinstance(value, np.ndarray):
        arrays[prefix] = value
        return {"kind": "array"}
    if isinstance(value, ArrayRecord):
        for k, a in value.items():
            arrays[f"{prefix}/{k}"] = a.numpy()
        return {"kind": "arrayrecord", "keys": list(value.keys())}
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        for k, a in value.items():
            arrays[f"{prefix}/{k}"] = a
        return {"kind": "dict", "keys": list(value.keys())}
    if isinstance(value, list | tuple) and all(isinstance(v, np.ndarray) for v in value):
        for i, a in enumerate(value):
            arrays[f"{prefix}/{i}"] = a
        return {"kind": "list", "length": len(value)}
    raise ResumeError(
        f"The strategy's state {prefix!r} is a {type(value).__name__}, which medfed cannot "
        "save for resuming.",
        expected="numpy arrays, dicts or lists of them, an ArrayRecord, or a number",
        fix="give the strategy state_dict() and load_state_dict() methods (see docs/plugins.md)",
    )


def _decode(entry: dict[str, Any], prefix: str, arrays: Any) -> Any:
    kind = entry["kind"]
    if kind == "none":
        return None
    if kind == "scalar":
        return entry["value"]
    if kind == "array":
        return arrays[prefix]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(arrays[f"{prefix}/{k}"]) for k in entry["keys"]})
    if kind == "dict":
        return {k: arrays[f"{prefix}/{k}"] for k in entry["keys"]}
    if kind == "list":
        return [arrays[f"{prefix}/{i}"] for i in range(entry["length"])]
    raise ResumeError(f"Unknown kind {kind!r} in a saved strategy state.")


def strategy_state(strategy: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The manifest and arrays of the state of ``strategy`` and every strategy it wraps."""
    manifest: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for depth, s in enumerate(_chain(strategy)):
        if hasattr(s, "state_dict") and hasattr(s, "load_state_dict"):
            values = dict(s.state_dict())
        else:
            values = {a: v for a, v in vars(s).items() if _saveable(v)}
        manifest[str(depth)] = {
            "class": type(s).__name__,
            "values": {name: _encode(v, f"{depth}/{name}", arrays) for name, v in values.items()},
        }
    return manifest, arrays


def restore_strategy_state(strategy: Any, manifest: dict[str, Any], arrays: Any) -> None:
    """Put back what :func:`strategy_state` saved; the strategies must be of the same classes."""
    chain = _chain(strategy)
    for depth, s in enumerate(chain):
        saved = manifest.get(str(depth))
        if saved is None or saved["class"] != type(s).__name__:
            raise ResumeError(
                f"The saved strategy state is of {saved and saved['class']!r}, the run's "
                f"strategy is {type(s).__name__!r}.",
                fix="a run resumes with the strategy it was started with",
            )
        values = {n: _decode(e, f"{depth}/{n}", arrays) for n, e in saved["values"].items()}
        if hasattr(s, "state_dict") and hasattr(s, "load_state_dict"):
            s.load_state_dict(values)
        else:
            for name, value in values.items():
                setattr(s, name, value)


@dataclass
class RunState:
    """The server's state after a completed round."""

    round: int
    strategy: dict[str, Any]
    python_random: Any
    numpy_random: dict[str, Any]
    train_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


def _metric_dict(record: MetricRecord | None) -> dict[str, Any]:
    return {} if record is None else {k: v for k, v in record.items()}


class RunStateStore:
    """``resume/`` of one run folder."""

    def __init__(self, run_path: Path) -> None:
        self.dir = Path(run_path) / "resume"

    @property
    def state_file(self) -> Path:
        """state.json."""
        return self.dir / "state.json"

    def strategy_file(self, server_round: int) -> Path:
        """strategy-round-NNN.npz."""
        return self.dir / f"strategy-round-{server_round:03d}.npz"

    def save(
        self,
        server_round: int,
        strategy: Any,
        *,
        train_metrics: dict[int, MetricRecord],
        evaluate_metrics: dict[int, MetricRecord],
    ) -> None:
        """Save the state after ``server_round`` (its checkpoint must be written already)."""
        manifest, arrays = strategy_state(strategy)
        atomic_savez(self.strategy_file(server_round), **arrays)
        state = {
            "round": server_round,
            "strategy": manifest,
            "python_random": _jsonable(random.getstate()),
            "numpy_random": _jsonable(np.random.get_state(legacy=False)),
            "train_metrics": {str(r): _metric_dict(m) for r, m in train_metrics.items()},
            "evaluate_metrics": {str(r): _metric_dict(m) for r, m in evaluate_metrics.items()},
        }
        atomic_write(self.state_file, json.dumps(state, sort_keys=True).encode())
        for old in self.dir.glob("strategy-round-*.npz"):
            if old != self.strategy_file(server_round):
                old.unlink(missing_ok=True)

    def load(self) -> RunState | None:
        """The last saved state, or None when the run saved none (it ended before round 1)."""
        if not self.state_file.exists():
            return None
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            return RunState(
                round=int(data["round"]),
                strategy=data["strategy"],
                python_random=data["python_random"],
                numpy_random=data["numpy_random"],
                train_metrics=data.get("train_metrics", {}),
                evaluate_metrics=data.get("evaluate_metrics", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeError(
                f"The run's saved state is unreadable: {exc}", where=str(self.state_file)
            ) from exc

    def restore(self, state: RunState, strategy: Any) -> None:
        """Put the strategy's state and the random-number states of ``state`` back."""
        path = self.strategy_file(state.round)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                restore_strategy_state(strategy, state.strategy, arrays)
        except (OSError, ValueError, KeyError) as exc:
            raise ResumeError(
                f"The strategy state of round {state.round} is unreadable: {exc}", where=str(path)
            ) from exc
        random.setstate(_tupled(state.python_random))
        np.random.set_state(_numpy_state(state.numpy_random))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _numpy_state(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    inner = dict(out["state"])
    inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    out["state"] = inner
    return out
