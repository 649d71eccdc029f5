"""The one way benchmarks compare two things: interleaved, with spreads, on a recorded machine.

These machines are shared and noisy, so a figure is a ratio from one run in which A and B
alternate (A B B A ..., so a drift in the machine's load falls on both alike), never a time
from one run against a time from another. Each side reports min / median / max of wall
time, of CPU time (the process's, all threads, or a child's) and of the growth of resident
memory over the call; the machine (cores, load before and after, threads) goes with them.

    from harness import compare, write_results
    result = compare("plain", run_plain, "engine", run_engine, pairs=5)
    write_results("bench_core", {"overhead": result}, command="python bench/bench_core.py")

More than two sides alternate the same way (A B C, C B A, ...: :func:`compare_many`); one
side alone is repeated with its spread (:func:`series`).

How memory is measured. In process: freed heap memory is handed back first
(``malloc_trim``), then the kernel's peak-RSS mark of the process is reset
(``/proc/self/clear_refs``, Linux) and read after the call: the peak resident memory of the
call itself over where it started, every transient spike included, and no sampling thread to
cost CPU time (where the mark cannot be reset, a thread samples the RSS every millisecond).
On a GPU: the growth of CUDA's allocator peak over what was allocated before the call. A
command: its own peak resident memory (a fresh process starts from nothing).

How CPU time is measured. In process: ``time.process_time`` (every thread of the process,
background writers included); with ``tree=True`` also the CPU time of every descendant
process over the call (Ray's workers and its own processes), from ``/proc``. A command: the
kernel's accounting of the child (user + system); with ``tree=True`` of every process it
started, orphans included (this process becomes their reaper while the command runs).

Nothing here asserts a time: a benchmark prints and records; a reader judges.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from support import RssPeak

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    """One call: wall and CPU seconds, and resident-memory growth over it in MiB."""

    wall: float
    cpu: float
    peak_mib: float


# ------------------------------------------------------------------------------------------
# /proc helpers (Linux; everything degrades to "unknown" elsewhere)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_peak(pid: int | str) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of a process to its current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _descendants() -> dict[int, int]:
    """pid -> parent pid of every live descendant of this process."""
    parents: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        parents[int(name)] = int(fields[1])
    found, frontier = {}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = ppid
                frontier.append(pid)
    return found


def _cpu_of(pid: int) -> float | None:
    """User + system seconds of a process and of its children it has waited for."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[11:15] are utime, stime, cutime, cstime (stat's fields 14-17)
    return sum(int(value) for value in fields[11:15]) / _TICK


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Watch:
    """CPU time and peak memory growth of this process (and, with ``tree``, its
    descendants) between :meth:`start` and :meth:`stop`."""

    def __init__(self, tree: bool) -> None:
        self.tree = tree

    def start(self) -> None:
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # freed heap pages go back: the baseline is live memory
        self.sampler: RssPeak | None = None
        self.baseline = _status_kib("self", "VmRSS")
        if self.baseline is None or not _reset_peak("self"):
            self.sampler = RssPeak().__enter__()
        self.others: dict[int, tuple[float, int]] = {}
        if self.tree:
            for pid in _descendants():
                _reset_peak(pid)
                self.others[pid] = (_cpu_of(pid) or 0.0, _status_kib(pid, "VmRSS") or 0)
            self.children = _children_cpu()
        self.cpu = time.process_time()

    def stop(self) -> tuple[float, float]:
        """(CPU seconds, peak growth in MiB)."""
        cpu = time.process_time() - self.cpu
        if self.sampler is not None:
            self.sampler.__exit__(None, None, None)
            growth = self.sampler.mib
        else:
            growth = ((_status_kib("self", "VmHWM") or 0) - (self.baseline or 0)) / 1024
        if self.tree:
            cpu += _children_cpu() - self.children
            for pid in _descendants():
                before_cpu, before_rss = self.others.get(pid, (0.0, 0))
                cpu += max(0.0, (_cpu_of(pid) or before_cpu) - before_cpu)
                growth += max(0, (_status_kib(pid, "VmHWM") or 0) - before_rss) / 1024
        return cpu, growth


