"""ONNX Runtime latency/throughput of several ONNX files of one model, measured side by side.

Timing is *interleaved*: every repetition runs each model once (in an order that rotates from one
repetition to the next), so that machine load that comes and goes hits all models alike. The
minimum is the best estimate of what the hardware can do; the median shows the typical run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, ExportError
from .onnx_qdq import (conv_kernel_counts, conv_matmul_count, cpu_features, load_session, ort_op_counts,
                       session_options, speed_advice)

DEFAULT_REPS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 2
DEFAULT_BATCHES = (1, 32)


@dataclass
class Timing:
    model: str
    batch: int
    times_ms: list[float] = field(default_factory=list)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def images_per_s(self) -> float:
        """Throughput at the median time."""
        return 1000.0 * self.batch / self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "batch": self.batch, "min_ms": round(self.min_ms, 3),
                "median_ms": round(self.median_ms, 3), "images_per_s": round(self.images_per_s, 1),
                "reps": len(self.times_ms)}


@dataclass
class BenchResult:
    models: dict[str, str]  # label -> path
    threads: int
    reps: int
    timings: dict[tuple[str, int], Timing]
    file_bytes: dict[str, int]
    ort_ops: dict[str, dict[str, int]]
    baseline: str
    environment: dict[str, Any] = field(default_factory=dict)
    conv_matmuls: dict[str, int] = field(default_factory=dict)  # label -> convs written as MatMulInteger

    def conv_kernels(self, model: str) -> tuple[int, int]:
        """(integer, float) convolution kernels of ``model`` after ONNX Runtime's optimisations."""
        return conv_kernel_counts(self.ort_ops.get(model, {}), self.conv_matmuls.get(model, 0))

    def speedup(self, model: str, batch: int, stat: str = "median") -> float:
        base = self.timings[(self.baseline, batch)]
        t = self.timings[(model, batch)]
        return getattr(base, f"{stat}_ms") / getattr(t, f"{stat}_ms")

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": dict(self.models),
            "threads": self.threads,
            "reps": self.reps,
            "baseline": self.baseline,
            "file_bytes": dict(self.file_bytes),
            "ort_ops": {k: dict(v) for k, v in self.ort_ops.items()},
            "conv_kernels": {k: dict(zip(("int8", "float"), self.conv_kernels(k))) for k in self.models},
            "timings": [dict(t.to_dict(), speedup_min=round(self.speedup(t.model, t.batch, "min"), 3),
                             speedup_median=round(self.speedup(t.model, t.batch, "median"), 3))
                        for t in self.timings.values()],
            "environment": dict(self.environment),
        }

    def table(self) -> str:
        """A markdown table: one row per model and batch size."""
        rows = ["| model | batch | min ms | median ms | images/s | speed-up vs "
                f"{self.baseline} (min / median) | file MB | int8 / float convs |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for (label, batch), t in self.timings.items():
            i8, fl = self.conv_kernels(label)
            rows.append(f"| {label} | {batch} | {t.min_ms:.2f} | {t.median_ms:.2f} | {t.images_per_s:.0f} | "
                        f"{self.speedup(label, batch, 'min'):.2f}x / {self.speedup(label, batch, 'median'):.2f}x | "
                        f"{self.file_bytes[label] / 1e6:.2f} | {i8} / {fl} |")
        return "\n".join(rows)


def u8u8_layers(path: str | os.PathLike[str]) -> int:
    """Integer layers of a zsq export whose weights are stored as uint8 (ONNX Runtime's u8u8 kernels),
    from the file's metadata; 0 for files zsq did not write."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    containers = json.loads(props.get("zsq.weight_containers", "{}"))
    lowering = json.loads(props.get("zsq.lowering", "{}"))
    return sum(1 for k, v in containers.items() if v == "uint8" and lowering.get(k) != "float")


def advice_for(models: Mapping[str, str | os.PathLike[str]], cpu: Mapping[str, Any] | None = None) -> list[str]:
    """:func:`speed_advice` for each zsq export among ``models`` (label -> path) on this CPU."""
    cpu = dict(cpu) if cpu is not None else cpu_features()
    out = []
    for label, path in models.items():
        text = speed_advice(u8u8_layers(path), cpu)
        if text:
            out.append(f"{label}: {text}")
    return out


def _input_spec(sess: Any) -> tuple[str, list[int]]:
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else -1 for d in inp.shape]
    if any(d < 1 for d in shape[1:]):
        raise ExportError(f"the model input {inp.name!r} has a dynamic non-batch dimension {inp.shape}; "
                          "bench-deploy needs fixed channels and spatial size")
    return inp.name, shape


def environment() -> dict[str, Any]:
    """CPU, load and library versions, to print next to timings."""
    import platform

    import onnxruntime as ort

    env: dict[str, Any] = {"onnxruntime": ort.__version__, "python": platform.python_version(),
                           "cpus": os.cpu_count()}
    try:
        env["load_avg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    env.update(cpu_features())
    return env


def bench(
    models: Mapping[str, str | os.PathLike[str]],
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    reps: int = DEFAULT_REPS,
    warmup: int = DEFAULT_WARMUP,
    threads: int = DEFAULT_THREADS,
    seed: int = 0,
    baseline: str | None = None,
    progress: bool = False,
) -> BenchResult:
    """Time every model in ``models`` (label -> .onnx path) at each batch size, interleaved.

    Each session has ``threads`` intra-op threads and ONNX Runtime's full graph optimisations.
    Inputs are the same random tensor for all models. ``baseline`` (default: the first label) is
    what speed-ups are relative to.
    """
    if not models:
        raise ConfigError("bench needs at least one model")
    if reps < 1 or warmup < 0 or threads < 1:
        raise ConfigError(f"reps must be >= 1, warmup >= 0 and threads >= 1 (got {reps}, {warmup}, {threads})")
    if not batches or any(b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batches)}")
    labels = list(models)
    baseline = baseline or labels[0]
    if baseline not in models:
        raise ConfigError(f"baseline {baseline!r} is not one of {labels}")
    sessions = {k: load_session(p, threads=threads, level="all") for k, p in models.items()}
    specs = {k: _input_spec(s) for k, s in sessions.items()}
    shapes = {tuple(s[1][1:]) for s in specs.values()}
    if len(shapes) != 1:
        raise ConfigError(f"the models take inputs of different shapes {sorted(shapes)}; bench models of one network")
    rng = np.random.default_rng(seed)
    sample_shape = next(iter(shapes))
    timings: dict[tuple[str, int], Timing] = {}
    for b in batches:
        x = rng.standard_normal((b, *sample_shape)).astype(np.float32)
        for k in labels:
            timings[(k, b)] = Timing(k, b)
            for _ in range(warmup):
                sessions[k].run(None, {specs[k][0]: x})
        for r in range(reps):
            order = labels[r % len(labels):] + labels[: r % len(labels)]
            for k in order:
                t0 = time.perf_counter()
                sessions[k].run(None, {specs[k][0]: x})
                timings[(k, b)].times_ms.append(1000.0 * (time.perf_counter() - t0))
            if progress:
                print(f"batch {b}: repetition {r + 1}/{reps}", end="\r", flush=True)
        if progress:
            print()
    sizes = {k: Path(p).stat().st_size for k, p in models.items()}
    ops = {k: ort_op_counts(p, level="all") for k, p in models.items()}
    env = environment()
    env.update({"threads": threads, "warmup": warmup})
    return BenchResult({k: str(p) for k, p in models.items()}, threads, reps, timings, sizes, ops, baseline, env,
                       {k: conv_matmul_count(p) for k, p in models.items()})


def bench_cpu_time(
    models: Mapping[str, str | os.PathLike[str]],
    *,
    batch: int = 32,
    reps: int = DEFAULT_REPS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
) -> dict[str, Timing]:
    """CPU time (``time.process_time``) of one run of each model, single-threaded, interleaved.

    On a machine shared with other jobs, wall-clock time measures the queue as much as the work; the
    CPU time a single-threaded session spends is far less sensitive to load (with more threads,
    ONNX Runtime's spinning workers would count too). Returns label -> :class:`Timing` (ms).
    """
    if not models or reps < 1 or warmup < 0 or batch < 1:
        raise ConfigError(f"bench_cpu_time needs models, reps >= 1, warmup >= 0, batch >= 1 "
                          f"(got {len(models)}, {reps}, {warmup}, {batch})")
    labels = list(models)
    sessions = {k: load_session(p, threads=1, level="all") for k, p in models.items()}
    specs = {k: _input_spec(s) for k, s in sessions.items()}
    shape = specs[labels[0]][1][1:]
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    out = {k: Timing(k, batch) for k in labels}
    for k in labels:
        for _ in range(warmup):
            sessions[k].run(None, {specs[k][0]: x})
    for r in range(reps):
        for k in labels[r % len(labels):] + labels[: r % len(labels)]:
            t0 = time.process_time()
            sessions[k].run(None, {specs[k][0]: x})
            out[k].times_ms.append(1000.0 * (time.process_time() - t0))
    return out


def _conv_kinds(path: str | os.PathLike[str]) -> dict[str, str]:
    """Node name -> "1x1" / "depthwise kxk" / "dense kxk" for every convolution of an ONNX file (also
    under the name of the activation that ONNX Runtime may fuse into it)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    produced = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    kinds: dict[str, str] = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvInteger") or len(n.input) < 2:
            continue
        w = n.input[1]
        while w not in shapes and w in produced and produced[w].op_type == "DequantizeLinear":
            w = produced[w].input[0]
        dims = shapes.get(w)
        if not dims or len(dims) != 4:
            continue
        kind = "1x1" if dims[2] == dims[3] == 1 else (f"depthwise {dims[2]}x{dims[3]}" if dims[1] == 1
                                                     else f"dense {dims[2]}x{dims[3]}")
        names = [n.name]
        frontier = [n]
        for _ in range(2):  # Conv -> [BatchNormalization] -> [Relu/Clip]: ORT names the fused node after either
            frontier = [c for f in frontier for c in consumers.get(f.output[0], [])
                        if c.op_type in ("BatchNormalization", "Relu", "Clip", "QuantizeLinear")]
            names += [c.name for c in frontier]
        for name in names:  # ORT renames fused nodes (e.g. "<activation>_nchwc"): also match without "/Op"
            kinds.setdefault(name, kind)
            kinds.setdefault(name.split("/")[0], kind)
    return kinds


def _kind_of(event_name: str, kinds: dict[str, str]) -> str | None:
    best = None
    for name, kind in kinds.items():
        if name and event_name.startswith(name) and (best is None or len(name) > len(best[0])):
            best = (name, kind)
    return best[1] if best else None


CONV_KERNELS = ("Conv", "QLinearConv", "ConvInteger", "FusedConv", "NchwcConv")


def profile_ops(
    path: str | os.PathLike[str], *, batch: int = 32, runs: int = 10, threads: int = DEFAULT_THREADS, seed: int = 0,
    split_convs: bool = False,
) -> dict[str, float]:
    """Milliseconds per run spent in each operator type (ONNX Runtime's profiler), largest first.

    With ``split_convs`` convolutions are split by kind (``QLinearConv depthwise 3x3``, ``Conv 1x1``, ...).
    """
    import onnxruntime as ort
    import tempfile

    kinds = _conv_kinds(path) if split_convs else {}
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads=threads, level="all", profile_prefix=os.path.join(tmp, "zsq_profile"))
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name, shape = _input_spec(sess)
        x = np.random.default_rng(seed).standard_normal((batch, *shape[1:])).astype(np.float32)
        for _ in range(2):
            sess.run(None, {name: x})
        for _ in range(runs):
            sess.run(None, {name: x})
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        if split_convs and op in CONV_KERNELS:
            kind = _kind_of(str(e["name"])[: -len("_kernel_time")], kinds)
            op = f"{op} {kind}" if kind else op
        per_op[op] = per_op.get(op, 0.0) + e.get("dur", 0) / 1000.0
    total_runs = runs + 2
    return dict(sorted(((k, v / total_runs) for k, v in per_op.items()), key=lambda kv: -kv[1]))
