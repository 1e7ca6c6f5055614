"""The experiment directory (`--storage-path`): the single source of truth of a search.

    study.db            Optuna study (SQLite): one trial per candidate, trial number = candidate
                        number; params = genotype; user attributes = the journal (see evolve.loop)
                        plus per-task metrics, recipe hash, timings, attempts and errors.
                        `optuna-dashboard sqlite:///DIR/study.db` reads it.
    manifest.json       package versions, seeds, the search config's hash and text
    best_config.yaml    the best recipe so far, with the user's own model references
    fitness.png         fitness over evaluations (written at the end)
    final_model/        the best recipe merged by the streaming engine (at the end)

Nothing here is pickled, and nothing read back can run code: the study is SQLite rows of JSON,
the other files are JSON and YAML. A resume rebuilds the optimiser by replaying the journal
(evolve.loop.resume). A `checkpoint.pkl` left by an older evomerge is never opened.

This module owns every Optuna object of the experiment and the one writer thread. Writes are
queued and applied in order by that thread, at low priority (on a small machine the workers get
the CPU first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from merge_engine.config import MergeConfig
from merge_engine.errors import ConfigError, RunFailure

from evaluators import Status
from search_spaces.genome import SearchSpace

from .loop import Candidate, JournalEntry, Outcome
from .optimizers import Proposal, optuna_distributions
from .selection import CandidateRow

log = logging.getLogger(__name__)

STUDY_NAME = "evomerge"
STORE_FORMAT = 2  # 2: trial number = candidate number, with the ask/tell journal in user attributes
FINAL_MODEL = "final_model"
# what a search may have put in its folder before the experiment opens (model+lora merges)
OWN_BEFORE_START = {"lora_merge_cache"}  # DIR/final_model: an ordinary model folder, usable as a model reference


def is_experiment(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() or (folder / "study.db").is_file()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def round_to_dtype(value: float, dtype: str) -> float:
    """`value` as the merge engine uses a weight: rounded to float32, then to the merge dtype
    (round to nearest even), computed without torch."""
    import struct

    single = struct.unpack("<f", struct.pack("<f", value))[0]
    if dtype == "float16":
        return struct.unpack("<e", struct.pack("<e", single))[0]
    if dtype == "bfloat16":
        bits = struct.unpack("<I", struct.pack("<f", single))[0]
        if (bits & 0x7F800000) != 0x7F800000:  # finite: round the low 16 bits away, to even
            bits += 0x7FFF + ((bits >> 16) & 1)
        return struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))[0]
    return single


def _rounded_weights(node, dtype: str, under_weight: bool = False):
    if isinstance(node, dict):
        return {k: _rounded_weights(v, dtype, under_weight or k == "weight") for k, v in node.items()}
    if isinstance(node, list):
        return [_rounded_weights(v, dtype, under_weight) for v in node]
    if under_weight and isinstance(node, float):
        return round_to_dtype(node, dtype)
    return node


def recipe_hash(config: MergeConfig) -> str:
    """Identity of a recipe as merged: two recipes with the same hash give the same model. Weights
    count as the engine uses them (rounded to the merge dtype), so genotypes that differ only below
    that precision are recognised as one recipe and evaluated once."""
    plain = _rounded_weights(config.to_plain(), str(config.dtype or "float32"))
    return text_hash(json.dumps(plain, sort_keys=True, default=str))


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("evomerge", "torch", "transformers", "lm_eval", "ray", "optuna", "cma", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(root: Path) -> dict:
    """The experiment's manifest ({} where there is none); anything else than the JSON object an
    evomerge experiment writes is refused with a line naming the file."""
    path = Path(root) / "manifest.json"
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not an evomerge manifest (unreadable JSON: {err})") from None
    if not isinstance(manifest, dict) or "config_hash" not in manifest:
        raise ConfigError(f"{path}: not an evomerge manifest (no config_hash): is {path.parent} another tool's folder?")
    return manifest


SQLITE_HEADER = b"SQLite format 3\x00"


def check_study_file(path: Path) -> None:
    """Refuse a study file that is missing, not SQLite, damaged or not an evomerge study, with a line
    naming it, before Optuna opens it (Optuna would answer with a long SQLAlchemy traceback, or
    add its tables to a foreign database). Read-only: the file is left as it was."""
    import sqlite3

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing: the experiment's study (its journal) is not there")
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise ConfigError(f"{path}: not an SQLite database (damaged, or not written by evomerge)")
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise ConfigError(f"{path}: damaged SQLite database ({problems[0]})")
            names = [row[0] for row in con.execute("SELECT study_name FROM studies")]
        finally:
            con.close()
    except sqlite3.Error as err:
        raise ConfigError(f"{path}: damaged or foreign SQLite database ({err})") from None
    if STUDY_NAME not in names:
        raise ConfigError(f"{path}: holds no evomerge study (studies: {', '.join(names) or 'none'})")


def check_storage(root: Path, config_text: str, resume: bool) -> None:
    """Everything about --storage-path that can refuse a run, read-only and before anything heavy
    (the driver calls it first, so a wrong folder is refused in a fraction of a second, before the
    models, torch or lm-eval are loaded; `ExperimentStore.open` calls it again):
    resume: a manifest of this config and store format, and a readable evomerge study;
    a new search: a new or empty folder."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    config_hash = text_hash(config_text)
    if resume:
        if not manifest_path.exists():
            raise ConfigError(f"--resume: {root} holds no experiment (no manifest.json)")
        manifest = read_manifest(root)
        if manifest.get("config_hash") != config_hash:
            raise ConfigError(
                f"--resume: the search config differs from the one {root} was started with "
                f"(see {manifest_path}); resume with the same file or use a new --storage-path"
            )
        if manifest.get("store_format") != STORE_FORMAT:
            raise ConfigError(
                f"--resume: {root} was written by an older evomerge (store format "
                f"{manifest.get('store_format', 1)}, this version writes {STORE_FORMAT}); start a new --storage-path"
            )
        check_study_file(root / "study.db")
    elif manifest_path.exists() or (root / "study.db").exists():
        raise ConfigError(
            f"--storage-path {root} already holds an experiment: pass --resume to continue it, "
            "or choose another directory"
        )
    elif root.is_dir() and {p.name for p in root.iterdir()} - OWN_BEFORE_START:
        raise ConfigError(
            f"--storage-path {root} is a folder with other files in it, not an experiment: choose a new or "
            "empty folder (a search writes its study, recipe and final model there)"
        )


