"""``spotlane serve`` under load, on loopback: one replica against two, and a large upload.

Everything runs on this machine over the embedded default (SQLite job store, local
folder storage) in a temporary home. Two real ``spotlane serve`` processes run on
two free ports; a batch is created beforehand with the official ``openai`` SDK.

1. Retrieve: ``--clients`` concurrent clients (asyncio + aiohttp, in a process of
   their own) poll ``GET /v1/batches/{id}`` for ``--seconds`` against one replica
   (the baseline) and for as long round-robin over both, in halves ordered 1 2 2 1:
   p50/p99 latency, requests/s, the ratio, and the CPU seconds each side used.
2. Upload: a ``--upload-mb`` chat JSONL sent with the SDK, once alone and once while
   the clients poll both replicas: seconds and MB/s, and the retrieve latency meanwhile.
3. Memory: each replica's RSS polled from ``/proc/<pid>/status`` during each upload,
   and its lifetime peak (``VmHWM``).

    python benchmarks/serve.py [--clients 50] [--upload-mb 100] [--seconds 20]

The clients and the servers share this machine's CPUs, so the figures are a floor
on what separate machines would do; SQLite serializes writers (an upload's row, a
batch's rows), reads run side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1024 * 1024


@dataclass
class Load:
    """What the clients saw: (start on the monotonic clock, latency ms) of each successful
    request, the start of each failed one, wall seconds."""

    samples: list[tuple[float, float]]
    failures: list[float]
    seconds: float
    #: CPU seconds the clients' process used (the servers': ``cpu_seconds``).
    cpu: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [ms for _, ms in self.samples]

    @staticmethod
    def joined(loads: list[Load]) -> Load:
        return Load(
            [s for load in loads for s in load.samples],
            [f for load in loads for f in load.failures],
            sum(load.seconds for load in loads),
            sum(load.cpu for load in loads),
        )

    def between(self, start: float, end: float) -> Load:
        """The requests that started in [start, end) (CLOCK_MONOTONIC, shared by processes)."""
        return Load(
            [s for s in self.samples if start <= s[0] < end],
            [f for f in self.failures if start <= f < end],
            end - start,
        )

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _poll(urls: list[str], key: str, clients: int, seconds: float | None, stop: Event | None) -> Load:
    import aiohttp

    samples: list[tuple[float, float]] = []
    failures: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    deadline = started + seconds if seconds else float("inf")

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        turn = index
        while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
            url = urls[turn % len(urls)]  # round-robin, staggered by client
            turn += 1
            t0 = time.monotonic()
            try:
                async with session.get(url, headers=headers) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                samples.append((t0, (time.monotonic() - t0) * 1000))
            else:
                failures.append(t0)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return Load(samples, failures, time.perf_counter() - started)


def _poll_process(urls: list[str], key: str, clients: int, seconds: float | None, stop: Event | None, out: Any) -> None:
    """The clients' process: the servers' CPU time is not the uploader's GIL."""
    cpu = time.process_time()
    load = asyncio.run(_poll(urls, key, clients, seconds, stop))
    out.put((load.samples, load.failures, load.seconds, time.process_time() - cpu))


