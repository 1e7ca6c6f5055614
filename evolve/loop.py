"""The search loop: ask -> evaluate -> tell, with a journal that makes resume exact.

Pure: no Ray, no Optuna, no files, no printing. It takes
- an `Optimizer` (evolve.optimizers),
- a `Runner` that evaluates candidates (the Ray pool in a search, a fake in unit tests),
- a `Recorder` that keeps the journal (the experiment store in a search, a list in unit tests).

Candidates are numbered in the order they are asked. The journal holds, per candidate, its
proposal, how many results had been told to the optimiser when it was asked (`told_before`) and,
once finished, its outcome and its place in the order of tells (`tell_order`). That is the exact
interleaving of asks and tells the optimiser saw, so `resume()` rebuilds the optimiser by
replaying it from the start, whatever the timing of the workers was. No optimiser state is ever
saved (evolve.optimizers): the journal is plain data, and the only thing a resume reads. The
recorder writes journal entries in the order it receives them; a lost tail of the journal is work
that is simply done again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol, Sequence

from evaluators import Status
from evaluators.descent import DescentResult

from .optimizers import Optimizer, Proposal, Result


@dataclass(frozen=True)
class Candidate:
    number: int
    proposal: Proposal
    told_before: int  # results told to the optimiser when this candidate was asked

    @property
    def genotype(self) -> tuple[float, ...]:
        return self.proposal.genotype


@dataclass
class Outcome:
    status: Status  # COMPLETE, FAILED or STOPPED (racing: scored on some stages' items only)
    fitness: Optional[float]  # for STOPPED: the paired estimate from the items scored (evaluators.racing)
    metrics: dict = field(default_factory=dict)
    error: Optional[str] = None
    timings: dict = field(default_factory=dict)  # merge_s, eval_s, total_s
    attempts: int = 1  # evaluations started for this candidate (> 1: retried after a worker died)
    recipe_hash: Optional[str] = None
    worker: Optional[str] = None  # which worker produced the result (host:pid@node)
    objectives: tuple[float, ...] = ()  # multi-objective searches, each maximised
    violation: float = 0.0  # > 0: infeasible (constraints), scores kept
    items: int = 0  # evaluated items (documents) this candidate cost
    reused_from: Optional[int] = None  # an identical recipe's candidate whose scores were reused
    # racing: per-item values in stage order (task -> values; stopped: the items scored, complete:
    # every stage but the last), the best candidate it was raced against (a stopped one's
    # estimate is relative to it) and the stage after which a stopped one stopped (1-based)
    first_items: Optional[dict] = None
    paired_with: Optional[int] = None
    stage: Optional[int] = None
    # a complete candidate's per-item values (result key -> values, in the evaluator's item
    # order), where every metric is a mean over items: what the export's paired rule reads
    item_values: Optional[dict] = None
    # attempts lost to a worker fault, in order ("memory": ran out of memory, "died"): evolve.pool
    faults: tuple[str, ...] = ()
    # a gradient search's candidate: where the worker's steps after scoring it ended
    # (evaluators.descent.DescentResult.to_plain; what the optimiser is told, and resume replays)
    descent: Optional[dict] = None

    def __post_init__(self):
        self.status = Status(self.status)  # the study and the workers hand it over as a string

    def result(self) -> Result:
        """What the optimiser is told (the same live and when a resume replays the journal)."""
        fitness = self.fitness if self.status.scored else None
        descent = DescentResult.from_plain(self.descent) if self.descent is not None else None
        return Result(fitness, tuple(self.objectives), self.violation, self.status == Status.STOPPED, descent)


@dataclass
class JournalEntry:
    """One candidate as the journal holds it."""

    candidate: Candidate
    outcome: Optional[Outcome] = None  # None: asked, never finished
    tell_order: Optional[int] = None


@dataclass
class LoopState:
    asked: int = 0  # candidates asked so far (= the next candidate's number)
    told: int = 0  # results told so far
    pending: dict[int, Candidate] = field(default_factory=dict)  # asked, not yet told


class Runner(Protocol):
    capacity: int  # candidates it can evaluate at once

    def submit(self, candidate: Candidate) -> None: ...

    def wait(self) -> list[tuple[Candidate, Outcome]]:
        """Block until at least one submitted candidate has finished; return those finished."""


class Recorder(Protocol):
    def asked(self, candidate: Candidate) -> None: ...

    def told(self, candidate: Candidate, outcome: Outcome, tell_order: int) -> None: ...


class JournalMismatch(Exception):
    """The optimiser does not re-propose what the journal recorded (a changed config or version)."""


def resume(optimizer: Optimizer, journal: Sequence[JournalEntry]) -> LoopState:
    """Bring a freshly built optimiser to the state it had at the end of the journal: asks re-asked
    (and checked against the journal), tells re-told with the recorded outcomes, in their order."""
    state = LoopState()
    entries = {e.candidate.number: e for e in journal}
    tells = sorted((e for e in journal if e.tell_order is not None and e.tell_order >= state.told),
                   key=lambda e: e.tell_order)
    while True:
        entry = entries.get(state.asked)
        if entry is not None and entry.candidate.told_before <= state.told:
            proposal = optimizer.ask()
            if proposal is None or proposal.genotype != entry.candidate.genotype:
                raise JournalMismatch(
                    f"candidate {state.asked}: the optimizer proposes {proposal and proposal.genotype} where the "
                    f"journal holds {entry.candidate.genotype}"
                )
            state.pending[state.asked] = Candidate(state.asked, proposal, state.told)
            state.asked += 1
        elif tells and tells[0].tell_order == state.told and tells[0].candidate.number in state.pending:
            entry = tells.pop(0)
            optimizer.tell(state.pending.pop(entry.candidate.number).proposal, entry.outcome.result())
            state.told += 1
        else:
            return state


def run_loop(
    optimizer: Optimizer,
    runner: Runner,
    recorder: Recorder,
    budget: int,
    state: Optional[LoopState] = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_outcome: Callable[[Candidate, Outcome], None] = lambda c, o: None,
) -> LoopState:
    """Evaluate candidates until `budget` candidates have been asked and told, or `should_stop()`.

    A stop asks no new candidate but lets those running finish and records them. Candidates still
    pending in `state` (asked before a stop) are evaluated first. A worker is never left waiting
    for a generation: the optimiser is asked whenever the runner has room."""
    state = state or LoopState()
    running = set()
    for candidate in state.pending.values():
        runner.submit(candidate)
        running.add(candidate.number)
    while True:
        stopping = should_stop()
        while not stopping and state.asked < budget and len(running) < runner.capacity:
            proposal = optimizer.ask()
            if proposal is None:
                break  # a generation barrier: wait for results
            candidate = Candidate(state.asked, proposal, state.told)
            state.asked += 1
            state.pending[candidate.number] = candidate
            recorder.asked(candidate)
            runner.submit(candidate)
            running.add(candidate.number)
        if not running:
            return state
        for candidate, outcome in runner.wait():
            running.discard(candidate.number)
            del state.pending[candidate.number]
            optimizer.tell(candidate.proposal, outcome.result())
            recorder.told(candidate, outcome, state.told)
            state.told += 1
            on_outcome(candidate, outcome)


def outcomes_in_order(journal: Iterable[JournalEntry]) -> list[tuple[int, Optional[float]]]:
    """(number, fitness) of every finished candidate, by number: what two runs are compared on."""
    return sorted((e.candidate.number, e.outcome.fitness) for e in journal if e.outcome is not None)
