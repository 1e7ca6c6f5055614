"""The experiment directory (`--storage-path`): the single source of truth of a search.

    study.db            Optuna study (SQLite): one trial per candidate, with its genotype, recipe
                        hash, per-task metrics, timings and status; `optuna-dashboard` reads it
    optimizer.pkl       the optimiser's checkpoint (pycma), rewritten after every generation
    manifest.json       package versions, seeds, the search config's hash and text
    best_config.yaml    the best recipe so far, with the user's own model references
    fitness.png         fitness over evaluations (written at the end)
    final_model/        the best recipe merged by the streaming engine (at the end)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from merge_engine.config import MergeConfig
from merge_engine.errors import ConfigError

log = logging.getLogger(__name__)

STUDY_NAME = "evomerge"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_hash(config: MergeConfig) -> str:
    return text_hash(config.to_yaml())


@dataclass
class TrialRecord:
    number: int
    genotype: list[float]
    fitness: Optional[float]
    metrics: dict
    status: str  # "complete" | "failed"
    generation: int
    index: int
    recipe_hash: str
    error: Optional[str] = None
    merge_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("evomerge", "torch", "transformers", "lm_eval", "ray", "optuna", "cma", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class ExperimentStore:
    def __init__(self, root: Path, dimension_names: Sequence[str], lower, upper):
        import optuna

        self.root = Path(root)
        self.names = list(dimension_names)
        self.distributions = {
            n: optuna.distributions.FloatDistribution(lo, hi) for n, lo, hi in zip(self.names, lower, upper)
        }
        self.study = None

    # -- opening ----------------------------------------------------------------------------------

    def open(self, config_text: str, seeds: dict, resume: bool, sampler=None) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        manifest_path = self.root / "manifest.json"
        config_hash = text_hash(config_text)
        if resume:
            if not manifest_path.exists():
                raise ConfigError(f"--resume: {self.root} holds no experiment (no manifest.json)")
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("config_hash") != config_hash:
                raise ConfigError(
                    f"--resume: the search config differs from the one {self.root} was started with "
                    f"(see {manifest_path}); resume with the same file or use a new --storage-path"
                )
        elif manifest_path.exists() or (self.root / "study.db").exists():
            raise ConfigError(
                f"--storage-path {self.root} already holds an experiment: pass --resume to continue it, "
                "or choose another directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            manifest = {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config_hash": config_hash,
                "config": config_text,
                "seeds": seeds,
                "versions": _versions(),
            }
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(manifest, indent=2))
            tmp.replace(manifest_path)
        storage = f"sqlite:///{(self.root / 'study.db').resolve()}"
        self.study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, direction="maximize", load_if_exists=True, sampler=sampler
        )
        self._next_number = len(self.study.get_trials(deepcopy=False))
        self._reserved = self._next_number  # numbers handed out before their trial is written

    # -- trials -----------------------------------------------------------------------------------

    def _params(self, genotype: Sequence[float]) -> dict:
        return {n: float(v) for n, v in zip(self.names, genotype)}

    def reserve_number(self) -> int:
        """The trial number the next `record` without an Optuna trial will get."""
        self._reserved = max(self._reserved, self._next_number) + 1
        return self._reserved - 1

    def record(self, record: TrialRecord, optuna_trial=None) -> int:
        """Store a finished candidate; returns its trial number."""
        import optuna

        attrs = {
            "generation": record.generation,
            "index": record.index,
            "recipe_hash": record.recipe_hash,
            "metrics": record.metrics,
            "merge_s": record.merge_s,
            "eval_s": record.eval_s,
            "total_s": record.total_s,
        }
        if record.error:
            attrs["error"] = record.error[:2000]
        ok = record.status == "complete" and record.fitness is not None and math.isfinite(record.fitness)
        state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
        if optuna_trial is not None:
            for k, v in attrs.items():
                optuna_trial.set_user_attr(k, v)
            self.study.tell(optuna_trial, record.fitness if ok else None, state=state)
            self._next_number = max(self._next_number, optuna_trial.number + 1)
            return optuna_trial.number
        trial = optuna.trial.create_trial(
            params=self._params(record.genotype),
            distributions=self.distributions,
            value=record.fitness if ok else None,
            state=state,
            user_attrs=attrs,
        )
        self.study.add_trial(trial)
        self._next_number += 1
        return self._next_number - 1

    def finished(self) -> list:
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        return [t for t in self.study.get_trials(deepcopy=False) if t.state in states]

    def abandon_running(self) -> list[dict]:
        """Trials left RUNNING by a killed run: marked failed, their parameters returned so the
        optimiser can evaluate them again."""
        import optuna

        params = []
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            self.study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted; re-queued on resume")
            params.append(dict(t.params))
        return params

    def best(self):
        complete = [t for t in self.finished() if t.value is not None]
        return max(complete, key=lambda t: t.value) if complete else None

    def genotype_of(self, trial) -> list[float]:
        return [float(trial.params[n]) for n in self.names]

    # -- files ------------------------------------------------------------------------------------

    def write_best_config(self, config: MergeConfig, fitness: float, metrics: dict, number: int) -> None:
        header = f"# best recipe so far: trial {number}, fitness {fitness:.6g}, metrics {json.dumps(metrics)}\n"
        path = self.root / "best_config.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(header + config.to_yaml())
        tmp.replace(path)

    @property
    def optimizer_checkpoint(self) -> Path:
        return self.root / "optimizer.pkl"

    def plot(self) -> Optional[Path]:
        """fitness.png: every evaluation's fitness and the best so far."""
        trials = sorted(self.finished(), key=lambda t: t.number)
        if not trials:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [t.number for t in trials if t.value is not None]
        ys = [t.value for t in trials if t.value is not None]
        best, running = [], -math.inf
        for y in ys:
            running = max(running, y)
            best.append(running)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.scatter(xs, ys, s=12, alpha=0.6, label="candidate")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        failed = [t.number for t in trials if t.value is None]
        if failed:
            ax.scatter(failed, [min(ys) if ys else 0] * len(failed), marker="x", color="k", label="failed")
        ax.set_xlabel("evaluation")
        ax.set_ylabel("fitness")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.root / "fitness.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
