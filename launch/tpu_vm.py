"""python -m launch.tpu_vm COMMAND --name=NAME --zone=ZONE --accelerator_type=v6e-8 [flags] [-- SERVE FLAGS]

Cloud TPU VM slices serving xlserve, through gcloud. `up` takes a user from nothing to
a serving slice: create, wait, install, start, then wait for gRPC health SERVING on
worker 0. Each step also runs alone:

  create   request the slice: a queued resource (default; --spot, --reserved,
           --valid_until_duration) or, with --noqueued, a plain `tpu-vm create`. A stale
           FAILED or SUSPENDED queued resource of the same name is deleted first (it holds
           quota); one that is waiting, provisioning or active is left alone, so `up`
           resumes where it stopped. A capacity error says so, with the zone and what to try.
  wait     poll until the slice is ACTIVE (queued) or READY (plain), with bounded backoff
           (--poll_s doubling up to --max_poll_s, until --timeout_s). WAITING_FOR_RESOURCES
           and PROVISIONING print as progress; FAILED and SUSPENDED end it with what to do.
  install  build a wheel of this checkout, copy it to every worker and install it with
           the tpu extra (after a fresh VM's apt/dpkg lock is released); the first ssh is
           retried (new keys take a while to reach the VMs). Every worker reports its jax
           and libtpu versions, which must agree.
  start    on every worker: free the TPU (processes holding /dev/vfio/* or /dev/accel*,
           /tmp/libtpu_lockfile), then run `runtime.serve` with the flags after `--`, in its
           own session (it outlives the ssh) with its log in ~/xlserve/serve.log. Worker 0
           serves gRPC; the others join it through jax.distributed's TPU detection on
           --coordinator_port (JAX_COORDINATOR_PORT), which the default firewall allows
           inside the network.
  health   wait (up to --health_timeout_s) for worker 0's gRPC health SERVING, reading the
           logs for a dead server meanwhile.
  status   the slice's state, and per worker whether serve runs.
  logs     the last --log_lines lines of every worker's serve log.
  stop     stop serve on every worker (SIGTERM: worker 0 drains).
  down     delete the slice (queued resources with --force, which deletes the TPU VMs
           too). Deleting a slice that is not there succeeds, so it is safe to run twice.

--dry_run prints every gcloud command instead of running it (waits then assume success).
Exit codes: 0 done; 1 gcloud or the slice failed (one line on stderr says what and what
to do); 2 bad flags.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from runtime.flags import parse_flags, usage_error

FLAGS = flags.FLAGS
COMMANDS = ("up", "create", "wait", "install", "start", "health", "status", "logs", "stop", "down")

flags.DEFINE_string("name", None, "The slice's name (queued resource and TPU node).")
flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-b.")
flags.DEFINE_string("project", None, "Project (default: gcloud's configured one).")
flags.DEFINE_string("accelerator_type", None, "e.g. v5litepod-8, v6e-8, v5litepod-16, v6e-16, v5p-8.")
flags.DEFINE_string("runtime_version", None, "TPU VM software version (default: from --accelerator_type).")
flags.DEFINE_bool("queued", True, "Request through a queued resource (else a plain tpu-vm create).")
flags.DEFINE_bool("spot", False, "Spot capacity (preemptible, cheaper).")
flags.DEFINE_bool("reserved", False, "Use the project's reservation.")
flags.DEFINE_string("valid_until_duration", None, "Queued: give up if not provisioned within this (e.g. 6h).")
flags.DEFINE_string("network", None, "VPC network (default: gcloud's).")
flags.DEFINE_string("subnetwork", None, "VPC subnetwork.")
flags.DEFINE_bool("internal_ips", False, "No external IPs (reach the workers through IAP or a VPN).")
flags.DEFINE_float("poll_s", 10.0, "wait: first polling interval; doubles up to --max_poll_s.")
flags.DEFINE_float("max_poll_s", 60.0, "wait: longest polling interval.")
flags.DEFINE_float("timeout_s", 3 * 3600.0, "wait: give up after this long.")
flags.DEFINE_bool("dry_run", False, "Print the gcloud commands instead of running them.")
flags.DEFINE_integer("port", 50051, "gRPC port serve listens on (worker 0).")
flags.DEFINE_integer("coordinator_port", 8476, "jax.distributed coordinator port on worker 0 (JAX_COORDINATOR_PORT).")
flags.DEFINE_integer("ssh_retries", 5, "Attempts of the first ssh / scp (keys propagate to fresh VMs).")
flags.DEFINE_float("ssh_retry_s", 10.0, "Pause between those attempts.")
flags.DEFINE_float("health_timeout_s", 1800.0, "health: how long serve may take to load and warm up.")
flags.DEFINE_integer("log_lines", 50, "logs: lines per worker.")
flags.DEFINE_string("wheel", None, "install: this wheel instead of one built from the checkout.")

# Runtime (software) versions by TPU generation, as Cloud TPU documents them for JAX.
RUNTIME_VERSIONS = {
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
    "v4": "tpu-ubuntu2204-base",
}
# Queued-resource states (QueuedResourceState.State) and what they mean here.
PROGRESS = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
FAILED_STATES = ("FAILED", "SUSPENDED", "SUSPENDING")
_WHAT_TO_DO = {
    "FAILED": "see its error above; run `down` to delete it (it holds quota) and `create` again, "
              "perhaps in another zone or with --spot",
    "SUSPENDED": "it was preempted or its reservation ended; run `down`, then `create` again",
    "SUSPENDING": "it is being preempted; run `down`, then `create` again",
}


class LaunchError(Exception):
    """A step that failed; the message says what happened and what to do."""


def runtime_version(accelerator_type: str) -> str:
    generation = accelerator_type.rsplit("-", 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise ValueError(f"no default runtime version for accelerator type {accelerator_type!r} "
                         f"(known: {', '.join(sorted(RUNTIME_VERSIONS))}); pass --runtime_version")
    return RUNTIME_VERSIONS[generation]


class Gcloud:
    """Runs (or, dry, prints) gcloud commands; every command is also kept in `commands`."""

    def __init__(self, *, zone: str, project: str | None, dry_run: bool):
        self.zone, self.project, self.dry_run = zone, project, dry_run
        self.commands: list[list[str]] = []

    def argv(self, *args: str) -> list[str]:
        return ["gcloud", *args, f"--zone={self.zone}", *([f"--project={self.project}"] if self.project else [])]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        argv = self.argv(*args)
        self.commands.append(argv)
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return subprocess.CompletedProcess(argv, 0, "", "")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI (cloud.google.com/sdk)") from None
        if check and proc.returncode:
            raise LaunchError(f"`{shlex.join(argv)}` failed: {_last_line(proc.stderr)}")
        return proc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _not_found(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 and ("NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower())


class Slice:
    def __init__(self, gcloud: Gcloud, name: str, *, queued: bool):
        self.gcloud, self.name, self.queued = gcloud, name, queued
        self.kind = ("compute", "tpus", "queued-resources") if queued else ("compute", "tpus", "tpu-vm")

    def describe(self) -> dict | None:
        """The resource as gcloud describes it; None when it does not exist."""
        proc = self.gcloud.run(*self.kind, "describe", self.name, "--format=json", check=False)
        if self.gcloud.dry_run:
            return None
        if _not_found(proc):
            return None
        if proc.returncode:
            raise LaunchError(f"describing {self.name} failed: {_last_line(proc.stderr)}")
        return json.loads(proc.stdout)

    def state(self, described: dict | None) -> str | None:
        if described is None:
            return None
        if self.queued:
            return (described.get("state") or {}).get("state")
        return described.get("state")

    def create(self, accelerator_type: str, version: str, *, spot: bool, reserved: bool,
               valid_until_duration: str | None, network: str | None, subnetwork: str | None,
               internal_ips: bool) -> None:
        state = self.state(self.describe())
        if state in FAILED_STATES:
            print(f"{self.name}: deleting the stale {state} request first (it holds quota)", file=sys.stderr)
            self.delete()
        elif state is not None:
            print(f"{self.name}: already requested ({state}); not creating it again", file=sys.stderr)
            return
        args = [*self.kind, "create", self.name, f"--accelerator-type={accelerator_type}"]
        if self.queued:
            args += [f"--node-id={self.name}", f"--runtime-version={version}"]
            if valid_until_duration:
                args.append(f"--valid-until-duration={valid_until_duration}")
        else:
            args.append(f"--version={version}")
        if spot:
            args.append("--spot")
        if reserved:
            args.append("--reserved")
        if network:
            args.append(f"--network={network}")
        if subnetwork:
            args.append(f"--subnetwork={subnetwork}")
        if internal_ips:
            args.append("--internal-ips")
        proc = self.gcloud.run(*args, check=False)
        if proc.returncode:
            message = _last_line(proc.stderr)
            if "RESOURCE_EXHAUSTED" in proc.stderr or "no more capacity" in proc.stderr.lower():
                raise LaunchError(
                    f"no {accelerator_type} capacity in zone {self.gcloud.zone} ({message}); try another zone, "
                    "--spot, --reserved with a reservation, or a queued request that waits (the default)")
            raise LaunchError(f"creating {self.name} failed: {message}")

    def wait(self, *, poll_s: float, max_poll_s: float, timeout_s: float, sleep=time.sleep,
             clock=time.monotonic) -> None:
        ready = "ACTIVE" if self.queued else "READY"
        start, interval, last = clock(), poll_s, None
        while True:
            described = self.describe()
            if self.gcloud.dry_run:
                return
            state = self.state(described)
            if state is None:
                raise LaunchError(f"{self.name} does not exist in zone {self.gcloud.zone}; run `create` first")
            if state != last:
                print(f"{self.name}: {state} after {clock() - start:.0f} s", file=sys.stderr, flush=True)
                last = state
            if state == ready:
                return
            if state in FAILED_STATES:
                detail = ""
                if self.queued:
                    error = ((described.get("state") or {}).get("failedData") or {}).get("error") or {}
                    detail = f": {error.get('message')}" if error.get("message") else ""
                raise LaunchError(f"{self.name} is {state}{detail}; {_WHAT_TO_DO.get(state, 'run `down`')}")
            if clock() - start + interval > timeout_s:
                raise LaunchError(f"{self.name} is still {state} after {clock() - start:.0f} s (--timeout_s="
                                  f"{timeout_s:.0f}); it stays queued: run `wait` again, or `down` to give up")
            sleep(interval)
            interval = min(interval * 2, max_poll_s)

    def delete(self) -> None:
        args = [*self.kind, "delete", self.name, "--quiet"]
        if self.queued:
            args.append("--force")  # the TPU VMs go with it
        proc = self.gcloud.run(*args, check=False)
        if proc.returncode and not _not_found(proc):
            raise LaunchError(f"deleting {self.name} failed: {_last_line(proc.stderr)}")


REMOTE_DIR = "$HOME/xlserve"
TPU_VM = ("compute", "tpus", "tpu-vm")
# Processes holding the TPU (a previous server, a stray notebook) and libtpu's lock file.
FREE_TPU = ("sudo lsof -t /dev/vfio/* /dev/accel* 2>/dev/null | sort -u | xargs -r sudo kill -9; "
            "sudo rm -f /tmp/libtpu_lockfile")
# A fresh VM runs unattended upgrades for a while: pip must not race apt for the lock.
WAIT_DPKG = ("while sudo fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock >/dev/null 2>&1; "
             "do echo waiting for dpkg; sleep 5; done")
VERSIONS = ("python3 -c \"import importlib.metadata as m; "
            "print('xlserve-versions', 'jax', m.version('jax'), 'libtpu', m.version('libtpu'))\"")
ALIVE = f'kill -0 "$(cat {REMOTE_DIR}/serve.pid 2>/dev/null)" 2>/dev/null'


class Workers:
    """The slice's TPU VMs, reached with `gcloud compute tpus tpu-vm ssh/scp`."""

    def __init__(self, gcloud: Gcloud, name: str, *, internal_ips: bool, retries: int, retry_s: float,
                 sleep=time.sleep):
        self.gcloud, self.name, self.internal_ips = gcloud, name, internal_ips
        self.retries, self.retry_s, self.sleep = retries, retry_s, sleep

    def _run(self, args: list[str], what: str, retries: int, check: bool) -> subprocess.CompletedProcess:
        for attempt in range(1, retries + 1):
            proc = self.gcloud.run(*args, check=False)
            if proc.returncode == 0 or not check:
                return proc
            if attempt < retries:
                print(f"{self.name}: {what} failed ({_last_line(proc.stderr)}); retry {attempt} of {retries - 1} "
                      f"in {self.retry_s:.0f} s", file=sys.stderr, flush=True)
                self.sleep(self.retry_s)
        raise LaunchError(f"{what} on {self.name} failed: {_last_line(proc.stderr)}")

    def ssh(self, command: str, *, worker: str = "all", retry: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
        args = [*TPU_VM, "ssh", self.name, f"--worker={worker}", f"--command={command}"]
        if self.internal_ips:
            args.append("--internal-ip")
        return self._run(args, f"ssh to worker {worker}", self.retries if retry else 1, check)

    def scp(self, local: str, remote: str, *, retry: bool = False) -> None:
        args = [*TPU_VM, "scp", local, f"{self.name}:{remote}", "--worker=all"]
        if self.internal_ips:
            args.append("--internal-ip")
        self._run(args, "scp", self.retries if retry else 1, True)

    def install(self, wheel: str) -> None:
        self.ssh(f"mkdir -p {REMOTE_DIR}", retry=True)  # the first contact: keys may still be propagating
        self.scp(wheel, "~/xlserve/", retry=True)
        remote = f"{REMOTE_DIR}/{os.path.basename(wheel)}"
        proc = self.ssh(f"{WAIT_DPKG}; python3 -m pip install -q --upgrade \"{remote}[tpu]\" && {VERSIONS}")
        if self.gcloud.dry_run:
            return
        found = sorted({line.strip() for line in proc.stdout.splitlines() if line.startswith("xlserve-versions")})
        if not found:
            raise LaunchError(f"no worker of {self.name} reported its jax/libtpu versions after installing")
        if len(found) > 1:
            raise LaunchError(f"the workers of {self.name} have different jax/libtpu versions ({'; '.join(found)}); "
                              "run `install` again")
        print(f"{self.name}: installed on every worker ({found[0].removeprefix('xlserve-versions ')})",
              file=sys.stderr, flush=True)

    def start(self, serve_flags: list[str], *, port: int, coordinator_port: int) -> None:
        serve = shlex.join(["python3", "-m", "runtime.serve", f"--port={port}", *serve_flags])
        self.ssh(f"{FREE_TPU}; mkdir -p {REMOTE_DIR} && cd {REMOTE_DIR} && "
                 f"JAX_COORDINATOR_PORT={coordinator_port} setsid nohup {serve} > serve.log 2>&1 < /dev/null & "
                 f"echo $! > {REMOTE_DIR}/serve.pid")

    def health(self, *, port: int, timeout_s: float, poll_s: float, clock=time.monotonic) -> None:
        probe = ("python3 -c \"from runtime.client import Client; "
                 f"Client('localhost:{port}').wait_until_serving({poll_s:g})\"")
        start = clock()
        while True:
            if self.ssh(probe, worker="0", check=False).returncode == 0 or self.gcloud.dry_run:
                print(f"{self.name}: SERVING on worker 0, port {port}", file=sys.stderr, flush=True)
                return
            check = self.ssh(f"if {ALIVE}; then echo xlserve-alive; else echo xlserve-dead; "
                             f"tail -n 3 {REMOTE_DIR}/serve.log; fi", check=False)
            if "xlserve-dead" in check.stdout:
                tail = [line for line in check.stdout.splitlines() if line.strip() and "xlserve-" not in line]
                raise LaunchError(f"serve exited on a worker of {self.name}: {tail[-1] if tail else '(empty log)'}; "
                                  "see `logs`")
            if clock() - start > timeout_s:
                raise LaunchError(f"{self.name} is not SERVING after {timeout_s:.0f} s (--health_timeout_s); "
                                  "see `logs`")
            self.sleep(poll_s)  # the probe may fail at once (ssh): do not hammer gcloud

    def status(self) -> str:
        proc = self.ssh(f'if {ALIVE}; then echo "xlserve-worker $(hostname): serving"; '
                        f'else echo "xlserve-worker $(hostname): not serving"; fi', check=False)
        return "\n".join(line.removeprefix("xlserve-worker ") for line in proc.stdout.splitlines()
                         if line.startswith("xlserve-worker"))

    def logs(self, lines: int) -> str:
        return self.ssh(f"tail -n {lines} {REMOTE_DIR}/serve.log", check=False).stdout

    def stop(self) -> None:
        self.ssh(f'if {ALIVE}; then kill -TERM "$(cat {REMOTE_DIR}/serve.pid)"; fi', check=False)


def build_wheel(dest: str, *, dry_run: bool) -> str:
    """A wheel of this checkout (what `install` copies to the workers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dest, root]
    if dry_run:
        print(shlex.join(argv), flush=True)
        return os.path.join(dest, "xlserve-0.1.0-py3-none-any.whl")
    proc = subprocess.run(argv, capture_output=True, text=True)
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")] if proc.returncode == 0 else []
    if not wheels:
        raise LaunchError(f"building the wheel failed: {_last_line(proc.stderr)}")
    return os.path.join(dest, wheels[0])


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        usage_error(f"give one command: {', '.join(COMMANDS)}")
    command, serve_flags = argv[1], list(argv[2:])
    if serve_flags and command not in ("up", "start"):
        usage_error(f"{command} takes no arguments; serve flags go after `--` with up or start")
    for name in ("name", "zone"):
        if not getattr(FLAGS, name):
            usage_error(f"--{name} is required")
    if FLAGS.spot and FLAGS.reserved:
        usage_error("--spot and --reserved exclude each other")
    version = FLAGS.runtime_version
    if command in ("create", "up"):
        if not FLAGS.accelerator_type:
            usage_error("--accelerator_type is required to create a slice")
        try:
            version = version or runtime_version(FLAGS.accelerator_type)
        except ValueError as e:
            usage_error(str(e))
    gcloud = Gcloud(zone=FLAGS.zone, project=FLAGS.project, dry_run=FLAGS.dry_run)
    tpu = Slice(gcloud, FLAGS.name, queued=FLAGS.queued)
    workers = Workers(gcloud, FLAGS.name, internal_ips=FLAGS.internal_ips, retries=FLAGS.ssh_retries,
                      retry_s=FLAGS.ssh_retry_s)
    steps = ("create", "wait", "install", "start", "health") if command == "up" else (command,)
    try:
        for step in steps:
            if step == "create":
                tpu.create(FLAGS.accelerator_type, version, spot=FLAGS.spot, reserved=FLAGS.reserved,
                           valid_until_duration=FLAGS.valid_until_duration, network=FLAGS.network,
                           subnetwork=FLAGS.subnetwork, internal_ips=FLAGS.internal_ips)
            elif step == "wait":
                tpu.wait(poll_s=FLAGS.poll_s, max_poll_s=FLAGS.max_poll_s, timeout_s=FLAGS.timeout_s)
            elif step == "install":
                with tempfile.TemporaryDirectory() as tmp:
                    workers.install(FLAGS.wheel or build_wheel(tmp, dry_run=FLAGS.dry_run))
            elif step == "start":
                workers.start(serve_flags, port=FLAGS.port, coordinator_port=FLAGS.coordinator_port)
            elif step == "health":
                workers.health(port=FLAGS.port, timeout_s=FLAGS.health_timeout_s, poll_s=FLAGS.poll_s)
            elif step == "status":
                state = tpu.state(tpu.describe())
                workers_state = workers.status() if state in ("ACTIVE", "READY") else ""
                if not FLAGS.dry_run:
                    print(f"{FLAGS.name}: {state or 'not found'}")
                    if workers_state:
                        print(workers_state)
            elif step == "logs":
                print(workers.logs(FLAGS.log_lines), end="")
            elif step == "stop":
                workers.stop()
            elif step == "down":
                tpu.delete()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
