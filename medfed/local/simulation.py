"""In-process simulation: the ServerApp's run over N simulated sites on this one machine.

What runs is the deployment's own code, end to end. The ServerApp's run logic
(:func:`medfed.server.app.run_in_folder`: strategies, secure aggregation, checkpoints, the run
folder, the report) is handed a :class:`SimulationGrid` in place of the SuperLink's
grid. Each message it pushes goes through the ClientApp's two edges
(:func:`medfed.client.app.request_frame` and :func:`~medfed.client.app.reply_message`)
around the site's :class:`medfed.client.worker.SiteWorker` (policy, data, training,
DP, secure-aggregation masking, ledger, audit), and its reply comes back on the next
pull. The run folder is the one a deployed run writes (``summary.json`` says
``"engine": "simulation"``), so `medfed compare` and the report read it as they read
any other.

Cheap per simulated site, and nothing held for sites outside the round: a site is a
name, a ``[data]`` section and, from the first message it gets, a small folder
(``<run folder>/sites/<site>/``: site.toml, audit log, privacy ledger,
secure-aggregation keys, site-local parameters: what a real site keeps between
rounds). Its worker (model, decoded data) is built when a message for it is
delivered and dropped after (a federation of up to :data:`WARM_SITES_MAX` sites keeps
all of them warm, as deployed sites do; ``keep_warm`` sets how many). Messages are
delivered in the order they were pushed, lazily: a pull runs a site only when its
reply is due, so a consumer that aggregates replies as they come holds one at a time
(with worker processes too: a process reads a few requests ahead and keeps each
finished reply until the consumer takes it). A site's training seed depends on
(run seed, round, site name) only (the worker's own ``_seed``), as in a deployment;
so does its data.

Why not Flower's Simulation Engine
----------------------------------
Flower's Simulation Engine runs each ClientApp call in a Ray actor: process
isolation and multi-machine scale-out, at the cost of a Ray runtime per machine,
serialising every message through Ray's object store, and a ClientApp that cannot
reach the site's warm worker. medfed's engine keeps the server (strategies,
streaming aggregation, secure aggregation, run folder) in this process and runs the
sites either here, one after another (``workers=1``: no serialisation beyond the
ClientApp's own edges, the lowest memory, the default up to :data:`WARM_SITES_MAX`
sites), or in ``workers`` processes of their own
(:mod:`medfed.local.site_processes`: every core trains, and the server's memory is
the server's alone; the default beyond that). Either way the replies are aggregated
in the order the messages were sent, so the number of processes does not change the
result. Many machines: deploy (Flower's Deployment Engine, `deploy/`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
import tomllib
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from medfed.client.app import reply_message, request_frame
from medfed.client.site import SITE_TOML
from medfed.client.worker import SiteWorker
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.run_report import write_report
from medfed.core.run_summary import RunEvent, RunSummary, Simulation
from medfed.core.runs import RunFolder
from medfed.local.sim_sites import SimSite
from medfed.local.site_processes import SiteProcesses, default_workers
from medfed.server.app import run_in_folder

log = logging.getLogger("medfed.simulation")

#: Node id of the first simulated site (the SuperLink's own id is 1).
NODE_ID_BASE = 1_000_000
#: A federation of at most this many sites keeps every site's worker built (by default).
WARM_SITES_MAX = 8
#: Each site's budget where a simulation measures epsilon rather than rationing it.
SIMULATION_BUDGET = {
    "epsilon_max": 1e6,
    "min_noise_multiplier": 0.0,
    "max_clipping_norm": 1e3,
    "dp_required": False,
}
#: Folder of the simulated sites inside the run folder.
SITES_DIR = "sites"

#: Called after each site's reply: (phase, round, sites done, sites in the batch, site).
SiteProgress = Callable[[str, int, int, int, str], None]


class SitePool:
    """The simulated sites: folders made on first use, workers built on demand.

    Parameters
    ----------
    root : Path
        Where the site folders go (``root/<site name>/``).
    sites : sequence of SimSite
        The sites, in node order.
    keep_warm : int, optional
        Workers kept built between messages (least recently used leave first); 0
        builds a worker for every message (lowest memory). Default: every site's
        when there are at most :data:`WARM_SITES_MAX` (as deployed: each site daemon
        keeps its worker warm), else none (nothing held for sites outside a round).
    budget : mapping, optional
        Overrides of each site's default privacy budget (``[privacy.datasets.NAME]``
        keys, e.g. ``epsilon_max``); default: a new site's (`medfed site init`).
    policy : mapping, optional
        Overrides of each site's ``[policy]`` keys (e.g. ``share_landmarks``); default:
        a new site's, which refuses what a deployed site's operator must allow first.
    """

    def __init__(
        self,
        root: Path,
        sites: Sequence[SimSite],
        *,
        keep_warm: int | None = None,
        budget: Mapping[str, Any] | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ConfigError("Two simulated sites share a name.", where=", ".join(names))
        if keep_warm is None:
            keep_warm = len(sites) if len(sites) <= WARM_SITES_MAX else 0
        if keep_warm < 0:
            raise ConfigError(f"keep_warm must be >= 0, got {keep_warm}.", where="--keep-warm")
        self.root = Path(root)
        self.sites = list(sites)
        self.keep_warm = keep_warm
        self._budget = dict(budget or {})
        self._policy = dict(policy or {})
        self._template = tomllib.loads(
            SITE_TOML.format(
                name="site", server="127.0.0.1:9200", runtime_port=9300, seed=0, profile=0
            )
        )
        self._warm: OrderedDict[int, SiteWorker] = OrderedDict()
        self.used: set[int] = set()  # sites that got a message

    def __len__(self) -> int:
        return len(self.sites)

    def config_path(self, index: int) -> Path:
        """The site.toml of site ``index`` (written when it first gets a message)."""
        return self.root / self.sites[index].name / "site.toml"

    def config(self, index: int) -> SiteConfig:
        """Site ``index``'s configuration: a new site's, with its name, data and budget."""
        site = self.sites[index]
        data = copy.deepcopy(self._template)
        data["site"]["name"] = site.name
        data["data"] = site.data.model_dump(mode="json", exclude_none=True)
        default = data["privacy"]["default"]
        data["privacy"]["datasets"][default].update(self._budget)
        data.setdefault("policy", {}).update(self._policy)
        return validate(SiteConfig, data, where=f"simulated site {site.name}")

    def worker(self, index: int) -> SiteWorker:
        """Site ``index``'s worker: a warm one, or a new one over its folder."""
        if index in self._warm:
            self._warm.move_to_end(index)
            return self._warm[index]
        config, path = self.config(index), self.config_path(index)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            toml = tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
            path.write_text(
                f"# simulated site {config.site.name} (medfed simulate)\n" + toml, encoding="utf-8"
            )
        worker = SiteWorker(config, path)
        self.used.add(index)
        if self.keep_warm:
            self._warm[index] = worker
            while len(self._warm) > self.keep_warm:
                self._warm.popitem(last=False)
        return worker

    def end_run(self, run_id: str) -> None:
        """After the run: no site keeps its last update or its secure-aggregation keys.

        A deployed site forgets them at its last evaluation or when told the run ended;
        simulated sites that were not evaluated in the last round forget them here.
        """
        for index in sorted(self.used):
            worker = self.worker(index)
            worker.released.forget(run_id)
            worker.secure.end_run(run_id)
        self._warm.clear()