def open_study(path: Path, create: bool):
    """The experiment's Optuna study in `path` (SQLite); `create`: make it if it is not there."""
    import optuna

    storage = f"sqlite:///{Path(path).resolve()}"
    try:
        if create:
            return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True)
        return optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except Exception as err:  # SQLAlchemy, Optuna's schema checks: one line naming the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: cannot open the experiment's study: {first}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _write_or_fail(target: Path, fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # OSError, SQLite's "disk I/O error" through SQLAlchemy and Optuna
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFailure(f"{target}: cannot write ({detail}); what was written before is kept: free the space "
                         "(or fix the cause) and continue with --resume") from err


def _lower_thread_priority() -> None:
    """Lower this thread's scheduling priority (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # other platforms: normal priority
        pass


def outcome_attrs(outcome: Outcome, tell_order: int) -> dict:
    """The user attributes a finished candidate's trial holds (read back by `outcome_of`)."""
    attrs = {
        "status": outcome.status,
        "tell_order": tell_order,
        "metrics": outcome.metrics,
        "timings": outcome.timings,
        "attempts": outcome.attempts,
    }
    if outcome.recipe_hash:
        attrs["recipe_hash"] = outcome.recipe_hash
    if outcome.worker:
        attrs["worker"] = outcome.worker
    if outcome.error:
        attrs["error"] = outcome.error[:2000]
    optional = {"objectives": list(outcome.objectives), "violation": outcome.violation, "items": outcome.items,
                "first_items": outcome.first_items, "item_values": outcome.item_values,
                "faults": list(outcome.faults), "descent": outcome.descent}
    attrs.update({k: v for k, v in optional.items() if v})
    # candidate 0 is a valid number
    attrs.update({k: v for k, v in (("reused_from", outcome.reused_from), ("paired_with", outcome.paired_with),
                                    ("stage", outcome.stage)) if v is not None})
    if outcome.status == Status.STOPPED and outcome.fitness is not None and math.isfinite(outcome.fitness):
        attrs["estimate"] = outcome.fitness  # the fitness told to the optimiser: the paired estimate
    return attrs


