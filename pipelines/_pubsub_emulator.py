"""Google's Pub/Sub emulator, started on 127.0.0.1 for the streaming demo, tests and benchmark.

:class:`PubSubEmulator` runs ``gcloud beta emulators pubsub start`` (the
``google-cloud-cli-pubsub-emulator`` package, Java) on a free loopback port in
a process group of its own (gcloud starts Java as a child) and stops the whole
group. The Pub/Sub client and Beam's ``ReadFromPubSub`` find it through
``PUBSUB_EMULATOR_HOST`` (:meth:`PubSubEmulator.environ`). Its methods create
topics and subscriptions and publish, over a plain-text channel to the
emulator only. Needs the ``gcp`` extra (google-cloud-pubsub).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "beam-tinybird-local"
STARTUP_TIMEOUT_SECS = 60.0
_READY_LINE = b"Server started, listening on"


class EmulatorUnavailable(RuntimeError):
    """gcloud or its Pub/Sub emulator component is not installed, or the emulator did not start."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gcloud_command() -> str:
    """The ``gcloud`` executable with the Pub/Sub emulator component.

    Raises:
        EmulatorUnavailable: naming the packages to install.
    """
    found = shutil.which("gcloud")
    emulator_jar_dir = Path(found).resolve().parent.parent / "platform" / "pubsub-emulator" if found else None
    if found is None or emulator_jar_dir is None or not emulator_jar_dir.is_dir():
        raise EmulatorUnavailable(
            "the Pub/Sub emulator is not installed: install the Debian packages google-cloud-cli and "
            "google-cloud-cli-pubsub-emulator and a Java runtime (or: gcloud components install pubsub-emulator)")
    if shutil.which("java") is None:
        raise EmulatorUnavailable("the Pub/Sub emulator needs a Java runtime (java not found on PATH)")
    return found


class PubSubEmulator:
    """One emulator process group; use as a context manager.

    Args:
        data_dir: The emulator's ``--data-dir``; its log (``emulator.log``) and
            gcloud's own configuration go there too.
        project: The project of every topic and subscription.
        startup_timeout_secs: Longest wait for the emulator to listen.
    """

    def __init__(self, *, data_dir: Path, project: str = DEFAULT_PROJECT,
                 startup_timeout_secs: float = STARTUP_TIMEOUT_SECS) -> None:
        self.data_dir = Path(data_dir)
        self.project = project
        self.port = 0
        self._startup_timeout_secs = startup_timeout_secs
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir / "emulator.log"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the value of ``PUBSUB_EMULATOR_HOST``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The PID of the emulator's process group leader (gcloud), while it runs."""
        return None if self._process is None else self._process.pid

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with ``PUBSUB_EMULATOR_HOST`` set to this emulator."""
        env = dict(os.environ if base is None else base)
        env["PUBSUB_EMULATOR_HOST"] = self.host
        env["PUBSUB_PROJECT_ID"] = self.project
        return env

    def start(self) -> PubSubEmulator:
        """Starts the emulator and waits until it listens.

        Raises:
            EmulatorUnavailable: gcloud or the component is missing, or it did not start.
        """
        command = gcloud_command()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = dict(os.environ)
        # gcloud's configuration in a folder of this run: no update check, no usage report, no prompt.
        env.update(CLOUDSDK_CONFIG=str(self.data_dir / "gcloud-config"),
                   CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
                   CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
                   CLOUDSDK_CORE_DISABLE_PROMPTS="1")
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [command, "beta", "emulators", "pubsub", "start", f"--host-port={self.host}",
                 f"--data-dir={self.data_dir}", f"--project={self.project}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_secs
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmulatorUnavailable(
                    f"the Pub/Sub emulator exited with status {self._process.returncode}: {self.log_tail()}")
            if _READY_LINE in self._log.read_bytes():
                return
            time.sleep(0.1)
        raise EmulatorUnavailable(
            f"the Pub/Sub emulator did not listen within {self._startup_timeout_secs:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the emulator's log."""
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """Stops the emulator's whole process group: SIGTERM, then SIGKILL after 10 s."""
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process)

    def __enter__(self) -> PubSubEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- clients, topics, subscriptions, messages ---------------------------------

    def publisher_client(self) -> Any:
        """A publisher client of this emulator only (whatever ``PUBSUB_EMULATOR_HOST`` says); call ``stop()``."""
        import grpc
        from google.cloud.pubsub_v1 import PublisherClient
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        return PublisherClient(
            transport=PublisherGrpcTransport(host=self.host, channel=grpc.insecure_channel(self.host)))

    def subscriber_client(self) -> Any:
        """A subscriber client of this emulator only; a context manager."""
        import grpc
        from google.cloud.pubsub_v1 import SubscriberClient
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        return SubscriberClient(
            transport=SubscriberGrpcTransport(host=self.host, channel=grpc.insecure_channel(self.host)))

    @contextlib.contextmanager
    def publisher(self) -> Iterator[Any]:
        """A publisher client, stopped (its pending messages sent) when the block ends."""
        client = self.publisher_client()
        try:
            yield client
        finally:
            client.stop()

    def topic_path(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription_path(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create_topic(self, name: str) -> str:
        """Creates topic ``name`` (a letter first, at least 3 characters); returns its path."""
        path = self.topic_path(name)
        with self.publisher() as client:
            client.create_topic(name=path)
        return path

    def create_subscription(self, name: str, *, topic: str, ack_deadline_secs: int = 60) -> str:
        """Creates subscription ``name`` to ``topic`` (a path); returns its path."""
        path = self.subscription_path(name)
        with self.subscriber_client() as client:
            client.create_subscription(name=path, topic=topic, ack_deadline_seconds=ack_deadline_secs)
        return path

    def publish(self, topic: str, messages: Iterable[bytes | tuple[bytes, Mapping[str, str]]]) -> list[str]:
        """Publishes ``messages`` (data, or (data, attributes)) to ``topic``; returns their ids, in order."""
        with self.publisher() as client:
            futures = []
            for message in messages:
                data, attributes = (message, {}) if isinstance(message, bytes) else message
                futures.append(client.publish(topic, data, **attributes))
            return [str(future.result(timeout=30)) for future in futures]


def stop_process_group(process: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM,
                       timeout_secs: float = 10.0) -> int:
    """Sends ``sig`` to the process group led by ``process`` (started with ``start_new_session=True``).

    Waits up to ``timeout_secs`` for the leader, then SIGKILLs the group; the
    group is SIGKILLed at the end in any case, so that no child (Java under
    gcloud) outlives it. Returns the leader's exit status.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        return process.wait(timeout=timeout_secs)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout=timeout_secs)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