# ------------------------------------------------------------------------------------------
# One call


def measure(call: Callable[[], Any], *, device: Any = None, tree: bool = False) -> Sample:
    """Time one in-process call: wall clock, CPU time (this process's, every thread) and the
    peak growth of memory over the call (see the module's notes).

    Args:
        device: A CUDA ``torch.device`` (or "cuda"): synchronize around the call and report
            the growth of the allocator's peak over what was allocated before it.
        tree: Add the CPU time and the peak memory growth of every descendant process (a
            Ray driver's workers): per process, summed.
    """
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    watch = _Watch(tree)
    watch.start()
    wall = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall
    cpu, growth = watch.stop()
    if cuda:
        growth = (torch.cuda.max_memory_allocated(device) - allocated) / MIB
    return Sample(wall, cpu, growth)


def measure_command(
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    *,
    cwd: str | Path | None = None,
    tree: bool = False,
    orphan_wait_s: float = 30.0,
    returncodes: Sequence[int] = (0,),
) -> Sample:
    """Time one child process: wall clock (until the child exits), its CPU time (user +
    system, from the kernel's accounting of it alone) and its peak resident memory (the
    child's own high-water mark: a fresh process starts from nothing, so peak and growth are
    the same).

    The child is started by a small launcher process, not by this one: a child forked from
    a process inherits that process's resident size as the start of its own peak (even
    across ``exec``), so a command started from a benchmark holding a model would report the
    benchmark's memory as its own.

    With ``tree``, the CPU time is that of every process the child started too, those it
    left behind included (the launcher reaps them, up to ``orphan_wait_s`` after the child
    exits, outside the wall time), and the memory is the largest peak of any one of them.

    An exit code outside ``returncodes`` raises; the last one is kept in
    ``measure_command.returncode``.
    """
    spec = {
        "argv": list(argv),
        "cwd": str(cwd) if cwd is not None else None,
        "tree": tree,
        "orphan_wait_s": orphan_wait_s,
    }
    with tempfile.NamedTemporaryFile(suffix=".err") as errors:
        spec["stderr"] = errors.name
        done = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, json.dumps(spec)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        error = Path(errors.name).read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"launcher failed ({done.returncode}): {done.stderr[-4000:]}")
    figures = json.loads(done.stdout)
    measure_command.returncode = figures["returncode"]
    if figures["returncode"] not in returncodes:
        raise RuntimeError(f"{' '.join(argv)} exited {figures['returncode']}: {error[-4000:]}")
    return Sample(figures["wall"], figures["cpu"], figures["peak_kib"] / 1024)


