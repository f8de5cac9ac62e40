"""Recipe runs as processes of their own, recorded in their output folders so any UI process can find them.

`launch` starts `python -m jaxswift.webui.runs wrap OUTPUT_DIR -- python -m jaxswift.recipes.X ...` in a new session
(its own process group), stdout and stderr to OUTPUT_DIR/run.log, and writes OUTPUT_DIR/run.json (the command, pid,
start time). The wrapper waits for the recipe and writes its exit code to OUTPUT_DIR/run.exit, so a UI restarted
later still tells finished from failed. `stop` signals the whole group (SIGTERM, then SIGKILL after a grace period)
and marks the run stopped. Nothing here imports gradio or JAX: the wrapper is this file.

A run's status, from disk: stopped (a stop was requested and the group is gone), finished / failed (the exit code),
running (no exit code and a live process in the group), failed (no exit code and nothing alive: killed from outside).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from jaxswift.errors import JaxswiftError

RUN_FILE, LOG_FILE, EXIT_FILE, METRICS_FILE = "run.json", "run.log", "run.exit", "logging.jsonl"
SKIPPED_DIRS = {"checkpoints", "runs", "data_cache", "adapter", "model"}  # a run's own subfolders: not scanned
RUN_NICENESS = 10  # runs yield the CPU to the UI process (the page must answer while a run trains)
_children: dict[int, subprocess.Popen] = {}  # processes this UI started, reaped when their status is read


class RunError(JaxswiftError):
    """A launch or stop that cannot be done (a live run in the folder, nothing to stop...)."""


@dataclasses.dataclass
class Run:
    output_dir: Path
    recipe: str
    argv: list[str]  # the `jaxswift ...` command line it runs
    pid: int  # the wrapper's pid, which is also the process group id
    started: float
    log_offset: int = 0  # logging.jsonl's size at launch: the records before it belong to earlier runs
    stop_requested: float | None = None
    stopped: float | None = None
    returncode: int | None = None
    status: str = "running"

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    @property
    def name(self) -> str:
        return self.output_dir.name


def _write_json(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file


def _record(run: Run) -> dict:
    fields = ("recipe", "argv", "pid", "started", "log_offset", "stop_requested", "stopped")
    return {"output_dir": str(run.output_dir), "command": run.command,
            **{k: getattr(run, k) for k in fields}}


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, which only wait to be reaped, do not count)."""
    for child in list(_children.values()):
        child.poll()  # reap the wrappers this process started
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ')'
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def read_run(output_dir: str | Path) -> Run | None:
    """The run recorded in output_dir (None if there is none), with its status worked out from disk."""
    folder = Path(output_dir)
    try:
        raw = json.loads((folder / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    run = Run(output_dir=folder, recipe=raw.get("recipe", "?"), argv=list(raw.get("argv", [])),
              pid=int(raw.get("pid", 0)), started=float(raw.get("started", 0)),
              log_offset=int(raw.get("log_offset", 0)), stop_requested=raw.get("stop_requested"),
              stopped=raw.get("stopped"))
    try:
        run.returncode = json.loads((folder / EXIT_FILE).read_text())["returncode"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    alive = run.pid > 0 and run.returncode is None and group_alive(run.pid)
    if run.stop_requested is not None:
        run.status = "stopping" if alive else "stopped"
    elif run.returncode is not None:
        run.status = "finished" if run.returncode == 0 else "failed"
    else:
        run.status = "running" if alive else "failed"
    return run


def launch(recipe: str, argv: list[str], output_dir: str | Path, *, cwd: str | Path | None = None,
           env: dict | None = None, niceness: int = RUN_NICENESS) -> Run:
    """Starts `jaxswift RECIPE ARGV` (argv[0] is 'jaxswift', argv[1] the command) writing to output_dir, at a
    lower CPU priority (`niceness`) than the UI, so the page answers at once while the run takes every idle cycle."""
    folder = Path(output_dir)
    previous = read_run(folder)
    if previous is not None and previous.status in ("running", "stopping"):
        raise RunError(f"{folder} is in use by a live run (pid {previous.pid}, started "
                       f"{time.strftime('%H:%M:%S', time.localtime(previous.started))}): stop it or choose another "
                       f"output_dir")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (EXIT_FILE,):
        (folder / stale).unlink(missing_ok=True)
    metrics = folder / METRICS_FILE
    offset = metrics.stat().st_size if metrics.exists() else 0
    recipe_cmd = [sys.executable, "-m", recipe, *argv[2:]]
    wrapper = [sys.executable, "-m", "jaxswift.webui.runs", "wrap", str(folder), str(niceness), "--", *recipe_cmd]
    with open(folder / LOG_FILE, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        child = subprocess.Popen(wrapper, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=cwd, env=env)
    _children[child.pid] = child
    run = Run(output_dir=folder, recipe=argv[1], argv=list(argv), pid=child.pid, started=time.time(),
              log_offset=offset)
    _write_json(folder / RUN_FILE, _record(run))
    return run


def stop(output_dir: str | Path, grace: float = 5.0) -> Run:
    """SIGTERM to the run's process group, SIGKILL after `grace` seconds if anything is left; marks it stopped."""
    run = read_run(output_dir)
    if run is None:
        raise RunError(f"{output_dir}: no run recorded here")
    if run.status not in ("running", "stopping"):
        raise RunError(f"{run.name} is {run.status}: nothing to stop")
    run.stop_requested = run.stop_requested or time.time()
    _write_json(run.output_dir / RUN_FILE, _record(run))
    _signal_group(run.pid, signal.SIGTERM)
    if not _wait_gone(run.pid, grace):
        _signal_group(run.pid, signal.SIGKILL)
        _wait_gone(run.pid, 5.0)
    run.stopped = time.time()
    _write_json(run.output_dir / RUN_FILE, _record(run))
    return read_run(run.output_dir)


def _signal_group(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def scan(output_root: str | Path, max_depth: int = 3) -> list[Run]:
    """Every run recorded under output_root (run.json up to max_depth folders down), newest first."""
    root = Path(output_root)
    found = []
    if not root.is_dir():
        return found
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = [] if depth >= max_depth else sorted(d for d in dirs if d not in SKIPPED_DIRS)
        if RUN_FILE in files:
            run = read_run(folder)
            if run is not None:
                found.append(run)
    return sorted(found, key=lambda r: r.started, reverse=True)


def log_tail(run: Run, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of run.log (progress-bar carriage returns resolved to their last state)."""
    path = run.output_dir / LOG_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return "\n".join(shown[-lines:])


def metrics(run: Run) -> list[dict]:
    """This run's records of logging.jsonl (those written after its launch); a line being written is skipped."""
    path = run.output_dir / METRICS_FILE
    try:
        with open(path) as f:
            f.seek(run.log_offset)
            text = f.read()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------- the wrapper (`python -m jaxswift.webui.runs wrap`)

def _wrap(output_dir: str, niceness: int, command: list[str]) -> int:
    """Runs the recipe in this process group, waits for it (a group SIGTERM reaches it as well), records its exit."""
    if niceness:
        os.nice(niceness)  # the recipe inherits it
    signal.signal(signal.SIGTERM, lambda *_: None)  # the recipe gets the same signal; we outlive it to record it
    signal.signal(signal.SIGINT, lambda *_: None)
    child = subprocess.Popen(command)
    returncode = child.wait()
    _write_json(Path(output_dir) / EXIT_FILE, {"returncode": returncode, "ended": time.time()})
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[1] != "wrap" or sys.argv[4] != "--":
        sys.exit("usage: python -m jaxswift.webui.runs wrap OUTPUT_DIR NICENESS -- COMMAND ...")
    sys.exit(_wrap(sys.argv[2], int(sys.argv[3]), sys.argv[5:]))
