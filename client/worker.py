"""The warm site worker: a long-lived process holding models, decoded data and the device.

The per-message ClientApp relays each Flower message here over a Unix socket.
Requests are served one at a time (one device, one model in training).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import socketserver
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from cryptography import x509

from medfed.client.audit import AuditLog
from medfed.client.held_models import HeldModels
from medfed.client.outbound import Outbound, OutboundChain, resend_chain, train_chain
from medfed.client.policy import decide
from medfed.client.privacy_guard import Forecast, PrivacyGate, PrivacyRefusal, RoundPrivacy
from medfed.client.released import (
    Released,
    ReleasedUpdates,
    participants_of,
)
from medfed.client.revocations import REVOCATIONS_FILE, CoordinatorRevocations
from medfed.client.secure_site import BelowSiteMinimum, SecureSite
from medfed.client.signed_runs import SIGNED_RUNS_FILE, SignedRuns
from medfed.client.site_local import SiteLocalStore
from medfed.core import heap, wire
from medfed.core.config import RunConfig, SiteConfig, resolve, resolve_data_source
from medfed.core.errors import MedfedError
from medfed.core.identity import load_certificates
from medfed.core.packing import WEIGHTS_KEY, Layout, shared_state, unpack
from medfed.core.run_proof import RunProofError, verify_run
from medfed.core.scaffold import site_control_update, step_correction
from medfed.core.schema import (
    HELD_MODEL_RULE,
    SCAFFOLD_CONTROL_KEY,
    LandmarkReport,
    SecAggReply,
    SiteInstruction,
    SiteReply,
    SiteRequest,
)
from medfed.core.secagg import RosterError
from medfed.data import take_healed
from medfed.tasks import SiteData, Task, engine, get_task
from medfed.tasks.adaptation import local_keys
from medfed.tasks.augmentation import contrast_randomized
from medfed.tasks.dp_units import UnitUnknown, privacy_units
from medfed.tasks.harmonization import harmonize, site_landmarks
from medfed.tasks.pretrain import initial_weights
from medfed.tasks.trainer import DpSgdTrainer, PlainTrainer, RoundOptions, Trainer

log = logging.getLogger("medfed.site")


def _seed(*parts: object) -> int:
    # From the run's seed, the round and the site only, so a rerun of a run
    # configuration trains the same way (reproducible comparisons). DP noise never
    # uses it: its generators come from OS entropy (medfed.tasks.dp).
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class SiteWorker:
    """Handles train/evaluate requests for one site."""

    config: SiteConfig
    config_path: Path
    #: The site daemon's trust: train only runs a coordinator signed, and mask only
    #: with peers whose keys the federation CA certified. In-process simulation has no
    #: CA: it signs nothing and pins peers' keys on first use.
    verify_identities: bool = False
    device: torch.device = field(init=False)
    audit: AuditLog = field(init=False)
    privacy: PrivacyGate = field(init=False)
    secure: SecureSite = field(init=False)
    site_local: SiteLocalStore = field(init=False)
    #: SCAFFOLD's control variate of this site, per run (never sent)
    controls: SiteLocalStore = field(init=False)
    released: ReleasedUpdates = field(init=False)
    signed_runs: SignedRuns = field(init=False)
    revocations: CoordinatorRevocations = field(init=False)
    _train_chain: OutboundChain = field(init=False)
    _resend_chain: OutboundChain = field(init=False)
    _data: dict[str, SiteData] = field(default_factory=dict, init=False)
    #: The site's data mapped onto a run's standard landmarks: (task, standard) -> data
    _harmonized: dict[tuple[str, tuple[float, ...]], SiteData] = field(
        default_factory=dict, init=False
    )
    _models: dict[str, torch.nn.Module] = field(default_factory=dict, init=False)
    _shared: dict[tuple[str, str], tuple[frozenset[str], Layout]] = field(
        default_factory=dict, init=False
    )

    def __post_init__(self) -> None:
        heap.keep_freed_memory()  # DP-SGD's per-sample gradients, freed and made each step
        self.device = engine.select_device(self.config.compute.device)
        if self.config.compute.threads:
            torch.set_num_threads(self.config.compute.threads)
        self.audit = AuditLog(resolve(self.config_path, self.config.site.audit_log))
        self.privacy = PrivacyGate(self.config, self.config_path, audit=self.audit)
        self.secure = SecureSite(
            self.site,
            Path(self.config_path).resolve().parent,
            min_participants=self.config.privacy.secagg_min_participants,
            federation_cas=self._federation_cas if self.verify_identities else None,
        )
        self.site_local = SiteLocalStore(Path(self.config_path).resolve().parent)
        self.controls = SiteLocalStore(Path(self.config_path).resolve().parent, suffix=".scaffold")
        self.released = ReleasedUpdates(Path(self.config_path).resolve().parent)
        self.held_models = HeldModels()
        self.signed_runs = SignedRuns(Path(self.config_path).resolve().parent / SIGNED_RUNS_FILE)
        self.revocations = CoordinatorRevocations(
            Path(self.config_path).resolve().parent / REVOCATIONS_FILE
        )
        self._train_chain = train_chain(
            site_local=self.site_local,
            released=self.released,
            secure=self.secure,
            gate=self.privacy,
            audit=self.audit,
        )
        self._resend_chain = resend_chain(secure=self.secure, gate=self.privacy, audit=self.audit)

    @property
    def site(self) -> str:
        """The site's name."""
        return self.config.site.name

    def data_for(self, task: Task) -> SiteData:
        """The site's data for ``task``, decoded once and kept warm."""
        if task.name not in self._data:
            t0 = time.perf_counter()
            source = resolve_data_source(self.config_path, self.config.data)
            self._data[task.name] = task.load_site_data(source)
            for healed in take_healed():  # damaged cache entries decoded again
                self.audit.record(
                    "cache-healed",
                    task=task.name,
                    file=healed.file,
                    series=healed.series_id,
                    reason=healed.reason,
                )
            description = self._data[task.name].description  # counts only, no identifiers
            log.info(
                "loaded %s data in %.2fs: %s", task.name, time.perf_counter() - t0, description
            )
            self.audit.record("data-loaded", task=task.name, data=dict(description))
        return self._data[task.name]

    def model_for(self, task: Task) -> torch.nn.Module:
        """A model instance per task, reused across rounds (weights replaced each round)."""
        if task.name not in self._models:
            self._models[task.name] = task.build_model().to(self.device)
        return self._models[task.name]

    def shared_spec(self, task: Task, adaptation: str) -> tuple[frozenset[str], Layout]:
        """The keys this site keeps under ``adaptation`` and the layout of the rest."""
        key = (task.name, adaptation)
        if key not in self._shared:
            model = self.model_for(task)
            local = local_keys(task, model, adaptation)
            self._shared[key] = local, Layout.of(shared_state(engine.get_weights(model), local))
        return self._shared[key]

    def warm_up(self, task_names: list[str]) -> None:
        """Load data and build models ahead of the first round."""
        for name in task_names:
            task = get_task(name)
            self.data_for(task)
            self.model_for(task)

    # ---------------------------------------------------------------- requests

    def handle(self, request: wire.Frame) -> wire.Frame:
        """Answer one request; every refusal and failure is an explicit reply."""
        try:
            asked = SiteRequest.from_header(request.header)
        except ValueError as exc:
            return self._refuse(None, "request", str(exc), status="failed")
        op = asked.op
        if op == "ping":
            return self._result({})
        blobs = {
            k[len(wire.BYTES_PREFIX) :]: v.tobytes()
            for k, v in request.arrays.items()
            if k.startswith(wire.BYTES_PREFIX)
        }
        arrays = {k: v for k, v in request.arrays.items() if not k.startswith(wire.BYTES_PREFIX)}
        run_id = asked.run_id
        try:  # the one reading of what the server asked: every key typed and checked
            instruction = SiteInstruction.read(asked.config, blobs)
        except ValueError as exc:
            return self._refuse(run_id, "request", str(exc), status="failed")
        try:
            run = RunConfig.from_json(instruction.run)
        except MedfedError as exc:
            return self._refuse(run_id, "run-config", str(exc), status="failed")
        # The server's id of this attempt keys the secure-aggregation session (a resumed
        # run gets fresh keys); the ledger, audit and site-local parameters keep the
        # run's first id, so a resumed run's rounds add up under one run.
        session = str(run_id)
        run_id = run.resume_of or run_id
        if self.verify_identities:
            try:
                self._check_signed(instruction, session)
            except (RunProofError, MedfedError) as exc:  # (MedfedError: no pinned CA to
                # check with) never trains, joins or spends for it
                return self._refuse(
                    run_id,
                    "run.signature",
                    str(exc),
                    rnd=instruction.server_round,
                )
        decision = decide(self.config.policy, run)
        if not decision.allowed:
            return self._refuse(
                run_id,
                decision.rule,
                decision.reason,
                rnd=instruction.server_round,
            )
        if instruction.held_model:
            held = self._held_model(op, session, instruction.held_model, arrays)
            if isinstance(held, str):  # the server sends the model again on this rule
                return self._refuse(
                    run_id, HELD_MODEL_RULE, held, rnd=instruction.server_round, status="failed"
                )
            arrays = held
        try:
            if op == "train":
                return self._train(run, run_id, session, instruction, arrays)
            if op == "evaluate":
                return self._evaluate(run, run_id, session, instruction, arrays)
            if op == "query":
                return self._query(run, run_id, session, instruction)
            return self._refuse(run_id, "op", f"unknown operation {op!r}", status="failed")
        except Exception as exc:  # reply with the reason; never crash the daemon
            log.error("%s failed: %s\n%s", op, exc, traceback.format_exc())
            self.audit.record("error", run_id=run_id, op=op, reason=str(exc))
            reply = SiteReply.refusal(self.site, "", _reply_reason(exc), status="failed")
            return wire.Frame(reply.header())

    def _held_model(
        self, op: str, session: str, digest: str, arrays: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray] | str:
        """The arrays to use when the server names a held model (text: why there are none).

        Evaluate: keep the message's model. Train without arrays: the model kept under
        ``digest``, the server's name for the model this site last evaluated.
        """
        if op == "evaluate" and arrays:
            kept = self.held_models.keep(session, arrays)
            if kept != digest:  # the server's digest differs: its next train message
                # names a model not kept here, and it sends the model again
                log.warning("kept model digest %s, the server named %s", kept[:12], digest[:12])
            return arrays
        if op == "train" and not arrays:
            held = self.held_models.get(session, digest)
            if held is not None:
                return held
            return (
                f"this site does not hold the global model {digest[:16]}... the server "
                "named (its daemon restarted since it evaluated that model?); the server "
                "sends the model again"
            )
        return (
            f"a {op} message with {len(arrays)} array(s) named a held model; only an "
            "evaluate message with the model or a train message without it can"
        )

    def _federation_cas(self) -> list[x509.Certificate]:
        """The CA certificates this site pinned (read each time: a rotation replaces them)."""
        return load_certificates(resolve(self.config_path, self.config.site.federation_ca))

    def _check_signed(self, asked: SiteInstruction, session: str) -> None:
        """Refuse (RunProofError) a run unsigned, signed by a revoked coordinator, or replayed."""
        cas = self._federation_cas()
        verified = verify_run(asked.run, asked.proof, cas)
        if verified.serial in self.revocations.revoked(asked.revocations, cas):
            raise RunProofError(
                f"coordinator {verified.coordinator!r} was revoked by the "
                "federation (its certificate is on the CA's revocation list)"
            )
        self.signed_runs.claim(verified, session)

    def _refuse(
        self,
        run_id: object,
        rule: str,
        reason: str,
        *,
        status: Literal["refused", "failed"] = "refused",
        rnd: int | None = None,
    ) -> wire.Frame:
        where = {"round": rnd} if rnd else {}
        self.audit.record(status, run_id=run_id, rule=rule, reason=reason, **where)
        log.warning("%s run %s: %s", status, run_id, reason)
        return wire.Frame(SiteReply.refusal(self.site, rule, reason, status=status).header())

    def _result(
        self, metrics: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
    ) -> wire.Frame:
        """A result frame: the metrics in its header, the arrays beside it."""
        return wire.Frame(SiteReply.result(self.site, metrics).header(), arrays or {})

    def _load_global(
        self, task: Task, run: RunConfig, run_id: object, arrays: dict[str, np.ndarray]
    ) -> torch.nn.Module:
        """The task model with the global weights and this site's own local parameters."""
        if WEIGHTS_KEY not in arrays:
            raise ValueError(f"the message carries no {WEIGHTS_KEY!r} array")
        model = self.model_for(task)
        local, layout = self.shared_spec(task, run.adaptation)
        weights = unpack(arrays[WEIGHTS_KEY], layout)
        if local:
            weights.update(
                self.site_local.load(str(run_id)) or self._initial_local(task, run, local)
            )
        engine.set_weights(model, weights)
        return model

    @staticmethod
    def _initial_local(task: Task, run: RunConfig, local: frozenset[str]) -> dict[str, np.ndarray]:
        # The same initial values as the server's model of the run (same seed or weights).
        fresh = initial_weights(task, seed=run.seed, init=run.init_weights)
        return {k: fresh[k] for k in local}

    def _train(
        self,
        run: RunConfig,
        run_id: object,
        session: str,
        asked: SiteInstruction,
        arrays: dict,
    ) -> wire.Frame:
        task = get_task(run.task)
        rnd = asked.server_round
        if run.secure_aggregation != "off":  # whom the update would be masked with, first:
            try:  # a peer key the CA did not certify is refused before anyone trains
                self.secure.accept_peers(session, rnd, asked)
            except RosterError as exc:  # the run's directory: the same every round
                return self._refuse(run_id, SECAGG_PEERS_RULE, str(exc), rnd=rnd)
            except BelowSiteMinimum as exc:  # the run's threshold, against site.toml
                return self._refuse(run_id, SECAGG_MINIMUM_RULE, str(exc), rnd=rnd)
        data = self._run_data(task, run, asked)
        if data is None:
            return self._refuse(run_id, "harmonization", _NO_STANDARD, rnd=rnd, status="failed")
        model = self._load_global(task, run, run_id, arrays)
        if (
            arrays.get(WEIGHTS_KEY) is not None
            and (
                replay := self.released.matching(
                    str(run_id), run, rnd, arrays[WEIGHTS_KEY], participants_of(asked)
                )
            )
            is not None
        ):
            return self._resend(run, run_id, session, rnd, asked, arrays, replay)
        epochs, batch_size, lr = _round_shape(run, task)
        control = self._control(task, run, run_id, arrays)
        try:  # every option the strategy sent, checked before any epsilon is reserved
            options = RoundOptions(
                epochs,
                batch_size,
                lr,
                proximal_mu=asked.proximal_mu,
                local_steps=asked.local_steps,
                step_correction=None
                if control is None
                else step_correction(control[1], control[0]),
            )
        except ValueError as exc:
            rule = "strategy.proximal_mu" if asked.proximal_mu < 0 else "strategy.local_steps"
            return self._refuse(run_id, rule, str(exc), rnd=rnd)
        if control is not None and run.privacy.mode == "update":
            return self._refuse(
                run_id,
                "privacy.mode",
                "SCAFFOLD's site control variate would be computed from the un-noised "
                "local model, which update-level DP does not cover; use --dp sample (the "
                "control variate is then post-processing of DP-SGD) or another strategy",
                rnd=rnd,
            )
        if run.privacy.mode == "sample" and asked.local_steps:
            units = _privacy_units(run, data)
            planned = epochs * -(-units // batch_size)
            if asked.local_steps > planned:  # DP-SGD cannot take them within its budget
                return self._refuse(
                    run_id,
                    "strategy.local_steps",
                    f"the strategy asks for {asked.local_steps} local steps, more than the "
                    f"{planned} DP-SGD steps ({epochs} epoch(s) of {units} units in batches "
                    f"of {batch_size}) this site's privacy budget is planned for; lower the "
                    "strategy's local_steps or raise the run's local epochs",
                    rnd=rnd,
                )
        try:
            privacy = self.privacy.before_training(
                run,
                str(run_id),
                rnd,
                model=model,
                batch_size=batch_size,
                epochs=epochs,
                num_examples=_privacy_units(run, data),
            )
        except UnitUnknown as exc:
            return self._refuse(run_id, "privacy.unit", str(exc), rnd=rnd)
        except PrivacyRefusal as refusal:
            return self._refuse(run_id, refusal.rule, refusal.reason, rnd=rnd)
        t0 = time.perf_counter()
        stats = self._trainer(run, rnd, privacy, data).train(task, model, data.train, options)
        seconds = time.perf_counter() - t0
        metrics = {"steps": stats.steps, "train-seconds": seconds, **privacy.metrics()}
        if privacy.mode == "off":
            metrics["train-loss"] = stats.loss
        else:  # a mean loss over the protected examples is neither clipped nor noised:
            # epsilon does not cover it, so it stays in the site's own log
            log.info(
                "run %s round %s: train loss %.4f (not sent under DP)", run_id, rnd, stats.loss
            )
        local, layout = self.shared_spec(task, run.adaptation)
        own = None
        if control is not None:  # option II
            trained = engine.get_weights(model)
            sent = unpack(arrays[WEIGHTS_KEY], layout)
            own = site_control_update(
                control[1], control[0], sent, trained, local_steps=asked.local_steps
            )
        out = self._train_chain(
            Outbound(
                run,
                str(run_id),
                session,
                rnd,
                asked,
                arrays[WEIGHTS_KEY],
                metrics,
                trained=engine.get_weights(model),
                local_keys=local,
                privacy=privacy,
                steps=stats.steps,
                weight=float(stats.num_examples),
            )
        )
        if own is not None:  # kept once the update may leave (a refusing filter raised
            # above: then the server's control variate never hears of this round, nor
            # does the site's), and before it leaves (a crash then loses neither)
            self.controls.save(str(run_id), own)
        return self._result(out.metrics, out.arrays)

    def _run_data(self, task: Task, run: RunConfig, asked: SiteInstruction) -> SiteData | None:
        """The site's data as the run sees it (harmonized, contrast-randomized if asked).

        Harmonized onto the run's standard, if any; its training split contrast-randomized
        when the run asks (seeded by run seed, round and site). None: the run harmonizes
        but the request carries no standard (never trained or scored unharmonized instead).
        """
        data = self.data_for(task)
        if run.harmonization != "off":
            if not asked.standard_landmarks:
                return None
            key = (task.name, asked.standard_landmarks)
            if key not in self._harmonized:
                while len(self._harmonized) >= 2:  # a daemon serves many runs: keep few
                    self._harmonized.pop(next(iter(self._harmonized)))
                self._harmonized[key] = harmonize(data, asked.standard_landmarks)
            data = self._harmonized[key]
        if run.augmentation == "contrast":
            seed = _seed(run.seed, asked.server_round, self.site, "augmentation")
            data = contrast_randomized(data, seed=seed)
        return data

    def _landmarks(self, run: RunConfig, run_id: object) -> wire.Frame:
        """Answer a landmarks query: the site's intensity landmarks, if its rules allow.

        They are statistics of the site's data that no DP mechanism covers: refused
        under DP (the run's or the site's), and under secure aggregation unless the
        site's policy allows them in the clear (``policy.share_landmarks``).
        """
        if run.harmonization != "histogram":
            return self._refuse(
                run_id, "harmonization", "the run does not harmonize", status="failed"
            )
        if run.privacy.mode != "off":
            return self._refuse(
                run_id,
                "privacy.mode",
                f"the run uses DP ({run.privacy.mode}), which does not cover the intensity "
                "landmarks harmonization 'histogram' would send; under DP harmonize onto "
                "the task's public landmarks ('histogram-public'), or run without DP",
            )
        if self.config.privacy.datasets:
            try:
                name, budget = self.config.privacy.budget_for(run.dataset)
            except MedfedError as exc:
                return self._refuse(run_id, "privacy.datasets", exc.what)
            if budget.dp_required:
                return self._refuse(
                    run_id,
                    f"privacy.datasets.{name}.dp_required",
                    "this site requires DP on its data, which does not cover the intensity "
                    "landmarks harmonization 'histogram' would send",
                )
        if run.secure_aggregation != "off" and not self.config.policy.share_landmarks:
            return self._refuse(
                run_id,
                "policy.share_landmarks",
                "harmonization 'histogram' needs this site's intensity landmarks in the "
                "clear, but the run uses secure aggregation and the site's policy does not "
                "allow them (set policy.share_landmarks = true in site.toml to allow)",
            )
        landmarks, scans = site_landmarks(self.data_for(get_task(run.task)))
        report = LandmarkReport(tuple(float(v) for v in landmarks), scans)
        self.audit.record("landmarks-sent", run_id=run_id, **report.metrics())
        return self._result(report.metrics())

    def _control(
        self, task: Task, run: RunConfig, run_id: object, arrays: dict
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """SCAFFOLD's server control variate (as sent) and this site's own (None: not sent).

        The site's own starts at zero and is kept per run in ``site-local/`` (never sent).
        """
        if arrays.get(SCAFFOLD_CONTROL_KEY) is None:
            return None
        _, layout = self.shared_spec(task, run.adaptation)
        server = unpack(np.asarray(arrays[SCAFFOLD_CONTROL_KEY], dtype=np.float32), layout)
        own = self.controls.load(str(run_id)) or {
            k: np.zeros_like(v, dtype=np.float32) for k, v in server.items()
        }
        return server, own

    def _trainer(self, run: RunConfig, rnd: int, privacy: RoundPrivacy, data: SiteData) -> Trainer:
        """Plain training, or DP-SGD when the round's privacy mode is "sample"."""
        if privacy.mode == "sample":
            return DpSgdTrainer(
                self.device,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=run.privacy.max_grad_norm,
                accountant=run.privacy.accountant,
                optimizer=run.privacy.optimizer,
                average_iterates=run.privacy.average_iterates,
                units=data.train_units.get(run.privacy.unit),
            )
        return PlainTrainer(
            self.device, seed=_seed(run.seed, rnd, self.site), amp=self.config.compute.amp
        )

    def _resend(
        self,
        run: RunConfig,
        run_id: object,
        session: str,
        rnd: int,
        asked: SiteInstruction,
        arrays: dict,
        replay: Released,
    ) -> wire.Frame:
        """Send round ``rnd``'s released update again: the server lost it in a crash.

        Same global model, same update, masked under this attempt's keys; no training,
        no new epsilon (:mod:`medfed.client.released`).
        """
        out = self._resend_chain(
            Outbound(
                run,
                str(run_id),
                session,
                rnd,
                asked,
                arrays[WEIGHTS_KEY],
                {},
                replay=replay,
            )
        )
        log.warning(
            "run %s round %s: the server lost this round; sent the same update "
            "again (no new training, no new epsilon)",
            run_id,
            rnd,
        )
        return self._result(out.metrics, out.arrays)

    def _query(
        self, run: RunConfig, run_id: object, session: str, asked: SiteInstruction
    ) -> wire.Frame:
        """Secure-aggregation set-up (join) and unmasking (reveal) for a run; landmarks."""
        if asked.landmarks_query:
            return self._landmarks(run, run_id)
        if run.secure_aggregation == "off":
            return self._refuse(
                run_id, "query", "the run has secure aggregation off", status="failed"
            )
        if asked.join:
            forecast = self._preflight(run, run_id)
            if isinstance(forecast, wire.Frame):
                return forecast  # refused
            out = self.secure.join(session, asked.join)
            metrics: dict[str, float] = {}
            if forecast is not None and forecast.last_round < run.rounds:
                # the site will refuse the rest; say so now (the last round it covers)
                metrics[wire.BUDGET_ROUNDS_KEY] = forecast.last_round
            if forecast is not None and forecast.fitted:
                metrics[wire.FITTED_NOISE_KEY] = forecast.noise_multiplier
            self.audit.record(
                "secure-aggregation-joined", run_id=run_id, mode=run.secure_aggregation, **metrics
            )
            return self._result(metrics, _secagg_arrays(out))
        if asked.run_ended:  # ended before its last round: nothing more comes
            self._end_run(run, run_id, session, reason=f"run {asked.run_ended} at the server")
            return self._result({})
        if asked.unmask:
            reveal, entry = self.secure.reveal(session, asked.unmask)
            self.audit.record("reveal-sent", run_id=run_id, secure_aggregation=entry)
            return self._result({}, _secagg_arrays(SecAggReply(reveal=reveal)))
        return self._refuse(run_id, "query", "unknown query", status="failed")

    def _preflight(self, run: RunConfig, run_id: object) -> wire.Frame | Forecast | None:
        """At the join: refuse a run this site would refuse in its first round.

        Otherwise how many of its rounds the budget covers, at which noise (None: no
        budget applies).
        Under secure aggregation a joined site's refusal can cost the others their
        round, after they spent epsilon on it; refused up front, nobody has trained.
        """
        task = get_task(run.task)
        epochs, batch_size, _ = _round_shape(run, task)
        try:
            return self.privacy.preflight(
                run,
                str(run_id),
                model=self.model_for(task),
                num_examples=_privacy_units(run, self.data_for(task)),
                batch_size=batch_size,
                epochs=epochs,
            )
        except UnitUnknown as exc:
            return self._refuse(run_id, "privacy.unit", str(exc))
        except PrivacyRefusal as refusal:
            return self._refuse(run_id, refusal.rule, refusal.reason)

    def _evaluate(
        self, run: RunConfig, run_id: object, session: str, asked: SiteInstruction, arrays: dict
    ) -> wire.Frame:
        task = get_task(run.task)
        data = self._run_data(task, run, asked)
        if data is None:
            return self._refuse(
                run_id, "harmonization", _NO_STANDARD, rnd=asked.server_round, status="failed"
            )
        model = self._load_global(task, run, run_id, arrays)
        metrics = engine.evaluate(task, model, data.val, device=self.device)
        self.audit.record("metrics-sent", run_id=run_id, task=run.task, metrics=metrics)
        last_round = asked.server_round >= run.rounds
        if last_round:
            self._end_run(run, run_id, session, reason="run ended")
        return self._result(metrics)

    def _end_run(self, run: RunConfig, run_id: object, session: str, *, reason: str) -> None:
        """Forget a run that is over: its secrets, its hold on the budget, its last update.

        The last round's evaluation follows its unmasking: the run's pairwise secrets are
        no longer needed, and kept they could unmask a stored update later.
        """
        if run.secure_aggregation != "off":
            self.secure.end_run(session)
            self.audit.record("secure-aggregation-ended", run_id=run_id, reason=reason)
        self.privacy.release(str(run_id), reason=reason)
        self.released.forget(str(run_id))
        self.held_models.forget(session)


#: The rule of a site's refusal to mask with a peer whose key the federation CA did
#: not certify for it (or, without a CA, whose pinned key changed).
SECAGG_PEERS_RULE = "secagg.peer_key"
#: ... and to mask in a run whose threshold is below its ``[privacy]`` floor.
SECAGG_MINIMUM_RULE = "privacy.secagg_min_participants"
_NO_STANDARD = (
    "the run harmonizes intensities ('histogram') but the request carries no standard "
    "landmarks; the server sends them after its landmarks query"
)


def _round_shape(run: RunConfig, task: Task) -> tuple[int, int, float]:
    """Local epochs, batch size and learning rate of a round: the run's, else the task's."""
    hp = task.defaults
    return (
        run.local_epochs or hp.local_epochs,
        run.batch_size or hp.batch_size,
        run.learning_rate or hp.learning_rate,
    )


def _privacy_units(run: RunConfig, data: SiteData) -> int:
    """What DP-SGD samples from: examples, scans or patients (``privacy.unit``)."""
    if run.privacy.mode != "sample":
        return len(data.train)  # type: ignore[arg-type]
    return privacy_units(len(data.train), data.train_units, run.privacy.unit)  # type: ignore[arg-type]


def _reply_reason(exc: Exception) -> str:
    """A failure as the coordinator reads it: without the site's local paths.

    Where a MedfedError happened (often a path at the site) and an OSError's file
    stay in the site's log and audit log.
    """
    if isinstance(exc, MedfedError):
        text = MedfedError(exc.what, expected=exc.expected, fix=exc.fix).render()
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or 'failed'} (the file is named in the site's log)"
    else:
        text = str(exc)
    return f"{type(exc).__name__}: {text}"


def _secagg_arrays(reply: SecAggReply) -> dict[str, np.ndarray]:
    """A reply's secure-aggregation bytes as local-channel arrays (``bytes:`` names)."""
    return {wire.BYTES_PREFIX + k: _u8(v) for k, v in reply.blobs().items()}


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


class _Handler(socketserver.BaseRequestHandler):
    server: _WorkerServer

    def handle(self) -> None:
        try:
            request = wire.recv_frame(self.request)
        except wire.ChannelError as exc:
            log.warning("dropped a malformed request: %s", exc)
            return
        wire.send_frame(self.request, self.server.worker.handle(request))


class _WorkerServer(socketserver.UnixStreamServer):
    def __init__(self, path: str, worker: SiteWorker) -> None:
        self.worker = worker
        super().__init__(path, _Handler)


def bind(worker: SiteWorker, socket_path: Path) -> socketserver.UnixStreamServer:
    """Bind the worker's Unix socket (owner-only), replacing a stale socket file."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if len(str(socket_path)) > 100:
        raise MedfedError(
            "The worker socket path is too long for a Unix socket.",
            where=str(socket_path),
            expected="at most 100 characters",
            fix="set site.worker_socket in site.toml to a shorter path",
        )
    if socket_path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(socket_path))
        except OSError:
            socket_path.unlink()  # stale socket of a process that is gone
        else:
            raise MedfedError(
                "Another site worker is already running on this socket.",
                where=str(socket_path),
                fix="stop the other `medfed site start` first",
            )
        finally:
            probe.close()
    old = os.umask(0o177)
    try:
        server = _WorkerServer(str(socket_path), worker)
    finally:
        os.umask(old)
    return server
