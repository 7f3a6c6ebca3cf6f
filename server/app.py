"""The ServerApp: builds the task's initial model, drives the strategy, writes the run folder.

Flower's SuperLink starts it for each submitted run. Everything it writes goes to
the run folder under the federation's runs directory (``MEDFED_RUNS_DIR``, set by
`medfed server start`).
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy
from flwr.superlink.grid import http_grid

from medfed.core import bulk_hash, privacy_accounting, wire
from medfed.core.config import RunConfig
from medfed.core.flower_tuning import shorten_object_pull_backoff
from medfed.core.packing import WEIGHTS_KEY, Layout, npy_view, pack, shared_state, unpack
from medfed.core.parent_watch import exit_with_parent
from medfed.core.report import plot_metrics
from medfed.core.run_report import write_report
from medfed.core.run_summary import (
    Adaptation,
    Protection,
    Resumption,
    RunSummary,
    SiteRefusal,
    no_model_reason,
    rounds_without_model,
)
from medfed.core.runs import RunFolder
from medfed.core.schema import SiteInstruction
from medfed.core.secagg import SecAggConfig
from medfed.core.warm_start import load_start_weights
from medfed.server.federation import secagg_certificates
from medfed.server.harmonization import agree_standard, public_standard
from medfed.server.recording_grid import RecordingGrid
from medfed.server.refusals import RefusalPolicy, SitesRefused
from medfed.server.rounds import run_rounds
from medfed.server.run_state import RunStateStore
from medfed.server.secure_aggregation import SecureAggregation
from medfed.server.streaming_mean import StreamingMean, streams, vector_array
from medfed.strategies import build_strategy
from medfed.strategies.registry import check_secure_aggregation
from medfed.tasks import get_task
from medfed.tasks.adaptation import local_keys
from medfed.tasks.pretrain import initial_weights

RUNS_DIR_ENV = "MEDFED_RUNS_DIR"
#: The enrolled-sites registry: their secure-aggregation certificates, for the sites.
SITES_FILE_ENV = "MEDFED_SITES_FILE"
#: The CA's revocation list of coordinator certificates, sent with every message.
REVOCATIONS_ENV = "MEDFED_REVOCATIONS_FILE"

app = ServerApp()


def _runs_dir(context: Context) -> Path:
    env = os.environ.get(RUNS_DIR_ENV)
    if not env:
        raise RuntimeError(
            f"{RUNS_DIR_ENV} is not set: start the SuperLink with `medfed server start`"
        )
    return Path(env)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federated training as configured by the coordinator."""
    # A reply's arrays can reach the SuperLink just after its metadata; Flower's grid
    # then waits a full second before pulling them again. Retry after 50 ms instead.
    shorten_object_pull_backoff(http_grid, initial=0.05, cap=1.0)
    # Flower's own watch of the parent (SIGINT) can leave this process waiting for a
    # SuperLink that is gone, holding the run; end it (the run resumes from disk).
    exit_with_parent()
    # What exists before the run (modules: torch, MONAI, Flower) lives as long as this
    # process: keep it out of the collection after every round, which then walks the
    # run's objects only (0.26 s less per round). Nothing of the run is frozen.
    gc.freeze()
    run = RunConfig.from_json(str(context.run_config[wire.RUN_CONFIG_KEY]))
    runs_dir = _runs_dir(context)
    folder = (
        RunFolder.reopen(runs_dir, run.resume_of, context.run_id)
        if run.resume_of
        else RunFolder.create(runs_dir, context.run_id, run)
    )
    with folder.lock():
        run_in_folder(grid, context, run, folder, runs_dir=runs_dir)


def _secagg_certificates() -> dict[bytes, str]:
    """Enrolled sites' secure-aggregation certificates, by key (none outside a server)."""
    sites_file = os.environ.get(SITES_FILE_ENV)
    return secagg_certificates(Path(sites_file)) if sites_file else {}


