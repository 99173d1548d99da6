"""Starting Ray: a local Ray started by ``ensure_ray`` listens on loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh process. ``ray`` is imported before ensure_ray, as ``cloudlab run`` does
# (adapters.dispatch imports it), so that Ray's import-time constants are already set. After
# one task has run (a worker process is up), it prints every TCP socket in LISTEN state that
# this process or any process it started holds, as [process name, address, port].
_LISTENING_SCRIPT = r"""
import json, os, socket
import ray
from adapters.ray_runtime import ensure_ray

def listening_inodes():
    found = {}
    for family, table in ((socket.AF_INET, "tcp"), (socket.AF_INET6, "tcp6")):
        with open(f"/proc/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found

def process_tree(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree

assert ensure_ray(num_cpus=1)
node_ip = ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote())
inodes = listening_inodes()
sockets = []
for pid in process_tree(os.getpid()):
    try:
        with open(f"/proc/{pid}/comm") as comm:
            name = comm.read().strip()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                sockets.append([name, *inodes[target[8:-1]]])
    except OSError:  # the process ended meanwhile
        continue
ray.shutdown()
print(json.dumps({"node_ip": node_ip, "sockets": sorted(sockets)}))
"""


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback


def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """GCS, raylet, object manager, workers, driver and agents: no socket open to the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _LISTENING_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node_ip"] == "127.0.0.1"
    sockets = [tuple(s) for s in report["sockets"]]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet", "python"} <= names, sockets  # the servers were seen
    assert len(sockets) >= 5, sockets  # GCS, node manager, object manager, driver, worker
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
