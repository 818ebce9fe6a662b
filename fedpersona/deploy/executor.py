"""Run a SuperNode's ClientApp tasks inside this long-lived process, so the model stays loaded.

Flower 1.41's default (``--isolation subprocess``) starts a fresh ``flwr-clientapp`` process for
every message: Python, torch and transformers imported and the base model built again for each
train and each evaluate. On a CPU device that is several seconds of start-up per message, often more
than the training itself (docs/explanation/architecture.md: load the base model once per worker and keep it). So
``fedpersona client`` starts the SuperNode with ``--isolation process`` and plays the part of
Flower's SuperExec itself: it polls the SuperNode's Runtime API for ClientApp tasks and runs each
one here, exactly as ``flwr-clientapp`` would (pull the message and context, call the ClientApp,
push the reply and the task status, heartbeat while working) but without exiting afterwards.

What a failed task sends: a ``fedpersona.protocol.FAILURE_REASONS`` code, as the error reply's reason and
as the task's status details, never the exception's text (it may name the user's files and counts;
``fedpersona.client.failures``); the text goes to this device's log.

Each acquired task gets a thread of its own for the network part (pulling the message, pushing
the reply) while the ClientApp calls themselves run one at a time (one resident model). Why
threads: flwr 1.41's SuperNode can leave a task behind whose message never arrives (a message of a
run stopped while it was being received); pulling it waits up to two hours. In its own thread
such a task blocks nothing; with Flower's per-message processes it would not either.

This speaks Flower's Runtime API through the same helpers ``flwr-clientapp`` uses; they are
internal to flwr 1.41 and 1.42 (identical there), which pyproject pins (>=1.41,<1.43). ``fedpersona client --cold`` falls back
to Flower's own per-message processes if a Flower upgrade breaks this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FAB_PUBLISHER = "fedpersona/"  # the only apps this device runs (our ServerApp's FAB id starts so)
MAX_IN_FLIGHT = 8  # tasks being pulled or run at once (normally 1; more only behind stuck pulls)


def _retry_invoker(stop: threading.Event) -> Any:
    """Retry transport errors and 5xx until ``stop``; give up on other HTTP errors at once.

    Flower's own invoker for task processes SIGINTs the process on a 401 (right for a one-task
    ``flwr-clientapp``, fatal for a device that serves many tasks), so this process uses its own.
    """
    import httpx
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def give_up(err: Exception) -> bool:
        if stop.is_set():
            return True
        return isinstance(err, httpx.HTTPStatusError) and err.response.status_code < 500

    return RetryInvoker(lambda: exponential(max_delay=10), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=None, should_giveup=give_up, wait_function=stop.wait)


def _runtime_client(address: str, component: str, stop: threading.Event, token: str | None = None) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=_retry_invoker(stop))


def run_task(address: str, token: str, client_app: Any, stop: threading.Event | None = None,
             app_lock: threading.Lock | None = None) -> bool:
    """Run one acquired ClientApp task; True if the ClientApp completed it (else an error reply went).

    ``app_lock`` serialises the ClientApp calls of concurrent tasks (they share one model).
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedpersona.client.failures import failure_code, failure_reply, task_code

    client = _runtime_client(address, "flwr-clientapp", stop or threading.Event(), token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "task-failed"
    try:
        heartbeat.start()
        message, context, run, _fab = pull_task_input(client)
        if not str(run.fab_id).startswith(FAB_PUBLISHER):
            raise PermissionError(f"this device runs only fedpersona apps, not {run.fab_id!r}")
        with app_lock or threading.Lock():
            reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        log.info("run %s: %s task done", run.run_id, message.metadata.message_type)
    except Exception as err:  # the server gets an error reply with a code; the device keeps serving
        log.error("ClientApp task failed: %s", err, exc_info=not isinstance(err, PermissionError))
        if message is None:  # nothing to answer: the SuperNode reports the task failed
            details = "task-failed"
        else:
            details = "unsupported-message" if isinstance(err, PermissionError) else failure_code(err, task_code(message))
            reply = failure_reply(message, details)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001 - reported; the SuperNode times the task out
            log.error("could not push the reply to the SuperNode: %s", err)
            status = SubStatus.FAILED
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as err:  # noqa: BLE001 - e.g. the run was stopped meanwhile
            log.error("could not report the task's status to the SuperNode: %s", err)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status == SubStatus.COMPLETED


def serve(address: str, *, stop: threading.Event, client_app: Any = None, poll_interval: float = 0.5,
          on_task: Callable[[bool], None] | None = None) -> None:
    """Poll the SuperNode at ``address`` for ClientApp tasks and run them here until ``stop`` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    if client_app is None:
        from fedpersona.client.app import app as client_app
    app_lock = threading.Lock()
    in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def work(token: str, task_id: int) -> None:
        try:
            ok = run_task(address, token, client_app, stop, app_lock)
        except Exception as err:  # noqa: BLE001 - never let one task end the device
            log.error("task %s: %s", task_id, err)
            ok = False
        finally:
            in_flight.release()
        if on_task:
            on_task(ok)

    client = _runtime_client(address, "SuperExec", stop)
    try:
        while not stop.is_set():
            if not in_flight.acquire(timeout=poll_interval):
                continue
            try:
                response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                                 agentapp_fab_hashes=[]))
            except Exception as err:  # noqa: BLE001
                in_flight.release()
                if stop.is_set():
                    break
                log.warning("SuperNode Runtime API: %s; retrying", err)
                stop.wait(poll_interval)
                continue
            if response.HasField("task") and response.token:
                threading.Thread(target=work, args=(response.token, response.task.task_id), daemon=True,
                                 name=f"task-{response.task.task_id}").start()
                continue  # more may be waiting
            in_flight.release()
            stop.wait(poll_interval)
    finally:
        client.close()
