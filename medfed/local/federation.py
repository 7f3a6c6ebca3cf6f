"""LocalFederation: federation and site folders, a SuperLink and site daemons on loopback."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.client.site import init_site
from medfed.core.config import RunConfig
from medfed.core.errors import ProcessError
from medfed.core.parent_watch import EXIT_WITH_PARENT_ENV
from medfed.core.procs import Managed, ProcessGroup, free_port
from medfed.core.run_summary import RunSummary
from medfed.core.runs import RunFolder
from medfed.server.control import Control
from medfed.server.federation import Federation, init_federation
from medfed.server.follow import follow_run
from medfed.server.superlink import start_superlink


def site_daemon_argv(site_toml: Path) -> list[str]:
    """The command line of a real site daemon (`medfed site start`)."""
    return [sys.executable, "-m", "medfed", "site", "start", "--config", str(site_toml)]


@dataclass
class LocalFederation:
    """Everything of a federation under ``root``, started and stopped together.

    Use as a context manager: every process it started is stopped on exit,
    including on errors and Ctrl-C.
    """

    root: Path
    site_names: list[str]
    name: str = "local"
    enrol: bool = True
    #: The sites' ``heartbeat_interval_s`` (None: site.toml's default, 30 s).
    heartbeat_interval_s: float | None = None
    site_configs: dict[str, Path] = field(default_factory=dict)
    group: ProcessGroup = field(default_factory=ProcessGroup)
    federation: Federation | None = None

    def create(
        self, *, site_data: Callable[[int, str], dict[str, Any]] | None = None
    ) -> LocalFederation:
        """Write the federation folder and one folder per site (enrolled unless ``enrol`` is off).

        ``site_data(index, name)`` may return overrides of the sites' ``[data]`` section.
        """
        self.root = Path(self.root).resolve()
        port = free_port()
        server_toml = init_federation(
            self.root / "server", name=self.name, hosts=["127.0.0.1", "localhost"], port=port
        )
        self.federation = Federation.load(server_toml)
        # Sites train at once on this machine's cores: an equal share each, at least one
        # torch thread (more threads than cores slows every site down).
        threads = _threads_per_site(len(self.site_names))
        for i, site in enumerate(self.site_names):
            cfg = init_site(
                self.root / site,
                name=site,
                federation_ca=self.federation.ca_cert,
                server=f"127.0.0.1:{port}",
                runtime_port=free_port(),
                seed=1000 + i,
                profile=i,
            )
            _override(cfg, ("compute",), {"threads": threads})
            if self.heartbeat_interval_s is not None:
                _override(cfg, ("site",), {"heartbeat_interval_s": self.heartbeat_interval_s})
            if site_data is not None:
                _override(cfg, ("data",), site_data(i, site))
            self.site_configs[site] = cfg
            if self.enrol:
                self.federation.enrol(self.root / site / "keys" / "site.pub", site)
        return self

    def set_budget(self, **budget: Any) -> None:
        """Set every site's default privacy budget; call it before :meth:`start`.

        ``budget``: keys of ``[privacy.datasets.NAME]`` (``epsilon_max``,
        ``min_noise_multiplier`` ...), e.g. a generous budget for simulations that
        compare DP runs.
        """
        import tomllib

        for cfg in self.site_configs.values():
            default = tomllib.loads(cfg.read_text(encoding="utf-8"))["privacy"]["default"]
            _override(cfg, ("privacy", "datasets", default), budget)

    def set_policy(self, **policy: Any) -> None:
        """Set keys of every site's ``[policy]`` (e.g. ``share_landmarks=True``).

        Call it before :meth:`start`.
        """
        for cfg in self.site_configs.values():
            _override(cfg, ("policy",), policy)

    @property
    def fed(self) -> Federation:
        """The loaded federation (after :meth:`create`)."""
        assert self.federation is not None, "call create() first"
        return self.federation

    def control(self) -> Control:
        """A Control API client of this federation's SuperLink."""
        return Control(self.fed.config.superlink.address, self.fed.ca_cert, self.fed.credential())

    def start(
        self, *, sites: list[str] | None = None, wait_online: bool = True, timeout: float = 120.0
    ) -> LocalFederation:
        """Start the SuperLink and the site daemons; wait until the sites are online."""
        self.group.members.append(start_superlink(self.fed))
        names = self.site_names if sites is None else sites
        for site in names:
            self.start_site(site)
        if wait_online:
            self.wait_online(len(names), timeout=timeout)
        return self

    def start_site(self, site: str) -> Managed:
        """Start one site daemon as its own process."""
        cfg = self.site_configs[site]
        proc = Managed(
            f"site daemon {site}",
            site_daemon_argv(cfg),
            cfg.parent / "logs" / "daemon.log",
            env={EXIT_WITH_PARENT_ENV: "1"},
        )
        return self.group.start(proc)

    def wait_online(self, count: int, *, timeout: float = 120.0) -> None:
        """Wait until ``count`` sites are online at the SuperLink."""
        deadline = time.monotonic() + timeout
        with self.control() as control:
            while time.monotonic() < deadline:
                self.group.check_alive()
                nodes = control.nodes()
                if sum(n["status"] == "online" for n in nodes) >= count:
                    return
                time.sleep(0.3)
        raise ProcessError(
            f"Only some of {count} sites came online within {timeout:.0f} s.",
            where=str(self.root),
            fix="read the logs under each site's logs/",
        )

    def run(
        self,
        config: RunConfig,
        *,
        on_event: Callable[[dict[str, Any]], None] = lambda e: None,
        timeout: float = 1800.0,
    ) -> tuple[RunFolder, RunSummary]:
        """Submit a run, follow it to its end, return its folder and summary."""
        with self.control() as control:
            run_id = control.submit(config)
            summary = follow_run(
                control, run_id, self.fed.runs_dir, on_event=on_event, timeout=timeout
            )
        return RunFolder(self.fed.runs_dir / str(run_id)), summary

    def stop(self) -> None:
        """Stop every process this federation started."""
        self.group.stop_all()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _threads_per_site(sites: int) -> int:
    """Torch threads per site: the usable cores (CPU affinity, e.g. a container's) shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(sites, 1))


def _override(site_toml: Path, table: tuple[str, ...], overrides: dict[str, Any]) -> None:
    """Update one table of a fresh site.toml, e.g. ``("privacy", "datasets", "default")``.

    The file stays valid TOML; a table named by a dataset may hold dots, hence the tuple.
    """
    import tomli_w
    import tomllib

    data = tomllib.loads(site_toml.read_text(encoding="utf-8"))
    section = data
    for key in table:
        section = section.setdefault(key, {})
    section.update(overrides)
    site_toml.write_text(tomli_w.dumps(data), encoding="utf-8")