class Clients:
    """The polling clients in a child process, for a fixed time or until ``stop()``."""

    def __init__(self, urls: list[str], key: str, clients: int, seconds: float | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._out = ctx.Queue()
        self._process = ctx.Process(
            target=_poll_process, args=(urls, key, clients, seconds, self._stop, self._out), daemon=True
        )
        self._process.start()

    def stop(self) -> None:
        self._stop.set()

    def result(self) -> Load:
        try:
            samples, failures, seconds, cpu = self._out.get(timeout=120)
        finally:
            self.kill()
        return Load(samples, failures, seconds, cpu)

    def kill(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes used so far (all their threads)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


class RssWatch:
    """Each process's highest VmRSS, polled every 10 ms while the block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_mib = {pid: 0.0 for pid in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            for pid in self.pids:
                self.peak_mib[pid] = max(self.peak_mib[pid], status_kib(pid, "VmRSS") / 1024)
            time.sleep(0.01)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


def start_replica(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Its access log goes to a file: a pipe nobody reads would fill and stall it.
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve on {base} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"serve on {base} was not healthy within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_replica(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def big_chat_file(path: Path, megabytes: float, model: str) -> Path:
    from tests.support.serve import chat_lines

    sample = chat_lines(path, 1, model, max_tokens=16).stat().st_size
    return chat_lines(path, max(1, int(megabytes * MB / sample)), model, max_tokens=16)


def upload(sdk: Any, path: Path) -> tuple[float, float]:
    """Send ``path``; its start and end on the monotonic clock."""
    t0 = time.monotonic()
    with path.open("rb") as fh:
        stored = sdk.files.create(file=fh, purpose="batch")
    t1 = time.monotonic()
    if stored.bytes != path.stat().st_size:
        raise SystemExit(f"upload stored {stored.bytes} bytes of {path.stat().st_size}")
    return t0, t1


def row(label: str, load: Load) -> str:
    return f"{label:<34} {load.pct(50):8.1f} {load.pct(99):8.1f} {load.rps:9.0f} {len(load.samples):8d} {len(load.failures):6d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent polling clients")
    parser.add_argument("--upload-mb", type=float, default=100, help="size of the uploaded JSONL")
    parser.add_argument("--seconds", type=float, default=20, help="length of each retrieve run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the home, input and logs here")
    args = parser.parse_args()

    import openai

    from pipeline.runtime import Runtime
    from pipeline.serve.keys import create_key
    from tests.support import free_port
    from tests.support.jobs import model_folder
    from tests.support.serve import chat_lines

    work = args.workdir or Path(tempfile.mkdtemp(prefix="spotlane-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SPOTLANE_HOME": str(home),
        "SPOTLANE_WORKER__ENGINE": "stub",
        "SPOTLANE_SERVE__MAX_FILE_BYTES": str(max(200 * MB, int(args.upload_mb * MB * 2))),
    }
    replicas: list[subprocess.Popen[bytes]] = []
    clients: list[Clients] = []
    try:
        # The embedded store is created (migrated) by Runtime.open, as `spotlane db upgrade` would.
        runtime = Runtime.open(home=home, worker={"engine": "stub"})
        _, key = create_key(runtime, "bench")
        runtime.engine.dispose()
        model = model_folder(work)
        t0 = time.perf_counter()
        big = big_chat_file(work / "big.jsonl", args.upload_mb, model)
        size_mb = big.stat().st_size / MB
        print(f"generated {big.name}: {size_mb:.1f} MB in {time.perf_counter() - t0:.1f}s")

        ports = [free_port(), free_port()]
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for i, port in enumerate(ports):
            replicas.append(start_replica(port, env, work / f"serve-{i}.log"))
        for base, process, i in zip(bases, replicas, range(2), strict=True):
            wait_healthy(base, process, work / f"serve-{i}.log")
        pids = [p.pid for p in replicas]
        print(f"2 replicas healthy on {', '.join(bases)} (pids {pids[0]}, {pids[1]}); {os.cpu_count()} CPUs")

        sdk = openai.OpenAI(base_url=f"{bases[0]}/v1", api_key=key, max_retries=0, timeout=600)
        small = chat_lines(work / "small.jsonl", 20, model, max_tokens=16)
        with small.open("rb") as fh:
            uploaded = sdk.files.create(file=fh, purpose="batch")
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        targets = [f"{b}/v1/batches/{batch.id}" for b in bases]
        print(f"polling {batch.id} ({batch.status}) with {args.clients} clients, {args.seconds:g}s per setup")

        warm = Clients(targets, key, min(args.clients, 8), seconds=1.0)
        clients.append(warm)
        warm.result()

        # (a) the baseline, one replica, against both round-robin: two halves each, in the
        # order 1 2 2 1, so a drift in the machine's speed falls on both alike.
        runs: dict[int, list[Load]] = {1: [], 2: []}
        server_cpu = {1: 0.0, 2: 0.0}
        for n in (1, 2, 2, 1):
            cpu0 = cpu_seconds(pids)
            part = Clients(targets[:n], key, args.clients, seconds=args.seconds / 2)
            clients.append(part)
            runs[n].append(part.result())
            server_cpu[n] += cpu_seconds(pids) - cpu0
            print(row(f"  {n} replica{'s' if n > 1 else ''}, {args.seconds / 2:g}s", runs[n][-1]))
        single, double = Load.joined(runs[1]), Load.joined(runs[2])

        # (b, c) the upload alone, then under the retrieve load on both replicas.
        rss_before = {pid: status_kib(pid, "VmRSS") / 1024 for pid in pids}
        with RssWatch(pids) as alone_rss:
            start, end = upload(sdk, big)
        alone_s = end - start
        print(f"  upload alone: {alone_s:.2f}s")
        during = Clients(targets, key, args.clients)
        clients.append(during)
        time.sleep(1.0)  # the clients connected and polling
        with RssWatch(pids) as loaded_rss:
            start, end = upload(sdk, big)
        loaded_s = end - start
        during.stop()
        meanwhile = during.result().between(start, end)
        print(f"  upload under load: {loaded_s:.2f}s")
        hwm = {pid: status_kib(pid, "VmHWM") / 1024 for pid in pids}
    finally:
        for c in clients:
            c.kill()
        for process in replicas:
            stop_replica(process)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print("\n== spotlane serve on loopback: summary ==")
    print(f"{os.cpu_count()} CPUs shared by the clients and the servers; SQLite job store, local folder storage")
    print(f"\nGET /v1/batches/{{id}}, {args.clients} clients, {args.seconds:g}s per setup (two halves: 1 2 2 1)")
    print(f"{'':<34} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'requests':>8} {'failed':>6}")
    print(row("baseline: 1 replica", single))
    print(row("ours: 2 replicas (round-robin)", double))
    print(row("2 replicas, while the upload ran", meanwhile))
    print(
        f"{'ratio 2 replicas / 1 replica':<34} {double.pct(50) / single.pct(50):7.2f}x "
        f"{double.pct(99) / single.pct(99):7.2f}x {double.rps / single.rps:8.2f}x"
        "   (latency: below 1 is better; req/s: above 1)"
    )
    print(
        f"CPU seconds per run: clients {single.cpu:.1f} + servers {server_cpu[1]:.1f} (1 replica), "
        f"clients {double.cpu:.1f} + servers {server_cpu[2]:.1f} (2 replicas); "
        f"the machine has {args.seconds * (os.cpu_count() or 1):.0f} in {args.seconds:g}s"
    )
    print(f"\nPOST /v1/files, {size_mb:.1f} MB JSONL to replica 1")
    print(f"{'alone':<34} {alone_s:7.2f} s {size_mb / alone_s:8.1f} MB/s")
    print(f"{'under the retrieve load':<34} {loaded_s:7.2f} s {size_mb / loaded_s:8.1f} MB/s")
    print("\nRSS of each replica (MiB)")
    print(f"{'':<12} {'before':>8} {'peak, upload alone':>20} {'peak, under load':>18} {'VmHWM (lifetime)':>17}")
    for i, pid in enumerate(pids, 1):
        print(
            f"{'replica ' + str(i):<12} {rss_before[pid]:8.0f} {alone_rss.peak_mib[pid]:20.0f} "
            f"{loaded_rss.peak_mib[pid]:18.0f} {hwm[pid]:17.0f}"
        )
    print(
        "\nNote: SQLite serializes writers (an upload's file row, a batch's rows); the polls only read"
        " and run side by side in WAL mode. A server database (PostgreSQL) has no single writer lock."
    )


if __name__ == "__main__":
    main()
