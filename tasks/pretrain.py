"""A task model's starting weights: seeded random, or pretrained on public data.

DP-SGD pays for every step it takes with noise, so the less a private model must
learn from the sites, the less it loses (Tramèr & Boneh 2021; De et al. 2022). A
task that declares labelled public data (``Task.public_data``) can be pretrained on
it once (``medfed pretrain``, :func:`pretrain`); the weights ship beside the task
(``Task.public_weights``), so neither the server nor a site downloads or trains
anything at run time, and a run asks for them with ``init_weights = "public"``.
They are public: starting from them costs no site any privacy budget.

The server's global model and every site's own parameters (domain-adaptation
hooks) start from :func:`initial_weights`, so both ends agree on round 1.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_savez, atomic_write
from medfed.tasks import engine
from medfed.tasks.base import Task

InitWeights = Literal["random", "public"]


@dataclass(frozen=True, kw_only=True)
class PretrainRecipe:
    """How public weights were (or are to be) trained; saved beside them."""

    subjects: int = 80
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 12345


def pretrain(
    task: Task, recipe: PretrainRecipe, *, device: torch.device | None = None
) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Train a fresh model of ``task`` on its public data; its weights and what was done."""
    if task.public_data is None:
        raise MedfedError(
            f"Task {task.name!r} declares no public training data (Task.public_data), so "
            "there is nothing to pretrain it on.",
            where=f"task {task.name!r}",
            expected="a task whose Task.public_data is set",
            fix="pretrain a task that declares public data (`medfed tasks` marks those that "
            "ship public weights), or give this task a public_data (docs/plugins.md)",
        )
    device = device or engine.select_device()
    t0 = time.time()
    data = task.public_data(recipe.subjects, recipe.seed)
    examples = len(data)  # type: ignore[arg-type]
    torch.manual_seed(recipe.seed)
    model = task.build_model()
    epochs = max(1, round(recipe.steps * recipe.batch_size / examples))
    stats = engine.train(
        task,
        model,
        data,
        epochs=epochs,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        device=device,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    info: dict[str, object] = {
        "task": task.name,
        "recipe": asdict(recipe),
        "examples": examples,
        "epochs": epochs,
        "steps": stats.steps,
        "final-loss": round(stats.loss, 5),
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "data": _described(task.public_data.__doc__),
    }
    if task.public_standard is not None:
        info["standard"] = public_standard(task, recipe)
    return engine.get_weights(model.cpu()), info


def public_standard(task: Task, recipe: PretrainRecipe) -> dict[str, object]:
    """The mean intensity landmarks of the public scans ``recipe`` names (harmonization)."""
    from medfed.tasks.harmonization import LANDMARK_PERCENTILES

    if task.public_standard is None:
        raise MedfedError(
            f"Task {task.name!r} cannot give the intensity landmarks of its public data.",
            where=f"task {task.name!r} (Task.public_standard)",
            expected="a task whose Task.public_standard is set",
            fix="use harmonization 'histogram' (the sites' own standard), or give the task "
            "a public_standard (docs/plugins.md)",
        )
    landmarks, scans = task.public_standard(recipe.subjects, recipe.seed)
    return {
        "landmarks": [round(float(v), 6) for v in landmarks],
        "percentiles": list(LANDMARK_PERCENTILES),
        "scans": int(scans),
        "subjects": recipe.subjects,
        "seed": recipe.seed,
    }


def add_public_standard(path: Path, task: Task) -> dict[str, object]:
    """Add the public standard to the recipe beside weights ``path``, from its own recipe."""
    recipe_file = Path(path).with_suffix(".json")
    info = _read_recipe(recipe_file, task)
    try:
        recipe = PretrainRecipe(**info["recipe"])  # type: ignore[arg-type]
    except TypeError as exc:
        raise MedfedError(
            f"The recipe section of {recipe_file} is not a pretraining recipe ({exc}).",
            where=str(recipe_file),
            expected=f"the keys {sorted(PretrainRecipe.__dataclass_fields__)}",
            fix=f"re-create the weights with `medfed pretrain --task {task.name} --out {path}`",
        ) from None
    info["standard"] = public_standard(task, recipe)
    atomic_write(recipe_file, (json.dumps(info, indent=2) + "\n").encode())
    return info["standard"]  # type: ignore[return-value]


def load_public_standard(task: Task) -> tuple[float, ...]:
    """The standard landmarks shipped with the task's public weights (histogram-public)."""
    from medfed.tasks.harmonization import LANDMARK_PERCENTILES

    if task.public_weights is None:
        raise _no_standard(task, "ships no public weights, whose recipe would hold them")
    recipe_file = task.public_weights.with_suffix(".json")
    stored = _read_recipe(recipe_file, task).get("standard")
    if not isinstance(stored, dict) or "landmarks" not in stored:
        raise _no_standard(task, f"has no 'standard' in {recipe_file}")
    try:
        values = tuple(float(v) for v in stored["landmarks"])
    except (TypeError, ValueError):
        values = ()
    if len(values) != len(LANDMARK_PERCENTILES) or any(
        b <= a for a, b in zip(values, values[1:], strict=False)
    ):
        raise _no_standard(
            task,
            f"has standard landmarks in {recipe_file} that are not "
            f"{len(LANDMARK_PERCENTILES)} increasing numbers",
        )
    return values


def _read_recipe(recipe_file: Path, task: Task) -> dict[str, object]:
    try:
        info = json.loads(recipe_file.read_text())
    except FileNotFoundError:
        raise _no_standard(
            task, f"names public weights whose recipe {recipe_file} is missing"
        ) from None
    except ValueError as exc:
        raise _no_standard(task, f"has an unreadable recipe {recipe_file} ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("recipe"), dict):
        raise _no_standard(task, f"has a recipe {recipe_file} without its 'recipe' section")
    return info


def _no_standard(task: Task, what: str) -> MedfedError:
    return MedfedError(
        f"Task {task.name!r} {what}, so harmonization 'histogram-public' has no standard.",
        where="run config 'harmonization'",
        expected="a task whose public weights' recipe holds the public standard landmarks",
        fix=f"run `medfed pretrain --task {task.name} --out <weights> --standard-only` on the "
        "task's weights, or harmonize with 'histogram' (the sites' own landmarks; not under DP)",
    )


def save_weights(path: Path, weights: dict[str, np.ndarray], info: dict[str, object]) -> Path:
    """Write ``path`` (.npz, atomic) and its recipe ``path.with_suffix('.json')``."""
    path = Path(path).with_suffix(".npz")
    atomic_savez(path, **weights)
    atomic_write(path.with_suffix(".json"), (json.dumps(info, indent=2) + "\n").encode())
    return path


def load_public_weights(task: Task) -> dict[str, np.ndarray]:
    """The task's shipped public weights, checked against a fresh model of the task."""
    path = task.public_weights
    if path is None:
        raise _no_public(task, "ships no public weights (Task.public_weights)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            weights = {k: stored[k] for k in stored.files}
    except FileNotFoundError:
        raise _no_public(
            task, f"names public weights at {path}, and that file is missing"
        ) from None
    expected = {k: tuple(v.shape) for k, v in task.build_model().state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items()} != expected:
        raise MedfedError(
            f"The public weights of task {task.name!r} do not fit its model.",
            where=str(path),
            expected=f"{len(expected)} tensors of the task's model",
            fix=f"re-create them with `medfed pretrain --task {task.name} --out {path}`",
        )
    return weights


def initial_weights(task: Task, *, seed: int, init: InitWeights) -> dict[str, np.ndarray]:
    """The whole ``state_dict`` a run of ``task`` starts from (random: seeded by ``seed``)."""
    if init == "public":
        return load_public_weights(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return engine.get_weights(task.build_model())


def check_init(task: Task, init: InitWeights) -> None:
    """Refuse ``init`` before a run starts when the task cannot give it."""
    if init == "public":
        load_public_weights(task)


def _described(doc: str | None) -> str:
    """What the task says its public data is: its docstring, on one line."""
    return " ".join((doc or "").split()) or "the task's Task.public_data (no site's data)"


def _no_public(task: Task, what: str) -> MedfedError:
    return MedfedError(
        f"Task {task.name!r} {what}, so a run cannot start from public weights.",
        where="run config 'init_weights'",
        expected="'random' for this task",
        fix="drop --init-weights public, or pick a task with public weights "
        "(`medfed tasks` marks them)",
    )
