"""Running a study: plan the cells, reuse cached ones, compute the rest on a process pool.

A *cell* is one (dataset, seed, epsilon, method) result. Its cache key is the SHA-256 of
its full configuration: the dataset's source bytes and preprocessing, partition,
missingness, seed, k, the method, and for private methods epsilon, delta and the public
bounds -- plus a fingerprint of the code that computes it (the fediim engine modules and
this package's data/missingness/methods modules) and the library versions. A finished
cell is written at once, atomically, as ``<cache>/<key>.json``; a rerun of an interrupted
(or extended) study computes only the cells without a file. Failed cells are reported and
not cached, so a rerun retries them.

Private methods of one (dataset, seed, epsilon) are computed together as one task (one
bank fit, the methods are post-processing of it); each still has its own cache file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fediim.io.json_results import to_json_value, write_results
from simulations.config import (
    PRIVATE_METHODS,
    DatasetConfig,
    Study,
    StudyConfigError,
    eps_key,
)
from simulations.data import DataLoadError, cached_raw, make_federation
from simulations.methods import Task, TaskResult, compute_task
from simulations.provenance import StudyRun, code_fingerprint
from simulations.report import write_outputs

__all__ = ["CACHE_VERSION", "StudyRun", "code_fingerprint", "plan", "run_study",
           "validate_data"]

CACHE_VERSION = 1
Compute = Callable[[Task], TaskResult]


# -- validation against the data -----------------------------------------------------------
def validate_data(study: Study) -> dict[str, str]:
    """Load every dataset once (main process) and check the study's column references.

    Returns each dataset's data fingerprint. Raises :class:`StudyConfigError` naming the key.
    """
    fps: dict[str, str] = {}
    sites: set[str] = set()
    for i, ds in enumerate(study.config.datasets):
        raw = cached_raw(study, i)  # memoised: forked workers inherit it
        fps[ds.name] = raw.fingerprint
        _check_columns(study, ds, raw.columns, f"datasets[{i}] ({ds.name})")
        # partition and masking once, to fail early rather than in every cell
        fed = make_federation(study, i, study.config.study.seeds[0], raw=raw)
        sites.update(fed.site_names)
        if study.config.missingness.mechanism == "one_attribute" and not any(
                (~np.isnan(x)).all(axis=1).any() for x in fed.sites):
            raise DataLoadError(f"{study.source}: datasets[{i}] ({ds.name}): no site has a "
                                "complete row, so missingness.mechanism = 'one_attribute' "
                                "hides nothing")
    miss = study.config.missingness
    for key, name in [*(("site_rates", n) for n in miss.site_rates),
                      *(("sites", n) for n in miss.sites)]:
        if name not in sites:
            raise StudyConfigError(f"{study.source}: invalid study: missingness.{key}."
                                   f"{name}: no dataset has a site named {name!r} (sites: "
                                   f"{', '.join(sorted(sites))}; name them with "
                                   "partition.site_names)")
    return fps


def _named_columns(study: Study) -> list[tuple[str, str]]:
    """(key, column) of every column the missingness and downstream sections name."""
    miss, down = study.config.missingness, study.config.downstream
    named = []
    for key, section in [("missingness", miss),
                         *((f"missingness.sites.{n}", own) for n, own in miss.sites.items())]:
        named += [(f"{key}.columns[{j}]", c) for j, c in enumerate(section.columns or [])]
        if section.driver is not None:
            named.append((f"{key}.driver", section.driver))
    if down is not None:
        named += [("downstream.target", down.target),
                  ("downstream.coefficient", down.coefficient)]
        named += [(f"downstream.features[{j}]", c) for j, c in enumerate(down.features or [])]
    return named


def _check_columns(study: Study, ds: DatasetConfig, cols: list[str], key: str) -> None:
    """The missingness columns and bounds name real columns; private methods have bounds."""
    src = study.source
    for where, c in _named_columns(study):
        if c not in cols:
            raise StudyConfigError(f"{src}: invalid study: {where}: no column {c!r} in dataset "
                                   f"{ds.name!r} (columns: {', '.join(cols)})")
    for c in ds.bounds:
        if c not in cols:
            raise StudyConfigError(f"{src}: invalid study: {key}.bounds.{c}: no such column "
                                   f"(columns: {', '.join(cols)})")
    private = study.private_methods
    lacking = [c for c in cols if c not in study.bounds_for(ds)]
    if private and lacking:
        raise StudyConfigError(
            f"{src}: invalid study: bounds: no public bounds for column(s) "
            f"{', '.join(map(repr, lacking))} of dataset {ds.name!r}. The private "
            f"method(s) {', '.join(private)} scale every release into [lo, hi] per "
            "column, which must come from domain knowledge, not from the data: add "
            f"e.g. `{lacking[0]} = [lo, hi]` under [bounds] (or [datasets.bounds])")


# -- planning -----------------------------------------------------------------------------
def _canonical(obj: Any) -> str:
    """``obj`` as compact JSON with sorted keys (what a cell's key hashes)."""
    return json.dumps(to_json_value(obj), sort_keys=True, separators=(",", ":"))


def cell_identity(study: Study, index: int, seed: int, epsilon: float | None, method: str,
                  data_fp: str, code_fp: str) -> dict[str, Any]:
    """Everything a cell's result depends on (hashed into its cache key)."""
    cfg = study.config
    ds = cfg.datasets[index]
    ident: dict[str, Any] = {
        "cache_version": CACHE_VERSION, "code": code_fp, "data": data_fp,
        "dataset": ds.model_dump(exclude={"path", "bounds"}),
        "missingness": cfg.missingness.model_dump(), "seed": seed, "k": cfg.study.k,
        "method": method,
    }
    if cfg.downstream is not None:
        ident["downstream"] = cfg.downstream.model_dump()
    if method in PRIVATE_METHODS:
        b = study.bounds_for(ds)
        ident.update(epsilon=eps_key(epsilon), delta=cfg.study.delta,
                     bounds={c: list(v) for c, v in sorted(b.items())})
    return ident


def cell_key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(ident).encode()).hexdigest()