class SimulationGrid(Grid):
    """A Flower Grid whose nodes are the simulated sites of a :class:`SitePool`.

    ``push_messages`` queues; ``pull_messages`` delivers each asked-for message to
    its site (in push order, one at a time, as the returned iterator is consumed)
    and yields the reply. A failure at a site is an error reply, as the site
    daemon's executor sends one.
    """

    #: The server does not ask simulated sites to keep the model they evaluate
    #: (``server/model_reuse.py``): a thousand sites would each hold one.
    sites_keep_models = False

    def __init__(
        self,
        sites: SitePool,
        *,
        run_id: int,
        on_site: SiteProgress | None = None,
        processes: SiteProcesses | None = None,
    ) -> None:
        self.sites = sites
        self._run = Run.create_empty(run_id)
        self._on_site = on_site
        self._processes = processes
        # How far ahead of the reply taken messages are handed to the sites: in-process
        # a site runs when its reply is taken; with worker processes every process gets
        # the next message of one of its sites while earlier replies are aggregated.
        self._ahead = 1 if processes is None else 4 * processes.workers
        self._pending: OrderedDict[str, Message] = OrderedDict()
        self._started: OrderedDict[str, tuple[Message, _Reply | None]] = OrderedDict()
        self._count = 0  # messages pushed, for their ids
        self._batch = (0, 0)  # (delivered, pushed) since the queue was last empty

    def close(self) -> None:
        """Collect the replies the sites' processes still hold (they are dropped)."""
        if self._processes is not None:
            for _, reply in self._started.values():
                if reply is not None:
                    reply.result()
        self._started.clear()

    def set_run(self, run: Run) -> None:
        """Set the run this grid works in."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid works in."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new message (Flower's deprecated helper; strategies build Messages directly)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Every simulated site's node id, in site order."""
        return [NODE_ID_BASE + i for i in range(len(self.sites))]

    def get_nodes(self) -> Iterable[NodeInfo]:
        """The nodes, with ids only."""
        return [NodeInfo(node_id=n) for n in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue the messages; returns their ids."""
        ids = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"sim-{self._count}"
            if msg.metadata.reply_to_message_id or msg.metadata.ttl <= 0:
                raise ValueError(f"Invalid message: {msg}")
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        done, total = self._batch
        self._batch = (done, total + len(ids))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterator[Message]:
        """The replies to ``message_ids``, in push order: each site runs as its reply is due.

        In-process, a site runs when its reply is taken. With worker processes, the
        messages of the next ``4 x workers`` replies go to their sites' processes (a
        few each, in push order), so every process is busy while the consumer
        aggregates; a finished reply waits in its site's process until it is taken,
        so the caller holds one reply at a time, whatever the number of workers.
        """
        wanted = set(message_ids)
        due = iter([m for m in [*self._started, *self._pending] if m in wanted])
        window: deque[str] = deque()

        def fill() -> None:
            while len(window) < self._ahead:
                mid = next(due, None)
                if mid is None:
                    break
                if mid not in self._started:
                    msg = self._pending.pop(mid, None)
                    if msg is None:  # taken by an earlier pull meanwhile
                        continue
                    self._started[mid] = (msg, None)
                window.append(mid)
            waiting: set[int] = set()  # processes with an earlier message not handed over
            for mid in window:  # in push order: a process takes its sites' messages in turn
                msg, reply = self._started[mid]
                if reply is not None:
                    continue
                lane = self._lane(msg)
                if lane not in waiting and self._can_start(msg):
                    self._started[mid] = (msg, self._start(msg))
                else:
                    waiting.add(lane)

        fill()
        while window:
            mid = window.popleft()
            started = self._started.get(mid)
            if started is None:  # taken by an earlier pull meanwhile
                continue
            msg, reply = started
            if reply is None:  # its process is free: every earlier message was taken
                reply = self._start(msg)
            result = self._finish(msg, reply.result())
            del self._started[mid]  # only once taken: an abandoned pull leaves it for the next
            fill()
            yield result
            del result  # taken: not held while the next reply is received

    def _lane(self, msg: Message) -> int:
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        return 0 if self._processes is None else self._processes.lane_of(index)

    def _can_start(self, msg: Message) -> bool:
        """Whether the message's site process takes it now (in-process: always)."""
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        return self._processes is None or self._processes.can_post(index)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then deliver every message; ``timeout`` is not applied (sites run here)."""
        return list(self.pull_messages(self.push_messages(messages)))

    def _start(self, msg: Message) -> _Reply:
        """Hand ``msg`` to its site: now to its worker process, or when its reply is taken."""
        if self._processes is None:
            return _Later(lambda: self._answer(msg))
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        request = self._request(msg)
        if not isinstance(request, wire.Frame):
            return _Done(request)
        posted = self._processes.post(index, request)
        processes = self._processes
        return _Later(lambda: self._reply(msg, lambda: processes.collect(posted)))

    def _answer(self, msg: Message) -> Message:
        """Message -> frame -> the site's worker -> frame -> reply, as the site daemon does."""
        request = self._request(msg)
        if not isinstance(request, wire.Frame):
            return request
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        return self._reply(msg, lambda: self.sites.worker(index).handle(request))

    def _request(self, msg: Message) -> wire.Frame | Message:
        """The site's request frame of ``msg``, or the error reply when there is none."""
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        phase = str(msg.metadata.message_type).split(".")[0]
        if not 0 <= index < len(self.sites):
            return Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg
            )
        try:
            if phase not in ("train", "evaluate", "query"):
                raise ValueError(
                    f"the ClientApp has no handler for message type {msg.metadata.message_type!r}"
                )
            return request_frame(phase, msg)
        except Exception as exc:  # an error reply, as the site daemon's executor sends
            return _error_reply(msg, exc)

    @staticmethod
    def _reply(msg: Message, site: Callable[[], wire.Frame]) -> Message:
        try:
            return reply_message(site(), msg)
        except Exception as exc:  # an error reply, as the site daemon's executor sends
            return _error_reply(msg, exc)

    def _finish(self, msg: Message, reply: Message) -> Message:
        """Give the reply its id; report the site's progress."""
        index = msg.metadata.dst_node_id - NODE_ID_BASE
        name = self.sites.sites[index].name if 0 <= index < len(self.sites) else "?"
        reply.metadata.__dict__["_message_id"] = f"{msg.metadata.message_id}-reply"
        done, total = self._batch
        done += 1
        self._batch = (
            (0, 0)
            if not (self._pending or self._started.keys() - {msg.metadata.message_id})
            else (done, total)
        )
        if self._on_site is not None:
            self._on_site(
                str(msg.metadata.message_type).split(".")[0], _round_of(msg), done, total, name
            )
        return reply


