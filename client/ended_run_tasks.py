"""Withdraw the SuperNode tasks of a run that ended while its message was being received.

Flower 1.42's SuperNode creates a ClientApp task for a message *before* it pulls the
message's arrays from the SuperLink. If the run stops in between (the server that
sent it crashed, say, and a resumed run took its place) the pull raises
``RunNotRunningException`` and Flower logs "Ignoring message", but leaves the task
pending and the content-less message stored. The site's executor then takes that task
and waits up to ~250 s for arrays that never come, while the resumed run's join
queues behind it and times out (seen as "Secure aggregation needs 2 sites, 1 joined").

:func:`withdraw_tasks_of_ended_runs` wraps Flower's receive step: when a pull reports
the run is no longer running, every unfinished task of that run is finished as failed
(its task token stops working, so an executor already holding it gives up at once),
and the run's stored message and objects are dropped. :func:`drop_replies_of_ended_runs`
wraps its send step: a reply that a task of such a run still handed over, whose
content went with the run, is dropped instead of stopping the SuperNode.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

log = logging.getLogger("medfed.site")

UNFINISHED = ("pending", "starting", "running")


def withdraw_ended_run(state: Any, object_store: Any, run_id: int, message_ids: list[str]) -> int:
    """Finish ``run_id``'s unfinished tasks as failed; drop its messages and objects.

    Returns how many tasks were withdrawn.
    """
    withdrawn = 0
    for task in state.get_tasks(run_ids=[run_id], statuses=list(UNFINISHED)):
        if state.finish_task(
            task.task_id,
            sub_status="failed",
            details=f"run {run_id} ended before its message arrived",
        ):
            withdrawn += 1
    state.delete_messages(message_ids=message_ids)
    object_store.delete_objects_in_run(run_id)
    return withdrawn


def _unpatched(module: ModuleType, name: str, flag: str, risk: str) -> Any | None:
    """Flower's ``module.name`` if it is there and not yet patched (marked by ``flag``).

    A Flower without it is warned about, with ``risk``: what is then left unguarded.
    """
    original = getattr(module, name, None)
    if original is None:
        log.warning("%s has no %s; %s", module.__name__, name, risk)
        return None
    return None if getattr(original, flag, False) else original


def withdraw_tasks_of_ended_runs(module: ModuleType) -> bool:
    """Patch ``module._pull_and_store_message`` (flwr.supernode.start_client_internal)."""
    from flwr.supercore.run import RunNotRunningException

    original = _unpatched(
        module,
        "_pull_and_store_message",
        "_medfed_withdraws",
        "tasks of a run that ends while its message arrives are left to expire",
    )
    if original is None:
        return False

    @functools.wraps(original)
    def pull_and_store(
        *,
        state: Any,
        object_store: Any,
        receive: Callable[[], Any],
        pull_object: Callable[[int, str], bytes],
        confirm_message_received: Callable[[int, str], None],
        **kwargs: Any,
    ) -> int | None:
        received: list[str] = []
        ended: list[int] = []

        def note_receive() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0].metadata.message_id)
            return got

        def noting_end(call: Callable[[int, str], Any]) -> Callable[[int, str], Any]:
            def wrapped(run_id: int, object_id: str) -> Any:
                try:
                    return call(run_id, object_id)
                except RunNotRunningException:
                    ended.append(run_id)
                    raise

            return wrapped

        run_id = original(
            state=state,
            object_store=object_store,
            receive=note_receive,
            pull_object=noting_end(pull_object),
            confirm_message_received=noting_end(confirm_message_received),
            **kwargs,
        )
        for stopped in dict.fromkeys(ended):
            n = withdraw_ended_run(state, object_store, stopped, received)
            log.warning(
                "run %s ended while a message of it arrived; %d task(s) withdrawn", stopped, n
            )
        return run_id

    pull_and_store._medfed_withdraws = True  # type: ignore[attr-defined]
    module._pull_and_store_message = pull_and_store  # type: ignore[attr-defined]
    return True


def drop_replies_of_ended_runs(module: ModuleType) -> bool:
    """Patch ``module._push_messages``: a reply whose content is gone is dropped, not fatal.

    A task of a run that ended can still finish and hand its reply to the SuperNode after
    :func:`withdraw_ended_run` cleared the run's objects. Flower reads the reply's object
    tree before its guarded send, so the missing tree raised out of the SuperNode's loop:
    the SuperNode exited, and the first message of the run that took over (a resumed
    run's join) was lost with it ("Secure aggregation needs 2 sites, 1 joined"). Now such
    a reply is deleted, and the SuperNode goes on waiting for the replies still due.
    """
    original = _unpatched(
        module, "_push_messages", "_medfed_drops", "a reply of an ended run may stop the SuperNode"
    )
    if original is None:
        return False

    @functools.wraps(original)
    def push_messages(*, state: Any, object_store: Any, **kwargs: Any) -> None:
        return original(
            state=_DroppingOrphans(state, object_store), object_store=object_store, **kwargs
        )

    push_messages._medfed_drops = True  # type: ignore[attr-defined]
    module._push_messages = push_messages  # type: ignore[attr-defined]
    return True


class _DroppingOrphans:
    """A SuperNode state whose replies on offer are only those with content to send.

    Flower marks each reply it is offered as taken: one that then fails cannot be
    offered again, so an orphan is deleted here, before Flower sees it.
    """

    def __init__(self, state: Any, store: Any) -> None:
        self._state = state
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def get_messages_legacy(self, **kwargs: Any) -> Any:
        from flwr.supercore.object_store import NoObjectInStoreError

        messages = self._state.get_messages_legacy(**kwargs)
        if not kwargs.get("is_reply"):
            return messages
        kept = []
        for message in messages:
            mid = message.metadata.message_id
            try:
                self._store.get_object_tree(mid)
            except NoObjectInStoreError:
                self._state.delete_messages(message_ids=[mid, message.metadata.reply_to_message_id])
                log.warning(
                    "dropped a reply of run %s, which ended: its content was cleared with the run",
                    message.metadata.run_id,
                )
                continue
            kept.append(message)
        return kept
