"""Training across machines: two `torchrun` launchers (`--nnodes 2`, c10d rendezvous on 127.0.0.1, gloo), each
in its own checkout as on two machines, run the real train stage; both ranks end with identical weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
import torch
from pipeline_project import Project

# Runs `visionops train` and saves this rank's final weights (only rank 0 writes models/teacher.pt).
PROBE = """
import os, sys, torch
import visionops.tasks.classification.train as stage

fit = stage.fit
def probed(*args, **kwargs):
    model, state = fit(*args, **kwargs)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
               os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.pt"))
    return model, state
stage.fit = probed
from visionops.cli import main
sys.exit(main(["train"]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_ranks_hold_identical_weights(tmp_path):
    first = Project(tmp_path / "node0")
    first.set_params(train={"model": "lenet", "epochs": 2, "batch_size": 64, "device": "cpu"})
    first.repro("prepare")
    second = tmp_path / "node1"
    shutil.copytree(first.path, second, symlinks=True)  # the other "machine": its own checkout of the same data
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
           "--rdzv_id", uuid.uuid4().hex, "--local_addr", "127.0.0.1", "--max_restarts", "0", str(probe)]
    launchers = []
    for cwd in (first.path, second):
        env = {**first.env(), "PYTHONPATH": str(cwd / "src"), "PROBE_DIR": str(tmp_path), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1"}
        launchers.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
    try:
        outs = [p.communicate(timeout=600)[0] for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, out in zip(launchers, outs):
        assert p.returncode == 0, out[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # rank 0 (whichever launcher the rendezvous made node 0) alone writes the model and the metrics
    writers = [d for d in (first.path, second) if (d / "models" / "teacher.pt").exists()]
    assert len(writers) == 1, writers
    assert json.loads((writers[0] / "reports" / "train" / "details.json").read_text())["world_size"] == 2