def signed_run_entries(context: Context, run: RunConfig) -> dict[str, Any]:
    """What sites check a run by: its JSON, its signature, the CA's revoked coordinators.

    The JSON is passed on as received, never re-serialized: the signature covers its bytes.
    """
    entries = SiteInstruction(
        run=str(context.run_config.get(wire.RUN_CONFIG_KEY) or run.to_json()),
        proof=str(context.run_config.get(wire.RUN_PROOF_KEY) or ""),
    ).entries()
    pass_on_revocations(entries)
    return entries


def pass_on_revocations(*holders: MutableMapping[str, Any]) -> None:
    """Put the CA's current revocation list of coordinators in each of ``holders``.

    Called as the run starts and after every round, so that a coordinator revoked
    while its run goes on is refused by the sites from the next round on.
    """
    crl = Path(os.environ.get(REVOCATIONS_ENV) or "/nonexistent")
    if crl.is_file():
        text = crl.read_text(encoding="ascii")
        for holder in holders:
            holder.update(SiteInstruction(revocations=text).entries())


def run_in_folder(
    grid: Grid,
    context: Context,
    run: RunConfig,
    folder: RunFolder,
    *,
    runs_dir: Path,
    transport: str = "tls",
) -> None:
    """The run in ``folder``; a resumed run goes on after its last completed round.

    ``grid`` reaches the sites: the SuperLink's, or the simulation engine's
    (:mod:`medfed.local.simulation`, ``transport`` then says so in the summary).
    ``runs_dir`` holds the earlier runs a warm start (``init_from``) reads.
    """
    run_id = run.resume_of or str(context.run_id)
    signed_run = signed_run_entries(context, run)
    t0 = time.time()
    store = RunStateStore(folder.path)
    if not run.resume_of:
        folder.event("run-started", task=run.task, strategy=run.strategy, rounds=run.rounds)
    secure: SecureAggregation | None = None
    try:
        task = get_task(run.task)
        torch.manual_seed(run.seed)
        # Flower samples each round's sites (and so orders their sum) with `random`: seeded,
        # a run is repeatable; a resumed run restores the state it had instead.
        random.seed(run.seed)
        np.random.seed(run.seed)
        model = task.build_model()
        # Parameters a site keeps (domain adaptation) are neither sent nor aggregated:
        # the global model, its checkpoints and the masked vectors hold the rest.
        local = local_keys(task, model, run.adaptation)
        local_values = sum(model.state_dict()[k].numel() for k in local)
        # The server holds weights, not a model: memory O(model) is its budget. A torch
        # module sits in reference cycles, so each model built here is freed by a
        # collection, before the next copy of the weights is made.
        del model
        gc.collect()
        initial = shared_state(initial_weights(task, seed=run.seed, init=run.init_weights), local)
        gc.collect()
        layout = Layout.of(initial)
        if run.init_from:  # warm start: the weights of an earlier run, checked against ours
            source, initial = load_start_weights(runs_dir, run.init_from, layout)
        if not run.resume_of:  # said once, when the run starts
            if run.init_weights == "public":
                folder.event(
                    "initial-model",
                    source=f"public weights of {task.name}",
                    path=str(task.public_weights),
                )
            if run.init_from:
                folder.event("initial-model", source=str(source))
            if (warning := _update_dp_warning(run, layout.size)) is not None:
                folder.event("warning", reason=warning)
            if (warning := _checkpoint_space_warning(folder, run, layout.size)) is not None:
                folder.event("warning", reason=warning)
            if local:
                folder.event(
                    "adaptation",
                    hook=run.adaptation,
                    site_local_tensors=len(local),
                    site_local_values=local_values,
                )
        check_secure_aggregation(run.strategy, run.secure_aggregation)
        base = build_strategy(run.strategy, dict(run.strategy_options), min_sites=run.min_sites)
        strategy: Strategy = base
        saved = store.load() if run.resume_of else None
        result = Result()
        if saved is not None:  # the strategy and model as they were after that round
            store.restore(saved, base)
            _, initial = load_start_weights(runs_dir, f"{run_id}:{saved.round}", layout)
            result.train_metrics_clientapp.update(
                {int(r): MetricRecord(m) for r, m in saved.train_metrics.items()}
            )
            result.evaluate_metrics_clientapp.update(
                {int(r): MetricRecord(m) for r, m in saved.evaluate_metrics.items()}
            )
        done = saved.round if saved is not None else 0
        if run.resume_of:
            folder.event("run-resumed", round=done + 1, flower_run_id=str(context.run_id))
        refusals = RefusalPolicy()  # one rule for the grid and secure aggregation
        # Sites keep the model they evaluate, so a train message can name it (deployments;
        # the simulation's many in-process sites would each keep one: it says no)
        recorder = RecordingGrid(
            grid,
            folder,
            refusals=refusals,
            reuse_models=bool(getattr(grid, "sites_keep_models", True)),
        )
        recorder.expect_replies_of(4 * layout.size)  # float32 updates (or 32-bit masked)
        recorder.restore_timings(folder.read_events())
        standard: tuple[float, ...] = ()
        if run.harmonization == "histogram":  # before any keys are made or epsilon spent
            standard = agree_standard(
                recorder,
                min_sites=run.min_sites,
                run_entries=signed_run,
                refusals=refusals,
                folder=folder,
                timeout=run.round_timeout_s,
                resumed=bool(run.resume_of),
            )
        elif run.harmonization == "histogram-public":  # the task's: no site is asked
            standard = public_standard(run.task, folder=folder, resumed=bool(run.resume_of))
        if run.secure_aggregation != "off":
            # A resumed run is a new secure-aggregation session (its own Flower run id):
            # fresh per-run keys at every site, so no mask of the crashed session recurs.
            secure = SecureAggregation.joined(
                strategy,
                min_sites=run.min_sites,
                grid=recorder,
                refusals=refusals,
                folder=folder,
                run_id=str(context.run_id),
                config=SecAggConfig(
                    mode=run.secure_aggregation,
                    clip_range=run.secagg_clip,
                    threshold=run.secagg_threshold,
                ),
                size=layout.size,
                round_timeout=run.round_timeout_s,
                run_entries=signed_run,
                certificates=_secagg_certificates(),
            )
            strategy = secure
        else:
            if streams(base):  # each update summed as it arrives: memory O(model)
                strategy = StreamingMean(base, size=layout.size, folder=folder)
            if not run.resume_of:
                folder.event(
                    "warning",
                    reason="secure aggregation is off: the server sees "
                    "every site's update (debugging only)",
                )

        # Handed over to the rounds (popped): from round 1 on, the run holds one global model.
        vector = pack(initial)
        del initial  # at most two copies of the weights at a time
        start = [ArrayRecord({WEIGHTS_KEY: vector_array(vector)})]
        del vector
        previous = [_digest(npy_view(start[0][WEIGHTS_KEY].data))]  # the last round's model

        def end_of_round(server_round: int, arrays: ArrayRecord, so_far: Result) -> None:
            vector = npy_view(arrays[WEIGHTS_KEY].data)
            # views of the global vector: the checkpoint is written without a model copy
            path = folder.save_checkpoint(server_round, unpack(vector, layout, copy=False))
            store.save(
                server_round,
                base,
                train_metrics=so_far.train_metrics_clientapp,
                evaluate_metrics=so_far.evaluate_metrics_clientapp,
            )
            # A lost round (no site's update, or secure aggregation could not unmask)
            # leaves the model as it was: say so rather than report a finished round.
            digest = _digest(vector)
            recorder.finish_round(
                server_round, checkpoint=path.name, unchanged=digest == previous[0]
            )
            previous[:] = [digest]
            _prune_checkpoints(folder, run.keep_checkpoints)  # after the resume state
            pass_on_revocations(signed_run, config, evaluate_config)  # revoked meanwhile?

        config, evaluate_config = ConfigRecord(signed_run), ConfigRecord(signed_run)
        if standard:  # every train and evaluate message carries the agreed landmarks
            entries = SiteInstruction(standard_landmarks=standard).entries()
            config.update(entries)
            evaluate_config.update(entries)
        result = run_rounds(
            strategy,
            grid=recorder,
            arrays=start.pop(),
            first_round=done + 1,
            num_rounds=run.rounds,
            timeout=run.round_timeout_s,
            train_config=config,
            evaluate_config=evaluate_config,
            end_of_round=end_of_round,
            result=result,
        )
        metrics = folder.read_metrics()
        # Cross-site row of the global model: the last round's evaluation at every site.
        last = {
            m["site"]: {k: v for k, v in m.items() if k not in ("round", "site", "phase")}
            for m in metrics
            if m["round"] == run.rounds and m["phase"] == "evaluate" and m["site"] != "global"
        }
        folder.write_cross_site(
            {"global": last},
            metric=task.primary_metric,
            note=f"each site scored the shared model with its own site-local parameters "
            f"(adaptation {run.adaptation!r})"
            if local
            else "",
        )
        plot_metrics(
            metrics,
            task.primary_metric,
            folder.plot_file,
            title=f"{run.task} / {run.strategy} (run {run_id})",
        )
        final = {int(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()}
        events = folder.read_events()
        lost = rounds_without_model(events, run.rounds)
        trained = len(lost) < run.rounds  # else the "model" is the initial one: a failure
        failure = None if trained else no_model_reason(events, run.rounds)
        folder.write_summary(
            RunSummary(
                status="completed" if trained else "failed",
                reason=failure,
                rounds_lost=lost or None,
                run_id=run_id,
                task=run.task,
                strategy=run.strategy,
                rounds=run.rounds,
                protection=Protection(
                    transport=transport,
                    secure_aggregation=run.secure_aggregation,
                    privacy=run.privacy.mode,
                ),
                adaptation=Adaptation(hook=run.adaptation, site_local_parameters=sorted(local)),
                seconds=round(time.time() - t0, 2),
                round_seconds=recorder.round_seconds,
                resumed=[Resumption(**r) for r in folder.resumptions()] if run.resume_of else None,
                sites=sorted(recorder.sites_seen),
                evaluate_metrics=final,
                primary_metric=task.primary_metric,
                final_checkpoint=folder.checkpoint_file(run.rounds).name if trained else None,
            )
        )
        if trained:
            folder.event("run-finished", seconds=round(time.time() - t0, 2))
        else:
            folder.event("run-failed", reason=failure)
        _write_report(folder)
    except SitesRefused as exc:  # a clean end: the sites said no, and why
        _end_refused(folder, exc, run, run_id, seconds=round(time.time() - t0, 2))
        _write_report(folder)
        if secure is not None:
            secure.end("refused")
    except (KeyboardInterrupt, SystemExit) as exc:
        # The process is told to end (its SuperLink went away, or a stop): the run is
        # interrupted, not failed. No summary, so a restarted server resumes it.
        folder.event(
            "run-interrupted",
            reason=f"the ServerApp was stopped "
            f"({type(exc).__name__}) after {round(time.time() - t0, 2)} s",
        )
        raise
    except BaseException as exc:
        folder.write_summary(
            RunSummary(
                status="failed",
                run_id=run_id,
                reason=f"{type(exc).__name__}: {exc}",
                seconds=round(time.time() - t0, 2),
            )
        )
        folder.event("run-failed", reason=f"{type(exc).__name__}: {exc}")
        _write_report(folder)
        if secure is not None:
            secure.end("failed")
        raise


def _digest(vector: np.ndarray) -> bytes:
    """Whether a round changed the model, without keeping a copy of it."""
    return bulk_hash.array_digest(vector)


def _write_report(folder: RunFolder) -> None:
    """report.md; a fault in it is noted, never turned into the run's outcome."""
    try:
        write_report(folder)
    except Exception as exc:  # noqa: BLE001 - the run's own result stands
        folder.event("warning", reason=f"report.md was not written: {type(exc).__name__}: {exc}")


def _checkpoint_space_warning(folder: RunFolder, run: RunConfig, size: int) -> str | None:
    """:func:`checkpoint_space_warning` for the run folder's disk; None if it cannot be read."""
    try:
        free = shutil.disk_usage(folder.path).free
    except OSError:  # a warning only: the run does not depend on it
        return None
    return checkpoint_space_warning(run, size, free, folder.path)


def _prune_checkpoints(folder: RunFolder, keep: int) -> None:
    """Keep the last ``keep`` checkpoints; one that cannot be deleted is a warning, no failure."""
    try:
        folder.prune_checkpoints(keep)
    except OSError as exc:
        folder.event(
            "warning",
            reason=f"old checkpoints were not deleted: {exc}; delete them by hand, or give "
            "the server write access to the run's checkpoints folder",
        )


def checkpoint_space_warning(run: RunConfig, size: int, free: int, where: Path) -> str | None:
    """What to say when the run's checkpoints will not fit in ``free`` bytes, or None.

    Each round writes the global model (4 bytes per value); the folder keeps the last
    ``keep_checkpoints`` of them, or every round.
    """
    kept = min(run.keep_checkpoints or run.rounds, run.rounds)
    needed = 4 * size * kept
    if needed <= free:
        return None
    gib = 1024**3
    return (
        f"the run's checkpoints need about {needed / gib:.2f} GiB ({kept} rounds x "
        f"{4 * size / gib:.3f} GiB) and the disk of {where} has {free / gib:.2f} GiB "
        "free: the run fails when it is full. Keep fewer rounds (--keep-checkpoints N) "
        "or free space"
    )


def _update_dp_warning(run: RunConfig, size: int) -> str | None:
    """What update-level DP's noise does to a model sent between few sites, or None.

    Each site adds noise of std z * C to each of the ``size`` values of an update whose
    whole norm is at most C: the noise's norm is z * sqrt(size) times the largest update,
    and averaging n sites' updates divides it only by sqrt(n).
    """
    p = run.privacy
    if p.mode != "update":
        return None
    z = p.noise_multiplier
    if p.target_epsilon > 0:  # what each site derives (one mechanism per round, no sampling)
        try:
            z = max(
                z,
                privacy_accounting.noise_for_target(
                    p.target_epsilon,
                    p.target_delta,
                    sample_rate=1.0,
                    steps=run.rounds,
                    accountant=p.accountant,
                ),
            )
        except ValueError:
            return None  # the sites refuse such a target themselves, with the reason
    ratio = z * (size / max(run.min_sites, 1)) ** 0.5
    if ratio <= 1.0:
        return None
    noise_norm = z * p.clipping * size**0.5
    return (
        f"update-level DP: each site adds noise of norm about {noise_norm:.3g} "
        f"(noise multiplier {z:.3g}, {size} values) to an update clipped to norm "
        f"{p.clipping:g}; averaged over {run.min_sites} site(s) the noise is still about "
        f"{ratio:.3g} times the largest update, so the model will barely learn. "
        "Update-level DP needs many sites (hundreds); between a few hospitals, protect "
        "examples instead (--dp sample)"
    )


def _end_refused(
    folder: RunFolder, exc: SitesRefused, run: RunConfig, run_id: str, *, seconds: float
) -> None:
    """Close a run the sites' refusals stopped: the rounds done, and each site's rule."""
    done = sorted(
        e.round for e in folder.read_events() if e.is_("round-finished") and e.round is not None
    )
    folder.event(
        "run-refused",
        round=exc.round,
        phase=exc.phase,
        reason=exc.what,
        sites={s: {"rule": e.rule, "reason": e.reason} for s, e in exc.refusals.items()},
    )
    folder.write_summary(
        RunSummary(
            status="refused",
            run_id=run_id,
            task=run.task,
            strategy=run.strategy,
            rounds=run.rounds,
            rounds_finished=len(done),
            reason=str(exc),
            refusals={
                s: SiteRefusal(rule=e.rule, reason=e.reason) for s, e in exc.refusals.items()
            },
            final_checkpoint=folder.checkpoint_file(done[-1]).name if done else None,
            seconds=seconds,
        )
    )
    if done:  # the rounds it finished, plotted
        plot_metrics(
            folder.read_metrics(),
            get_task(run.task).primary_metric,
            folder.plot_file,
            title=f"{run.task} / {run.strategy} (run {run_id}, refused)",
        )
