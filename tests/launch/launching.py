"""Helpers of the launch tests: run the launcher and the scripts as a user would (bash,
fresh processes, an environment without an outer launcher's variables), follow and stop
the process tree of a run."""
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from processes import free_port, process_tree, signal_pids  # noqa: E402,F401  (the drivers' own helpers)
LAUNCHER = REPO / "run_maskllm_native.sh"
TINY_TRAIN = REPO / "tests" / "launch" / "tiny_train.sh"
# Set by torchrun or an outer launcher; a launched job must not inherit them.
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "TORCHELASTIC_RUN_ID", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "DISTRIBUTED_ARGS", "RESUME",
              "MEGATRON_EXT_ROOT", "LOG_DIR", "OMP_NUM_THREADS")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_bash(script, *args, env=None, timeout=120, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=cwd, env=env if env is not None else clean_env(),
                          capture_output=True, text=True, timeout=timeout)



class Launch:
    """``bash run_maskllm_native.sh SCRIPT RESUME`` in the background, its output read line
    by line; ``freeze`` / ``thaw`` / ``kill`` act on the whole process tree, by process id."""

    def __init__(self, script, resume, env, *extra, cwd=REPO):
        import queue
        import threading

        self.proc = subprocess.Popen(["bash", str(LAUNCHER), str(script), str(resume), *map(str, extra)], cwd=cwd,
                                     env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list = []
        self._queue: "queue.Queue" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._frozen: list = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, predicate, timeout: float) -> str:
        """The first new output line for which ``predicate(line)`` holds (AssertionError at
        the end of the output or after ``timeout`` seconds)."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout}s; output so far:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"the run ended (status {self.proc.wait()}) first; output:\n{self.output}")
            if predicate(line):
                return line

    def freeze(self) -> list:
        """SIGSTOP every process of the run (repeated until no new process appears)."""
        seen: list = []
        while True:
            tree = [p for p in process_tree(self.proc.pid) if p not in seen]
            if not tree:
                break
            signal_pids(tree, signal.SIGSTOP)
            seen += tree
        self._frozen = seen
        return seen

    def thaw(self) -> None:
        signal_pids(self._frozen, signal.SIGCONT)
        self._frozen = []

    def kill(self) -> int:
        """kill -9 every process of the run, as a machine failure would; returns the launcher's status."""
        pids = self._frozen or self.freeze()
        signal_pids(pids, signal.SIGKILL)
        self._frozen = []
        status = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return status

    def wait(self, timeout: float) -> int:
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def cleanup(self) -> None:
        """Kill whatever is left of the run (after a failed assertion)."""
        if self.proc.poll() is None or len(process_tree(self.proc.pid)) > 1:
            signal_pids(process_tree(self.proc.pid), signal.SIGKILL)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
