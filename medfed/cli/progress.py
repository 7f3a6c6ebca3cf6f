"""Rendering of a run's progress events on the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from medfed.core import wire

_SKIP = {wire.WEIGHT_KEY, "steps"}


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        if k in _SKIP:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


class ProgressView:
    """Prints one line per event: rounds, sites that replied or refused, round results."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.console = console
        self.rounds = rounds

    def __call__(self, event: dict[str, Any]) -> None:
        """Render one event from events.jsonl."""
        kind = event.get("event")
        rnd = event.get("round")
        c = self.console
        if kind == "run-started":
            c.print(
                f"[bold]run started[/]: task {event['task']}, strategy {event['strategy']}, "
                f"{event['rounds']} rounds"
            )
        elif kind == "round-sent" and event.get("phase") == "train":
            c.rule(f"round {rnd}/{self.rounds}")
        elif kind == "site-replied":
            if event["phase"] == "query":  # secure-aggregation set-up or unmasking
                said = event["metrics"]
                covered, fitted = said.get(wire.BUDGET_ROUNDS_KEY), said.get(wire.FITTED_NOISE_KEY)
                notes = (
                    []
                    if covered is None
                    else [
                        f"its privacy budget covers only {int(covered)} of the {self.rounds} "
                        "rounds; it will refuse the rest"
                    ]
                )
                if fitted is not None:
                    notes.append(
                        f"it adds more noise than the run asks (noise multiplier "
                        f"{fitted:.3g}) to fit its remaining privacy budget"
                    )
                shown = "ok" if not notes else f"[yellow]joined, but {'; '.join(notes)}[/]"
            else:
                shown = _fmt(event["metrics"])
            c.print(f"  {event['phase']:<8} [cyan]{event['site']:<16}[/] {shown}", highlight=False)
        elif kind == "site-error":
            who = escape(event.get("site") or f"node {event['node']}")
            reason = escape(str(event["reason"]))
            if event.get("status") == "refused":
                rule = escape(event.get("rule") or "policy")
                c.print(
                    f"  {event['phase']:<8} [red]{who:<16} refused[/] ({rule}): {reason}",
                    highlight=False,
                )
            else:
                c.print(
                    f"  {event['phase']:<8} [red]{who:<16} failed:[/] {reason}", highlight=False
                )
        elif kind in ("round-lost", "update-rejected", "reveal-rejected"):
            who = f" {escape(event['site'])}" if event.get("site") else ""
            c.print(
                f"  [red]{kind.replace('-', ' ')}{who}[/] (round {rnd}): "
                f"{escape(str(event['reason']))}",
                highlight=False,
            )
        elif kind == "secure-aggregation" and event.get("dropped"):
            c.print(
                f"  [yellow]secure aggregation without {', '.join(event['dropped'])}[/]: "
                f"the sum of {', '.join(event.get('survivors', []))} (round {rnd})",
                highlight=False,
            )
        elif kind == "warning":
            c.print(f"  [yellow]warning:[/] {escape(str(event['reason']))}", highlight=False)
        elif kind == "run-refused":
            when = f"round {rnd}" if rnd else "at set-up, before any site trained"
            c.print(f"[red]run ended: the sites refused[/] ({when})", highlight=False)
        elif kind == "sites-missing":
            c.print(
                f"  [yellow]{event['count']} site(s) did not reply in time ({event['phase']})[/]"
            )
        elif kind == "model-resent":
            c.print(
                f"  [yellow]{event['sites']} site(s) no longer held the global model they "
                f"evaluated[/] (a restarted daemon); sent it to them again (round {rnd})"
            )
        elif kind == "round-finished" and event.get("model_unchanged"):
            c.print(
                f"  [yellow]round {rnd} gave no new model[/] in {event['seconds']:.2f} s: "
                f"{event['checkpoint']} holds the model it started from"
            )
        elif kind == "round-finished":
            c.print(
                f"  [green]round {rnd} done[/] in {event['seconds']:.2f} s "
                f"(checkpoint {event['checkpoint']})"
            )
        elif kind == "server-unreachable":
            c.print(
                "[yellow]the server is unreachable[/]; waiting for it: a restarted server "
                "(`medfed server start`) resumes the run from its last completed round",
                highlight=False,
            )
        elif kind == "run-resume-submitted":
            c.print(
                f"[yellow]the server restarted[/] and resumes the run (server run "
                f"{event['flower_run_id']})",
                highlight=False,
            )
        elif kind == "run-resumed":
            c.print(f"[bold]run resumed[/] at round {rnd}", highlight=False)
        elif kind in ("run-failed", "run-stopped"):
            c.print(f"[red]run {kind[4:]}:[/] {escape(str(event['reason']))}", highlight=False)
        elif kind == "run-finished":
            c.print(f"[green]run finished[/] in {event['seconds']:.1f} s")