# Runs in a fresh, small process: forks the command, waits for it (and its orphans).
_LAUNCHER = """
import ctypes, json, os, resource, sys, time
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL("libc.so.6") if spec["tree"] else None
subreaper = libc is not None and libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        err = os.open(spec["stderr"], os.O_WRONLY | os.O_TRUNC)
        os.dup2(null, 1)
        os.dup2(err, 2)
        if spec["cwd"]:
            os.chdir(spec["cwd"])
        os.execvp(spec["argv"][0], spec["argv"])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
peak = usage.ru_maxrss
if subreaper:
    deadline = time.monotonic() + spec["orphan_wait_s"]
    try:
        while time.monotonic() < deadline:
            orphan, _, more = os.wait4(-1, os.WNOHANG)
            if orphan == 0:
                time.sleep(0.05)
                continue
            peak = max(peak, more.ru_maxrss)
    except ChildProcessError:
        pass
children = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = children.ru_utime + children.ru_stime if subreaper else usage.ru_utime + usage.ru_stime
print(json.dumps({"wall": wall, "cpu": cpu, "peak_kib": peak,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


# ------------------------------------------------------------------------------------------
# Repeats and comparisons


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summary(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """min / median / max of each measure over the samples."""
    return {
        name: spread([getattr(sample, name) for sample in samples])
        for name in ("wall", "cpu", "peak_mib")
    }


def series(
    name: str, call: Callable[[], Sample], *, repeats: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """One side alone: ``repeats`` timed calls after ``warmup`` untimed ones, with spreads."""
    load = os.getloadavg()
    for _ in range(warmup):
        call()
    samples = [call() for _ in range(repeats)]
    return {
        "name": name,
        "repeats": repeats,
        name: summary(samples),
        "load": {"before": load, "after": os.getloadavg()},
        "samples": {name: [asdict(s) for s in samples]},
    }


def _ratios(a: Sequence[Sample], b: Sequence[Sample]) -> dict[str, Any]:
    ratios: dict[str, Any] = {
        name: spread([getattr(y, name) / getattr(x, name) for x, y in zip(a, b, strict=True)])
        for name in ("wall", "cpu")
    }
    base = statistics.median(s.peak_mib for s in a)
    ratios["peak_mib of medians"] = (
        statistics.median(s.peak_mib for s in b) / base if base > 0 else None
    )
    return ratios


def compare(
    name_a: str,
    call_a: Callable[[], Sample],
    name_b: str,
    call_b: Callable[[], Sample],
    *,
    pairs: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Run A and B ``pairs`` times each, interleaved A B, B A, A B ... after ``warmup``
    untimed calls of each, and return both sides' spreads and the ratio B / A per pair.

    Args:
        call_a, call_b: Each does the work once and returns its :class:`Sample` (wrap an
            in-process call with :func:`measure`, a command with :func:`measure_command`).
        pairs: Timed calls of each side (at least 5 for a published figure).
    """
    load = os.getloadavg()
    for _ in range(warmup):
        call_a()
        call_b()
    a: list[Sample] = []
    b: list[Sample] = []
    for index in range(pairs):
        order = ((a, call_a), (b, call_b)) if index % 2 == 0 else ((b, call_b), (a, call_a))
        for samples, call in order:
            samples.append(call())
    return {
        "a": name_a,
        "b": name_b,
        "pairs": pairs,
        "order": "ABBA",
        name_a: summary(a),
        name_b: summary(b),
        f"ratio {name_b} / {name_a}": _ratios(a, b),
        "load": {"before": load, "after": os.getloadavg()},
        "samples": {name_a: [asdict(s) for s in a], name_b: [asdict(s) for s in b]},
    }


def compare_many(
    calls: Mapping[str, Callable[[], Sample]], *, rounds: int = 5, warmup: int = 1
) -> dict[str, Any]:
    """Three or more sides, interleaved as ABBA generalises: A B C, C B A, A B C ...
    (``rounds`` timed calls of each, after ``warmup`` untimed ones); the ratio of every side
    to the first, per round."""
    names = list(calls)
    load = os.getloadavg()
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            samples[name].append(calls[name]())
    first = names[0]
    result: dict[str, Any] = {"sides": names, "rounds": rounds, "order": "ABC CBA"}
    result.update({name: summary(samples[name]) for name in names})
    for name in names[1:]:
        result[f"ratio {name} / {first}"] = _ratios(samples[first], samples[name])
    result["load"] = {"before": load, "after": os.getloadavg()}
    result["samples"] = {name: [asdict(s) for s in values] for name, values in samples.items()}
    return result