def plan(study: Study, data_fps: dict[str, str], code_fp: str) -> list[Task]:
    """Every task of the study, in report order (all cells, cached or not)."""
    cfg = study.config
    s = cfg.study
    tasks: list[Task] = []
    for i, ds in enumerate(cfg.datasets):
        fp = data_fps[ds.name]
        for seed in s.seeds:
            for m in study.public_methods:
                k = cell_key(cell_identity(study, i, seed, None, m, fp, code_fp))
                tasks.append(Task(study, i, seed, None, (m,), (k,)))
            priv = tuple(study.private_methods)
            for eps in (s.epsilons if priv else []):
                keys = tuple(cell_key(cell_identity(study, i, seed, eps, m, fp, code_fp))
                             for m in priv)
                tasks.append(Task(study, i, seed, eps, priv, keys))
    return tasks


_COST = {"missforest": 40.0, "missforest_local": 30.0, "mice": 6.0, "mice_local": 5.0,
         "hybrid": 6.0, "federated": 2.0, "local": 1.5, "centralized": 1.5}


def _cost(t: Task) -> float:
    return sum(_COST.get(m, 0.5) for m in t.methods) + (1.0 if t.epsilon is not None else 0.0)


# -- cache --------------------------------------------------------------------------------
def _cache_path(cache: Path, key: str) -> Path:
    return cache / f"{key}.json"


def _read_cached(cache: Path, key: str) -> dict[str, Any] | None:
    p = _cache_path(cache, key)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable or torn (should not happen: writes are atomic) -> recompute
    if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(
            doc.get("record"), dict):
        return None
    rec: dict[str, Any] = doc["record"]
    return rec


def _write_cached(cache: Path, key: str, ident: dict[str, Any], record: dict[str, Any]
                  ) -> None:
    write_results(_cache_path(cache, key), {"key": key, "identity": ident, "record": record})