def outcome_of(attrs: dict, value: Optional[float]) -> Outcome:
    """A finished trial's outcome, from its user attributes (`outcome_attrs`) and its value."""
    a = attrs
    return Outcome(
        status=a.get("status", Status.FAILED), fitness=value if value is not None else a.get("estimate"),
        metrics=a.get("metrics", {}), error=a.get("error"), timings=a.get("timings", {}),
        attempts=a.get("attempts", 1), recipe_hash=a.get("recipe_hash"), worker=a.get("worker"),
        objectives=tuple(a.get("objectives", ())), violation=a.get("violation", 0.0), items=a.get("items", 0),
        reused_from=a.get("reused_from"), first_items=a.get("first_items"), paired_with=a.get("paired_with"),
        stage=a.get("stage"), item_values=a.get("item_values"), faults=tuple(a.get("faults", ())),
        descent=a.get("descent"),
    )


def trial_row(trial) -> CandidateRow:
    """A complete trial as evolve.selection's row."""
    a = trial.user_attrs
    return CandidateRow.of(trial.number, outcome_of(a, trial.value), a.get("tell_order", trial.number), a.get("anchor"))


class ExperimentStore:
    def __init__(self, root: Path, space: SearchSpace, anchor_labels: Sequence[str] = ()):
        """`anchor_labels`: what each anchor (a proposal of generation -1, by index) is, kept on its
        trial as the user attribute `anchor`."""
        self.root = Path(root)
        self.space = space
        self.distributions = optuna_distributions(space)
        self.anchor_labels = list(anchor_labels)
        self.study = None
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: list[Future] = []
        self._trials_in_study = 0  # kept by the writer thread: no study query per new trial

    # -- opening ----------------------------------------------------------------------------------

    def manifest(self) -> dict:
        return read_manifest(self.root)

    def open(self, config_text: str, seeds: dict, resume: bool, extra: Optional[dict] = None) -> None:
        """`extra`: facts fixed when the experiment starts (the optimiser chosen), kept in the manifest."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        check_storage(self.root, config_text, resume)
        manifest_path = self.root / "manifest.json"
        config_hash = text_hash(config_text)
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            manifest = {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "store_format": STORE_FORMAT,
                "config_hash": config_hash,
                "config": config_text,
                "seeds": seeds,
                "versions": _versions(),
                **(extra or {}),
            }
            _atomic_write(manifest_path, json.dumps(manifest, indent=2).encode())
        self.study = open_study(self.root / "study.db", create=not resume)
        self._trials_in_study = len(self.study.get_trials(deepcopy=False))

    # -- reading the journal ----------------------------------------------------------------------

    def journal(self) -> list[JournalEntry]:
        """Every candidate of the experiment, by number (see evolve.loop)."""
        import optuna

        entries = []
        for t in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            a = t.user_attrs
            proposal = Proposal(tuple(self.genotype_of(t)), a["generation"], a["index"])
            candidate = Candidate(t.number, proposal, a["told_before"])
            if t.state == optuna.trial.TrialState.RUNNING:
                entries.append(JournalEntry(candidate))
                continue
            entries.append(JournalEntry(candidate, outcome_of(a, t.value), a["tell_order"]))
        return entries

    # -- writing (the loop's Recorder) ------------------------------------------------------------

    def asked(self, candidate: Candidate) -> None:
        self._submit(self._write_asked, candidate)

    def told(self, candidate: Candidate, outcome: Outcome, tell_order: int) -> None:
        self._submit(self._write_told, candidate, outcome, tell_order)

    def write_best_config(self, config: MergeConfig, fitness: float, metrics: dict, number: int) -> None:
        header = f"# best recipe so far: trial {number}, fitness {fitness:.6g}, metrics {json.dumps(metrics)}\n"
        path = self.root / "best_config.yaml"
        self._submit(_atomic_write, path, (header + config.to_yaml()).encode(), target=path)

    def flush(self) -> None:
        """Wait until every queued write is on disk (and raise a write's error)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None

    def _submit(self, fn, *args, target: Optional[Path] = None) -> None:
        """Queue a write of `target` (default: the study). A write that failed (disk full, say) is
        raised here, at the search's next ask or tell, as one line naming the file: nothing
        finished before it is lost, and `--resume` goes on from there once the cause is fixed."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="study-writer", initializer=_lower_thread_priority)
        self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
        if any(f.done() for f in self._pending):
            self.flush()
        self._pending.append(self._writer.submit(_write_or_fail, target or self.root / "study.db", fn, *args))

    def _trial_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)

    def _write_asked(self, candidate: Candidate) -> None:
        import optuna

        existing = self._trials_in_study
        if existing > candidate.number:
            return  # already in the study (asked before a resume)
        if existing != candidate.number:
            raise RuntimeError(f"study has {existing} trials, cannot add candidate {candidate.number}")
        trial = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params={n: float(v) for n, v in zip(self.space.names, candidate.genotype)},
            distributions=self.distributions,
            user_attrs={
                "generation": candidate.proposal.generation,
                "index": candidate.proposal.index,
                "told_before": candidate.told_before,
                **({"anchor": self.anchor_labels[candidate.proposal.index]} if candidate.proposal.generation < 0
                   and candidate.proposal.index < len(self.anchor_labels) else {}),
            },
        )
        self.study.add_trial(trial)
        self._trials_in_study += 1

    def _write_told(self, candidate: Candidate, outcome: Outcome, tell_order: int) -> None:
        import optuna

        storage = self.study._storage
        trial_id = self._trial_id(candidate.number)
        attrs = outcome_attrs(outcome, tell_order)
        finite = outcome.fitness is not None and math.isfinite(outcome.fitness)
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        if outcome.status == Status.COMPLETE and finite:
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.COMPLETE, [outcome.fitness])
        elif outcome.status == Status.STOPPED and finite:
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.PRUNED)
        else:
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)

    # -- reading results --------------------------------------------------------------------------

    def finished(self) -> list:
        """Every candidate with a result: complete, failed, or stopped early by racing (pruned)."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
        return [t for t in self.study.get_trials(deepcopy=False) if t.state in states]

    def rows(self) -> list[CandidateRow]:
        """The complete candidates (what selection, re-scoring and reports read)."""
        return [trial_row(t) for t in self.finished() if t.value is not None]

    def set_directions(self, directions: dict) -> None:
        """The evaluator's task directions, kept for exports made without workers."""
        if self.study.user_attrs.get("directions") != directions:
            self._submit(self.study.set_user_attr, "directions", directions)

    def directions(self) -> dict:
        return dict(self.study.user_attrs.get("directions", {}))

    def trial(self, number: int):
        return self.study.get_trials(deepcopy=False)[number]


    def genotype_of(self, trial) -> list[float]:
        return [float(trial.params[n]) for n in self.space.names]