class _Later:
    """A reply computed (in-process) or collected (from a worker process) when it is taken."""

    def __init__(self, compute: Callable[[], Message]) -> None:
        self._compute = compute

    def result(self) -> Message:
        return self._compute()


class _Done:
    """A reply known when the message was handed over (an error reply)."""

    def __init__(self, reply: Message) -> None:
        self._reply = reply

    def result(self) -> Message:
        return self._reply


_Reply = _Later | _Done


def _error_reply(msg: Message, exc: Exception) -> Message:
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
        reply_to=msg,
    )


def _round_of(msg: Message) -> int:
    content = msg.content
    if wire.CONFIG_KEY not in content:
        return 0
    return int(content[wire.CONFIG_KEY].get(wire.SERVER_ROUND_KEY, 0) or 0)


class EventTail:
    """The events a run folder's events.jsonl gained since the last call."""

    def __init__(self, folder: RunFolder) -> None:
        self._path = folder.events_file
        self._offset = 0

    def __call__(self) -> list[RunEvent]:
        """New complete events, oldest first."""
        try:
            with open(self._path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self._offset += end
        out = []
        for line in data[:end].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if (event := RunEvent.parse(json.loads(line))) is not None:
                    out.append(event)
        return out


@contextlib.contextmanager
def _as_server_app(run_id: int) -> Iterator[None]:
    """What a ServerApp process has: Flower's task identity (messages carry its run)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def _collect_only_the_runs_objects() -> Iterator[None]:
    """Leave what exists before the run out of the collections made during it.

    As the ServerApp process does (``gc.freeze``): the round loop's collection after
    every round then walks the run's objects, not torch's, MONAI's and Flower's
    (0.23 s a round on the 2-core machine). A caller that froze objects itself keeps
    them frozen.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _new_run_id(runs_dir: Path) -> int:
    """A random run id, as Flower's (a positive 63-bit integer), unused in ``runs_dir``."""
    while True:
        run_id = secrets.randbits(63)
        if run_id and not (runs_dir / str(run_id)).exists():
            return run_id


def simulate(
    run: RunConfig,
    sites: Sequence[SimSite],
    runs_dir: Path,
    *,
    keep_warm: int | None = None,
    budget: Mapping[str, Any] | None = None,
    policy: Mapping[str, Any] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_site: SiteProgress | None = None,
    describe: Mapping[str, Any] | None = None,
) -> tuple[RunFolder, RunSummary]:
    """Run ``run`` over the simulated ``sites``; returns its run folder and summary.

    Parameters
    ----------
    run : RunConfig
        The run, as `medfed run` submits it (a resumed run cannot be simulated).
    sites : sequence of SimSite
        The simulated sites (:mod:`medfed.local.sim_sites`).
    runs_dir : Path
        Where the run folder goes (``runs_dir/<run id>/``).
    keep_warm, budget, policy
        See :class:`SitePool`.
    workers : int, optional
        Processes that run the sites (:class:`medfed.local.site_processes.SiteProcesses`);
        1 runs them in this process, one after another. Default:
        :func:`~medfed.local.site_processes.default_workers`. Replies are aggregated
        in the order the messages were sent, whatever the number of processes: the
        global model is the same bit for bit at the same number of torch threads (CPU
        kernels sum in an order that depends on it).
    threads : int, optional
        torch threads of each worker process (default: the cores shared out among
        them); in-process sites use this process's setting.
    on_event : callable, optional
        Called with each progress event of the run folder as it is written.
    on_site : callable, optional
        Called after each site's reply, see :data:`SiteProgress`.
    describe : mapping, optional
        Recorded in the summary's ``simulation`` entry (e.g. where the data came from).

    Returns
    -------
    tuple of RunFolder and dict
        The summary's ``status`` is ``completed``, ``refused`` or ``failed`` (with
        the reason); Ctrl-C ends the run as ``stopped`` and is raised again.
    """
    if run.resume_of:
        raise ConfigError(
            "A simulated run cannot be resumed.",
            where="resume_of",
            fix="start the simulation again",
        )
    if len(sites) < run.min_sites:
        raise ConfigError(
            f"The run needs {run.min_sites} sites per round; the simulation has {len(sites)}.",
            where="--min-sites / --sites",
            fix=f"--min-sites {len(sites)} or more --sites",
        )
    runs_dir = Path(runs_dir).resolve()
    run_id = _new_run_id(runs_dir)
    folder = RunFolder.create(runs_dir, run_id, run)
    pool = SitePool(
        folder.path / SITES_DIR, sites, keep_warm=keep_warm, budget=budget, policy=policy
    )
    workers = default_workers(len(sites)) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}.", where="--workers")
    processes = (
        SiteProcesses(
            pool.root,
            sites,
            workers=workers,
            keep_warm=pool.keep_warm,
            budget=budget,
            policy=policy,
            threads=threads,
        )
        if workers > 1
        else None
    )
    tail = EventTail(folder)

    def forward() -> None:
        if on_event is not None:
            for event in tail():
                on_event(event)

    def site_done(phase: str, rnd: int, done: int, total: int, site: str) -> None:
        forward()
        if on_site is not None:
            on_site(phase, rnd, done, total, site)

    grid = SimulationGrid(pool, run_id=run_id, on_site=site_done, processes=processes)
    context = Context(
        run_id=run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config={wire.RUN_CONFIG_KEY: run.to_json()},
    )
    t0 = time.time()
    reason = "the run ended without a summary"
    try:
        with folder.lock(), _as_server_app(run_id), _collect_only_the_runs_objects():
            run_in_folder(
                grid, context, run, folder, runs_dir=runs_dir, transport="in memory (simulation)"
            )
    except KeyboardInterrupt:
        folder.write_summary(
            RunSummary(
                status="stopped",
                run_id=str(run_id),
                reason="interrupted (Ctrl-C); a simulation is not resumed",
                seconds=round(time.time() - t0, 2),
            )
        )
        raise
    except Exception as exc:  # the summary says why; a fault in code also gets its trace
        reason = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, MedfedError):
            log.error("simulated run %s failed", run_id, exc_info=exc)
    finally:
        grid.close()
        if processes is None:
            pool.end_run(str(run_id))
        else:
            processes.end_run(str(run_id))
            processes.close()
        forward()
    ended = folder.read_summary() or RunSummary(status="failed", run_id=str(run_id), reason=reason)
    summary = ended.model_copy(
        update={
            "engine": "simulation",
            "simulation": Simulation(
                engine="in-process" if processes is None else "processes",
                workers=workers,
                sites=len(sites),
                site_folders=str(pool.root),
                keep_warm=pool.keep_warm,
                **dict(describe or {}),
            ),
        }
    )
    folder.write_summary(summary)
    write_report(folder)
    return folder, summary
