"""launch.tpu_vm run as a user runs it, against a fake `gcloud` on PATH that records
every call and answers from a script (tests/launch/fake_gcloud.py): the exact commands,
and what the launcher does with capacity errors, queues, failures and deletions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = ("--name=xl", "--zone=us-east5-b", "--project=proj")
WHERE = ["--zone=us-east5-b", "--project=proj"]
QR = ["compute", "tpus", "queued-resources"]


def _state(name: str, error: str | None = None) -> dict:
    state = {"state": name}
    if error:
        state["failedData"] = {"error": {"message": error}}
    return {"rc": 0, "stdout": json.dumps({"name": "xl", "state": state})}


NOT_FOUND = {"rc": 1, "stderr": "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found\n"}


class Fake:
    def __init__(self, tmp_path: Path, rules: list[dict]):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(f"#!{sys.executable}\nimport runpy\nrunpy.run_path({str(ROOT / 'tests/launch/fake_gcloud.py')!r}, "
                          "run_name='__main__')\n")
        gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
        self.log = tmp_path / "calls.jsonl"
        self.scenario = tmp_path / "scenario.json"
        self.scenario.write_text(json.dumps({"rules": rules}))
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                    "FAKE_GCLOUD_LOG": str(self.log), "FAKE_GCLOUD_SCENARIO": str(self.scenario)}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.tpu_vm", *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=60)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


def test_create_sends_the_queued_request(tmp_path):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [NOT_FOUND]}])
    p = fake.run("create", *BASE, "--accelerator_type=v6e-16", "--spot", "--valid_until_duration=6h",
                 "--network=net", "--subnetwork=sub", "--internal_ips")
    assert p.returncode == 0, p.stderr
    assert fake.calls() == [
        [*QR, "describe", "xl", "--format=json", *WHERE],
        [*QR, "create", "xl", "--accelerator-type=v6e-16", "--node-id=xl", "--runtime-version=v2-alpha-tpuv6e",
         "--valid-until-duration=6h", "--spot", "--network=net", "--subnetwork=sub", "--internal-ips", *WHERE],
    ]


@pytest.mark.parametrize("accelerator,version", [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
                                                 ("v6e-8", "v2-alpha-tpuv6e")])
def test_plain_create_and_runtime_versions(tmp_path, accelerator, version):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [NOT_FOUND]}])
    p = fake.run("create", *BASE, f"--accelerator_type={accelerator}", "--noqueued", "--reserved")
    assert p.returncode == 0, p.stderr
    assert fake.calls()[-1] == ["compute", "tpus", "tpu-vm", "create", "xl", f"--accelerator-type={accelerator}",
                                f"--version={version}", "--reserved", *WHERE]


def test_capacity_error_names_the_zone_and_what_to_try(tmp_path):
    fake = Fake(tmp_path, [
        {"match": ["describe"], "answers": [NOT_FOUND]},
        {"match": ["create"], "answers": [{"rc": 1, "stderr": "ERROR: (gcloud) RESOURCE_EXHAUSTED: There is no more "
                                                               "capacity in the zone \"us-east5-b\"\n"}]},
    ])
    p = fake.run("create", *BASE, "--accelerator_type=v6e-8", "--noqueued")
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no v6e-8 capacity in zone us-east5-b") and "another zone" in line


def test_a_stale_failed_request_is_deleted_first_and_a_live_one_kept(tmp_path):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [_state("FAILED", "quota")]}])
    assert fake.run("create", *BASE, "--accelerator_type=v6e-8").returncode == 0
    verbs = [c[3] for c in fake.calls()]
    assert verbs == ["describe", "delete", "create"]
    assert fake.calls()[1] == [*QR, "delete", "xl", "--quiet", "--force", *WHERE]

    (tmp_path / "live").mkdir()
    live = Fake(tmp_path / "live", [{"match": ["describe"], "answers": [_state("WAITING_FOR_RESOURCES")]}])
    p = live.run("create", *BASE, "--accelerator_type=v6e-8")
    assert p.returncode == 0 and "already requested (WAITING_FOR_RESOURCES)" in p.stderr
    assert [c[3] for c in live.calls()] == ["describe"]  # re-running create is safe


def test_wait_prints_progress_until_active(tmp_path):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [
        _state("WAITING_FOR_RESOURCES"), _state("WAITING_FOR_RESOURCES"), _state("PROVISIONING"), _state("ACTIVE")]}])
    p = fake.run("wait", *BASE, "--poll_s=0.01", "--max_poll_s=0.02")
    assert p.returncode == 0, p.stderr
    states = [line.split(": ")[1].split(" after")[0] for line in p.stderr.splitlines() if line.startswith("xl: ")]
    assert states == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
    assert len(fake.calls()) == 4


@pytest.mark.parametrize("state,hint", [("FAILED", "run `down`"), ("SUSPENDED", "preempted")])
def test_wait_ends_on_failure_with_what_to_do(tmp_path, state, hint):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [_state("PROVISIONING"), _state(state, "no capacity")]}])
    p = fake.run("wait", *BASE, "--poll_s=0.01")
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: xl is {state}") and hint in line
    if state == "FAILED":
        assert ": no capacity;" in line


def test_wait_gives_up_after_the_timeout(tmp_path):
    fake = Fake(tmp_path, [{"match": ["describe"], "answers": [_state("WAITING_FOR_RESOURCES")]}])
    p = fake.run("wait", *BASE, "--poll_s=0.05", "--timeout_s=0.2")
    assert p.returncode == 1 and "still WAITING_FOR_RESOURCES" in p.stderr and "run `wait` again" in p.stderr


def test_down_is_safe_twice_and_status_says_not_found(tmp_path):
    fake = Fake(tmp_path, [
        {"match": ["delete"], "answers": [{"rc": 0}, {"rc": 1, "stderr": "ERROR: NOT_FOUND: xl\n"}]},
        {"match": ["describe"], "answers": [NOT_FOUND]},
    ])
    assert fake.run("down", *BASE).returncode == 0
    assert fake.run("down", *BASE).returncode == 0
    p = fake.run("status", *BASE)
    assert p.returncode == 0 and p.stdout.strip() == "xl: not found"


def test_dry_run_prints_the_commands_and_runs_none(tmp_path):
    fake = Fake(tmp_path, [])
    p = fake.run("create", *BASE, "--accelerator_type=v5litepod-16", "--dry_run")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "gcloud compute tpus queued-resources describe xl --format=json --zone=us-east5-b --project=proj",
        "gcloud compute tpus queued-resources create xl --accelerator-type=v5litepod-16 --node-id=xl "
        "--runtime-version=v2-alpha-tpuv5-lite --zone=us-east5-b --project=proj",
    ]
    assert fake.calls() == []


@pytest.mark.parametrize("args,message", [
    (("create", "--name=xl", "--zone=z"), "--accelerator_type is required"),
    (("create", *BASE, "--accelerator_type=tpu9-8"), "no default runtime version"),
    (("launch", *BASE), "give one command"),
    (("create", *BASE, "--accelerator_type=v6e-8", "--spot", "--reserved"), "exclude each other"),
    (("wait", "--zone=z"), "--name is required"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, args, message):
    p = Fake(tmp_path, []).run(*args)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


WORKER_FLAGS = ("--wheel=/tmp/xlserve-0.1.0-py3-none-any.whl", "--ssh_retry_s=0.01", "--poll_s=0.01")
VERSIONS = "xlserve-versions jax 0.10.2 libtpu 0.0.30\n"


def _worker_rules(*, install_out=VERSIONS * 4, probe=({"rc": 0},), alive="xlserve-alive\n"):
    return [
        {"match": ["mkdir -p $HOME/xlserve", "--worker=all"], "answers": [
            {"rc": 255, "stderr": "ERROR: ssh: connect to host: Permission denied (publickey)\n"},
            {"rc": 255, "stderr": "ERROR: Permission denied (publickey)\n"}, {"rc": 0}]},
        {"match": ["pip install"], "answers": [{"rc": 0, "stdout": install_out}]},
        {"match": ["wait_until_serving"], "answers": list(probe)},
        {"match": ["xlserve-alive"], "answers": [{"rc": 0, "stdout": alive}]},
    ]


def test_up_runs_every_step_and_retries_the_first_ssh(tmp_path):
    fake = Fake(tmp_path, [{"match": ["queued-resources describe"], "answers": [NOT_FOUND, _state("PROVISIONING"),
                                                                               _state("ACTIVE")]},
                           *_worker_rules(probe=({"rc": 1}, {"rc": 0}))])
    p = fake.run("up", *BASE, "--accelerator_type=v6e-16", *WORKER_FLAGS, "--",
                 "--checkpoint=gs://bucket/llama", "--tensor_parallel_size=16")
    assert p.returncode == 0, p.stderr
    calls = fake.calls()
    kinds = [(c[2], c[3]) for c in calls]
    assert kinds == [("queued-resources", "describe"), ("queued-resources", "create"),
                     ("queued-resources", "describe"), ("queued-resources", "describe"),
                     *[("tpu-vm", "ssh")] * 3, ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh"),
                     ("tpu-vm", "ssh"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]
    assert calls[7] == ["compute", "tpus", "tpu-vm", "scp", "/tmp/xlserve-0.1.0-py3-none-any.whl", "xl:~/xlserve/",
                        "--worker=all", *WHERE]
    install = calls[8][6]
    assert 'pip install -q --upgrade "$HOME/xlserve/xlserve-0.1.0-py3-none-any.whl[tpu]"' in install
    assert install.startswith("--command=while sudo fuser /var/lib/dpkg/lock-frontend")  # a fresh VM's apt
    start = calls[9][6]
    assert "sudo lsof -t /dev/vfio/* /dev/accel*" in start and "sudo rm -f /tmp/libtpu_lockfile" in start
    assert ("JAX_COORDINATOR_PORT=8476 setsid nohup python3 -m runtime.serve --port=50051 "
            "--checkpoint=gs://bucket/llama --tensor_parallel_size=16 > serve.log") in start
    assert calls[10][6].startswith("--command=python3 -c") and calls[10][5] == "--worker=0"  # health probe
    assert "retry 1 of 4" in p.stderr and "retry 2 of 4" in p.stderr
    assert "installed on every worker (jax 0.10.2 libtpu 0.0.30)" in p.stderr
    assert "SERVING on worker 0, port 50051" in p.stderr


def test_up_again_resumes_without_a_second_request(tmp_path):
    fake = Fake(tmp_path, [{"match": ["queued-resources describe"], "answers": [_state("ACTIVE")]}, *_worker_rules()])
    p = fake.run("up", *BASE, "--accelerator_type=v6e-8", *WORKER_FLAGS)
    assert p.returncode == 0, p.stderr
    assert "create" not in [c[3] for c in fake.calls()] and "already requested (ACTIVE)" in p.stderr


def test_workers_with_different_versions_fail_install(tmp_path):
    fake = Fake(tmp_path, _worker_rules(install_out=VERSIONS + "xlserve-versions jax 0.10.1 libtpu 0.0.29\n"))
    p = fake.run("install", *BASE, *WORKER_FLAGS)
    assert p.returncode == 1 and "different jax/libtpu versions" in p.stderr


def test_health_reports_a_worker_whose_serve_died(tmp_path):
    fake = Fake(tmp_path, _worker_rules(probe=({"rc": 1},),
                                        alive="xlserve-alive\nxlserve-dead\nTraceback\nCheckpointError: no such dir\n"))
    p = fake.run("health", *BASE, *WORKER_FLAGS)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "error: serve exited on a worker of xl: CheckpointError: no such dir; see `logs`")


def test_status_logs_and_stop(tmp_path):
    fake = Fake(tmp_path, [
        {"match": ["queued-resources describe"], "answers": [_state("ACTIVE")]},
        {"match": ["xlserve-worker"], "answers": [{"stdout": "xlserve-worker t-w-0: serving\n"
                                                             "xlserve-worker t-w-1: not serving\n"}]},
        {"match": ["tail -n 7"], "answers": [{"stdout": "line a\nline b\n"}]},
    ])
    p = fake.run("status", *BASE)
    assert p.returncode == 0 and p.stdout.splitlines() == ["xl: ACTIVE", "t-w-0: serving", "t-w-1: not serving"]
    p = fake.run("logs", *BASE, "--log_lines=7")
    assert p.returncode == 0 and p.stdout == "line a\nline b\n"
    assert fake.run("stop", *BASE).returncode == 0
    assert "kill -TERM" in fake.calls()[-1][6] and fake.calls()[-1][5] == "--worker=all"


def test_flags_after_the_separator_only_for_up_and_start(tmp_path):
    p = Fake(tmp_path, []).run("down", *BASE, "--", "--checkpoint=x")
    assert p.returncode == 2 and "serve flags go after `--` with up or start" in p.stderr


def test_install_builds_a_wheel_of_the_checkout(tmp_path):
    """What `install` copies: every package a worker imports to serve, and the launcher."""
    import zipfile

    from launch.tpu_vm import build_wheel

    wheel = build_wheel(str(tmp_path), dry_run=False)
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("runtime/serve.py", "runtime/client.py", "sharding/distributed.py", "pallas_kernels/dispatch.py",
                   "checkpoints/converter.py", "launch/tpu_vm.py"):
        assert module in names, module
    assert any(n.endswith("METADATA") for n in names)
