"""Two hosts on one machine: horovodrun treats 127.0.0.2 as a remote host and starts its rank over ssh.

Horovod calls a host local when its address is one of this machine's interface
addresses (psutil); 127.0.0.2 is not listed on `lo` but still reaches this
machine, so horovodrun goes through the whole remote path: ssh check, task
servers for the common network interface, and the rank started by ssh. An
sshd of the test's own (own host key, own authorized key) listens on
127.0.0.2 only and is stopped by process id.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import checkpoint_dir, free_port, run
from test_horovod import messages

pytestmark = pytest.mark.horovod


@pytest.fixture
def ssh_host(tmp_path):
    if not os.path.exists("/usr/sbin/sshd"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    port = free_port("127.0.0.2")
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.2\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n"
    )
    # The ssh that horovodrun runs, with the host key recorded here instead of in ~/.ssh/known_hosts.
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(
        f'#!/bin/sh\nexec /usr/bin/ssh -o UserKnownHostsFile={d}/known_hosts -o LogLevel=ERROR "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    log = open(d / "sshd.log", "w")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while "Server listening" not in (d / "sshd.log").read_text():
            assert sshd.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.05)
        yield port, d
    finally:
        sshd.send_signal(signal.SIGTERM)
        sshd.wait(timeout=10)
        log.close()


def test_two_hosts_one_started_over_ssh(ssh_host, digits_shards, tmp_path):
    port, d = ssh_host
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# rank 0 on the 'remote' host, rank 1 here\n127.0.0.2 slots=1\nlocalhost slots=1\n")
    run_dir = tmp_path / "run"
    res = run([sys.executable, "-m", "launch", "--hostfile", hostfile, "--ssh-port", port,
               "--ssh-identity-file", d / "id", "--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}",
               "--set", f"data.dir={digits_shards}", "--set", "train.epochs=1", "--set", "train.export=false",
               "--set", "runtime.log_all_ranks=true"],
              env={"PATH": f"{d}/bin:{os.environ['PATH']}"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "-np 2 --gloo -H 127.0.0.2:1,localhost:1 " in out
    assert f" --ssh-port {port} --ssh-identity-file {d}/id " in out
    # One rank per host: each is local rank 0 of 1; Horovod sees two hosts.
    for rank in (0, 1):
        assert re.search(rf"rank{rank} INFO trainer.train: rank {rank} of 2 \(local 0 of 1\)", out), out[-3000:]
    # The ssh check, the interface probe and rank 0 each logged in.
    assert (d / "sshd.log").read_text().count("Accepted publickey for root") >= 2
    after = messages(out, "weights after training:")
    assert sorted(after) == [0, 1] and after[0] == after[1]
    assert checkpoint_dir(run_dir, 22).is_dir()
