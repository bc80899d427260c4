"""The supervisor, the process model of `worker run`, `demo`, `replay` and the bench: K intakes, a GPU
process per device.

```
supervisor (this process: HTTP probes and merged /metrics, signals, shared memory, exit code)
 ├─ GPU process per device (one unless gpu_devices gives several): models, its one GPU thread
 │   (worker.gpu.process)
 └─ intake 1..K: consumer-group members with decode pools, publishers, committers (worker.intake)
     each with a slot ring in shared memory and a pipe to every GPU process (worker.ipc); each request
     goes to the GPU with the least outstanding work (worker.ipc.router)
```

Start-up: stale segments of a killed earlier run are unlinked; each intake's ring is created here (so
that this process, which outlives the others, can unlink them on every exit path); the GPU process
loads the models; the intakes start only when it is ready. A SIGTERM while the models load stops the
GPU process and exits 0.

Shutdown, by cause:
1. SIGTERM/SIGINT: every intake gets SIGTERM and drains (its guarantees: finish or cut, flush,
   commit, leave the group); then the GPU process is told to stop; exit 0 if every child did. A
   second signal kills every child at once (nothing more is committed) and exits 130.
2. An intake exits non-zero or is killed: the others are stopped as in 1 (their work is sound), and
   the exit code is 1, so Kubernetes restarts the pod. (A restart of the one intake alone would also
   keep the guarantees; stopping the pod keeps one simple rule: a death is loud.)
3. A GPU process exits or fails (any of them, with several): the intakes see its link end (or its
   failure message), fail every waiting message without committing it, and exit 1; exit 1. The log
   names the GPU.
4. Every intake exits 0 by itself (a replay reached its end): the GPU process is stopped, exit 0.
Shared memory is unlinked in every case; children die with this process (PR_SET_PDEATHSIG).

Modules: ``lifecycle`` (Supervisor: start, watch, stop, signals), ``health`` (ProcessHealth: the probes
over the board, pure), ``rundir`` (RunDir and MergedMetrics: what the children leave in the run folder).
"""

from worker.supervisor.health import ProcessHealth
from worker.supervisor.lifecycle import GPU_STOP_TIMEOUT_S, POLL_S, Outcome, Supervisor, supervise
from worker.supervisor.rundir import MergedMetrics, RunDir

__all__ = ["GPU_STOP_TIMEOUT_S", "POLL_S", "MergedMetrics", "Outcome", "ProcessHealth", "RunDir", "Supervisor",
           "supervise"]
