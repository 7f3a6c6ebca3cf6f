"""`medfed pretrain`: a task's starting weights trained on public data (no site's data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.main import console


def register(app: typer.Typer) -> None:
    """Add the pretrain command."""

    @app.command("pretrain")
    def pretrain(
        task: Annotated[str, typer.Option(help="task name (one with public data)")],
        out: Annotated[
            Path, typer.Option(help="weights file to write (.npz; recipe in .json beside it)")
        ],
        subjects: Annotated[int, typer.Option(min=1, help="public subjects")] = 80,
        steps: Annotated[int, typer.Option(min=1, help="Adam steps (rounded to epochs)")] = 3000,
        batch_size: Annotated[int, typer.Option(min=1, help="batch size")] = 16,
        lr: Annotated[float, typer.Option(min=0.0, help="learning rate")] = 3e-3,
        seed: Annotated[int, typer.Option(help="seed of the public data and the model")] = 12345,
        standard_only: Annotated[
            bool,
            typer.Option(
                help="train nothing: add the public scans' intensity landmarks (harmonization "
                "'histogram-public') to the recipe beside existing weights OUT, from that "
                "recipe's subjects and seed"
            ),
        ] = False,
    ) -> None:
        """Train a task's model on its public data; the task's shipped weights are made so.

        Copy the file over the task's ``public_weights`` to ship it; a run starts from
        the shipped weights with ``medfed run --init-weights public``. The recipe beside
        it also holds the public scans' intensity landmarks when the task can give them
        (the standard of ``--harmonization histogram-public``).
        """
        from medfed.tasks import get_task
        from medfed.tasks.pretrain import PretrainRecipe, add_public_standard, save_weights
        from medfed.tasks.pretrain import pretrain as train_public

        chosen = get_task(task)
        if standard_only:
            with console.status(f"intensity landmarks of {task}'s public scans"):
                standard = add_public_standard(out, chosen)
            console.print(
                f"wrote the standard landmarks of {standard['scans']} public scans to "
                f"{out.with_suffix('.json')}"
            )
            return
        recipe = PretrainRecipe(
            subjects=subjects, steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed
        )
        with console.status(f"training {task} on {subjects} public subjects ({steps} steps)"):
            weights, info = train_public(chosen, recipe)
        path = save_weights(out, weights, info)
        console.print(
            f"wrote {path} ({info['examples']} public examples, {info['steps']} "
            f"steps, final loss {info['final-loss']}, {info['seconds']} s)"
        )
        console.print(f"  recipe: {path.with_suffix('.json')}")