def ratio_of(result: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """Per-round ratios B / A of two sides of a :func:`compare_many` result (or a
    :func:`compare` one): their calls alternated, so round i of each is a pair."""
    samples = result["samples"]
    return _ratios([Sample(**s) for s in samples[a]], [Sample(**s) for s in samples[b]])


# ------------------------------------------------------------------------------------------
# The machine, the terminal, the record


PACKAGE_FOLDERS = ("editflow", "engine", "stages", "models", "cache", "executors")


def compile_bytecode() -> None:
    """Write editflow's ``.pyc`` files, as ``pip install`` does for a wheel, before timing a
    command: an editable install under ``PYTHONDONTWRITEBYTECODE`` (set on these machines)
    otherwise compiles ~100 modules from source in every process, about 0.13 s that a
    user's installation never pays, while the libraries of the bare import have theirs."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    for folder in PACKAGE_FOLDERS:
        compileall.compile_dir(root / folder, quiet=1)


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code: cores, load, threads, versions."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "process_threads": _status_kib("self", "Threads"),
        "thread_env": {
            name: os.environ[name]
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "EDITFLOW_THREADS")
            if name in os.environ
        },
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
    }
    try:
        facts["memory_gib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
        facts["torch_interop_threads"] = torch.get_num_interop_threads()
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name()
            facts["cuda"] = torch.version.cuda
    for library in ("diffusers", "transformers", "zarr", "ray"):
        if library in sys.modules:
            facts[library] = getattr(sys.modules[library], "__version__", None)
    return facts


def format_comparison(result: dict[str, Any], unit: str = "ms", per: float = 1.0) -> str:
    """Lines for the terminal: each side's median (min-max) and the per-pair ratios.

    ``per`` divides every time (the step count, for a time per step)."""
    names = result.get("sides") or [result["a"], result["b"]]
    lines = []
    for side in names:
        figures = result[side]
        lines.append(
            f"  {side:<34} wall {_time(figures['wall'], unit, per)}"
            f"  cpu {_time(figures['cpu'], unit, per)}  peak +{_mib(figures['peak_mib'])}"
        )
    for side in names[1:]:
        ratio = result[f"ratio {side} / {names[0]}"]
        peak = ratio["peak_mib of medians"]
        lines.append(
            f"  {side} / {names[0]}: wall {_x(ratio['wall'])}, cpu {_x(ratio['cpu'])}"
            + (f", peak x{peak:.2f}" if peak is not None else "")
        )
    count = result.get("pairs") or result.get("rounds")
    lines.append(f"  ({count} {'pairs' if 'pairs' in result else 'rounds'}, {result['order']})")
    return "\n".join(lines)


def format_series(result: dict[str, Any], unit: str = "ms", per: float = 1.0) -> str:
    figures = result[result["name"]]
    return (
        f"  {result['name']:<34} wall {_time(figures['wall'], unit, per)}"
        f"  cpu {_time(figures['cpu'], unit, per)}  peak +{_mib(figures['peak_mib'])}"
        f"  ({result['repeats']} runs)"
    )


def _time(values: dict[str, float], unit: str, per: float) -> str:
    scale = {"s": 1.0, "ms": 1000.0}[unit] / per
    digits = 2 if unit == "s" else 1
    return (
        f"{values['median'] * scale:8.{digits}f} {unit}"
        f" ({values['min'] * scale:.{digits}f}-{values['max'] * scale:.{digits}f})"
    )


def _mib(values: dict[str, float]) -> str:
    return f"{values['median']:.1f} MiB ({values['min']:.1f}-{values['max']:.1f})"


def _ms(values: dict[str, float]) -> str:
    return _time(values, "ms", 1.0)


def _x(values: dict[str, float]) -> str:
    return f"{values['median']:.3f}x ({values['min']:.3f}-{values['max']:.3f})"


def write_results(bench: str, results: dict[str, Any], *, command: str) -> Path:
    """Write ``bench/results/BENCH.json``: the command that made it, the machine at the end
    (load included; each comparison carries its own load before and after) and the
    results; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{bench}.json"
    record = {
        "bench": bench,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "results": results,
    }
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    return path


def command_line() -> str:
    """How this benchmark was started, for :func:`write_results`."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        script = Path("bench") / script.name
    return " ".join(["python", str(script), *sys.argv[1:]])


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