# -- progress -----------------------------------------------------------------------------
class _Progress:
    """A rich progress bar on a terminal; plain lines otherwise; nothing if disabled."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.done = enabled, total, 0
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("cells"),
                                 TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console, transient=False)
            self._task = self._bar.add_task(title, total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int, label: str, detail: str) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=label)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}: {detail}", file=sys.stderr, flush=True)


# -- running ------------------------------------------------------------------------------
def _worker_init() -> None:
    # Ctrl-C is the main process's to handle: it stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # two processes on two cores: no BLAS oversubscription
    except Exception:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


def _guarded(compute: Compute, task: Task) -> tuple[TaskResult | None, str | None]:
    try:
        return compute(task), None
    except Exception as exc:  # a failing cell is reported, the study goes on
        return None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"


def _mp_context() -> Any:
    # fork is fast (workers inherit the imported libraries) and safe here: workers are
    # started before any progress thread exists. Elsewhere, the platform default.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextmanager
def _executor(workers: int) -> Iterator[ProcessPoolExecutor]:
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                             initializer=_worker_init)
    try:
        # start every worker now, while this process has no other threads
        list(ex.map(int, range(workers)))
        yield ex
    except BaseException:
        procs = list(getattr(ex, "_processes", {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # our own workers: finished cells are cached, stop the rest now
            proc.terminate()
        raise
    else:
        ex.shutdown(wait=True)


def _summary_line(recs: TaskResult) -> str:
    return ", ".join(f"{r['method']} {r['nrmse']:.3f}" for r in recs)


class _Collector:
    """Takes each finished task: caches and keeps its cells, or records its failure."""

    def __init__(self, cache: Path, idents: dict[str, dict[str, Any]],
                 results: dict[str, dict[str, Any]]) -> None:
        self.cache, self.idents, self.results = cache, idents, results
        self.failures: list[dict[str, Any]] = []

    def finish(self, t: Task, recs: TaskResult | None, err: str | None, bar: _Progress
               ) -> None:
        if recs is None:
            self.failures.append({"task": t.label(), "dataset": t.dataset, "seed": t.seed,
                                  "epsilon": eps_key(t.epsilon), "methods": list(t.methods),
                                  "error": err})
            bar.advance(len(t.methods), t.label(), "FAILED: " + (err or "").splitlines()[0])
            return
        for rec, k in zip(recs, t.keys, strict=True):
            rec = {**rec, "key": k}
            _write_cached(self.cache, k, self.idents[k], rec)
            self.results[k] = rec
        bar.advance(len(t.methods), t.label(), _summary_line(recs))


def _split_cached(tasks: list[Task], cache: Path
                  ) -> tuple[dict[str, dict[str, Any]], list[Task]]:
    """The cells already in the cache (by key), and the tasks narrowed to the others."""
    results: dict[str, dict[str, Any]] = {}
    pending: list[Task] = []
    for t in tasks:
        missing = []
        for m, k in zip(t.methods, t.keys, strict=True):
            rec = _read_cached(cache, k)
            if rec is not None:
                results[k] = rec
            else:
                missing.append((m, k))
        if missing:
            pending.append(Task(t.study, t.dataset_index, t.seed, t.epsilon,
                                tuple(m for m, _ in missing), tuple(k for _, k in missing)))
    return results, pending


def _compute(pending: list[Task], compute: Compute, workers: int, collector: _Collector,
             bar: _Progress) -> None:
    """Compute the pending tasks, most expensive first, in this process or on a pool."""
    pending = sorted(pending, key=_cost, reverse=True)
    if workers <= 1 or len(pending) == 1:
        with bar:
            for t in pending:
                collector.finish(t, *_guarded(compute, t), bar)
        return
    with _executor(min(workers, len(pending))) as ex, bar:
        futs: dict[Future[Any], Task] = {ex.submit(_guarded, compute, t): t for t in pending}
        left = set(futs)
        while left:
            done, left = wait(left, return_when=FIRST_COMPLETED)
            for fu in done:
                collector.finish(futs[fu], *fu.result(), bar)


def run_study(study: Study, out_dir: str | os.PathLike[str], *, workers: int = 2,
              cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
              compute: Compute = compute_task, write: bool = True,
              log: Callable[[str], None] | None = None) -> StudyRun:
    """Run (or resume) ``study``; write results, plots and ``report.md`` under ``out_dir``.

    ``workers = 1`` computes in this process (``compute`` may then be any callable, e.g. a
    test double); more uses a process pool (``compute`` must be picklable).
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    data_fps = validate_data(study)
    code_fp = code_fingerprint()
    tasks = plan(study, data_fps, code_fp)
    n_cells = sum(len(t.methods) for t in tasks)
    results, pending = _split_cached(tasks, cache)
    n_cached = len(results)
    n_todo = n_cells - n_cached
    say(f"study {study.name}: {n_cells} cells ({len(study.config.datasets)} dataset(s) x "
        f"{len(study.config.study.seeds)} seed(s) x methods/epsilons); {n_cached} cached in "
        f"{cache}, {n_todo} to compute" + (f" on {workers} worker(s)" if n_todo else ""))
    idents = {k: cell_identity(study, t.dataset_index, t.seed, t.epsilon, m,
                               data_fps[t.dataset], code_fp)
              for t in pending for m, k in zip(t.methods, t.keys, strict=True)}
    collector = _Collector(cache, idents, results)
    cache.mkdir(parents=True, exist_ok=True)
    if pending:
        _compute(pending, compute, workers, collector, _Progress(progress, n_todo, study.name))
    ordered = [results[k] for t in tasks for k in t.keys if k in results]
    run = StudyRun(study, ordered, collector.failures, n_cells, n_cached, n_todo,
                   time.perf_counter() - t_start, code_fp, out, cache, started=started)
    if write:
        run.files = write_outputs(run)
    return run
