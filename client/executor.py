"""Runs the SuperNode's ClientApp tasks inside the site daemon: no process per message.

Flower 1.42's SuperNode hands each message to an executor over its local runtime
API. Its stock executor starts a new ``flwr-clientapp`` process per message
(~1 s of interpreter start and imports, more on a busy machine). The SuperNode
runs here with ``--isolation process`` and this executor takes its tasks in a
thread of the daemon, where the worker is already warm.

It also enforces an invariant of the platform: a site runs only the ClientApp
its operator installed (medfed's). A run whose app bundle names another
ClientApp gets an explicit error reply, and nothing from the bundle is executed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import zipfile
from collections.abc import Callable

import httpx
import tomllib
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from medfed.core.idle_backoff import IdleBackoff

log = logging.getLogger("medfed.site")

INSTALLED_CLIENTAPP = "medfed.client.app:app"


def pull_task(client: RuntimeHttpClient) -> tuple[Message, Context, bytes]:
    """Pull a task's message, context and app bundle from the SuperNode.

    Flower's ``pull_task_input`` does the same, but backs off a full second when
    the message's arrays are not yet in the SuperNode's store, which happens on
    every message (the task is offered as soon as the metadata arrives).
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(res.context)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("the SuperNode offered a task without a message")
    node = Node(node_id=context.node_id)
    tree = msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=0.02,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's runtime does
    return message, context, bytes(res.fab.content)


def bundle_clientapp(fab_content: bytes) -> str:
    """The ClientApp component a Flower App Bundle names (its pyproject.toml)."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as zf:
        config = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    return str(config["tool"]["flwr"]["app"]["components"]["clientapp"])


class InProcessExecutor:
    """Polls the SuperNode for ClientApp tasks and runs them with ``app`` in this process."""

    def __init__(
        self, runtime_address: str, app: ClientApp, *, poll_interval: float = 0.05
    ) -> None:
        self.runtime_address = runtime_address
        self.app = app
        self.poll_interval = poll_interval
        self._pace = IdleBackoff(poll_interval)  # fast while tasks come, slower when idle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tasks_run = 0

    def _client(self, *interceptors: object) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=list(interceptors),
            retry_invoker=retry_invoker(),
        )

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="medfed-executor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling (a task in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        """Take tasks until stopped; a SuperNode lost mid-task loses the task, not this loop."""
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - keep taking tasks
                log.warning("the ClientApp executor lost the SuperNode (%s); polling again", exc)
                self._stop.wait(1.0)

    def _poll(self) -> None:
        client = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self._stop.is_set():
                try:
                    res = client.AcquireTask(request)
                except httpx.HTTPError:  # SuperNode not (yet) serving
                    self._stop.wait(0.5)
                    continue
                if res.HasField("task") and res.token:
                    self._pace.active()
                    self.run_task(res.token)
                    self._pace.active()
                else:
                    self._stop.wait(self._pace.interval())
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """Run one task: pull its message, call the ClientApp, push the reply and status."""
        client = self._client(
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, fab = pull_task(client)
            named = bundle_clientapp(fab) if fab else INSTALLED_CLIENTAPP
            if named != INSTALLED_CLIENTAPP:
                raise PermissionError(
                    f"this site runs only its installed ClientApp ({INSTALLED_CLIENTAPP}); "
                    f"the run's app bundle names {named!r}"
                )
            reply = self.app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # reply with the reason, keep the daemon alive
            log.error("ClientApp task failed: %s", exc)
            details = f"{type(exc).__name__}: {exc}"
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            if reply is not None and context is not None:
                _tolerate_withdrawal(push_message, client, reply, context)
            _tolerate_withdrawal(push_task_output, client, context, sub_status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks_run += 1


def retry_invoker() -> RetryInvoker:
    """Flower's retries of the runtime API, re-tuned for a ClientApp inside the daemon.

    Flower backs off to 20 s, logging each attempt; a restarted SuperNode (the site
    daemon restarts one that stopped) is dialled again within a second. A withdrawn
    task ends that task, not the daemon (:func:`task_refusal_ends_the_task`).
    """
    invoker = make_simple_http_retry_invoker()
    invoker.wait_gen_factory = lambda: exponential(base_delay=0.2, max_delay=1)
    invoker.wait_function = time.sleep
    invoker.should_giveup = task_refusal_ends_the_task(invoker.should_giveup)
    return invoker


def task_refusal_ends_the_task(
    flower_giveup: Callable[[Exception], bool] | None,
) -> Callable[[Exception], bool]:
    """Give up on a 401 (the task's token was withdrawn: its run ended) without a signal.

    Flower's retry sends SIGINT to its own process on a 401, made for a ClientApp in a
    process of its own. Here that process is the site daemon: a run that ended while its
    message arrived (a server crash, say) stopped the whole site. Now the call raises
    the 401 into the task, which fails alone; every other case is Flower's.
    """

    def should_giveup(exc: Exception) -> bool:
        if (
            isinstance(exc, httpx.HTTPStatusError)
            and exc.response.status_code == httpx.codes.UNAUTHORIZED
        ):
            return True
        return flower_giveup(exc) if flower_giveup is not None else False

    return should_giveup


def _tolerate_withdrawal(push: Callable[..., object], *args: object) -> None:
    """Push a task's result; a SuperNode that withdrew the task (its run ended) refuses it."""
    try:
        push(*args)
    except Exception as exc:  # noqa: BLE001 - the next task must still be taken
        log.warning(
            "the SuperNode did not take this task's result (its run may have ended): %s", exc
        )
