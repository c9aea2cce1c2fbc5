"""What the retraining pipeline's steps hand each other (``components.training.pipeline``): one typed record per
boundary, serialised with ``to_dict`` for XCom, Kubeflow and `tandem train --json`, rebuilt with ``from_dict``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from components.records import Record
from components.training.gate import GateResult
from components.training.lora import TrainResult
from components.training.promotion import PromotionResult


@dataclass
class DataCheck(Record):
    """How much of an alias's data is new beyond its champion's, and whether that is enough to train."""

    alias: str
    data: str  # where the examples came from: a path or URL, or the intake snapshot's name
    dataset_version: str
    snapshot: dict[str, Any] | None  # the intake snapshot's lineage; None for data read from a path
    examples: int
    duplicates: int
    bad_lines: int
    problems: list[str]
    new_examples: int
    champion_version: int | None
    should_train: bool
    reason: str
    heldout: dict[str, Any] | None = None  # the held-out set drawn anew just before (`tandem train --new-heldout`)


@dataclass
class TrainedCandidate(Record):
    """One finished training run: the trainer's result and the lineage of what it was trained on."""

    run_id: str
    alias: str
    data: str
    dataset_version: str
    dataset_size: int
    snapshot: dict[str, Any] | None
    n_test: int  # questions in the alias's held-out set, which the gate asks
    heldout: dict[str, Any]
    contaminated: list[str]  # examples dropped because the gate asks them
    rendering: dict[str, Any]  # how examples were rendered into the serving prompt (the manifest keeps them)
    replay: dict[str, Any] | None
    run: TrainResult
    sweep: list[dict[str, Any]] = field(default_factory=list)  # every point of the sweep, set by pick_best


@dataclass
class RegisteredCandidate(Record):
    """A trained adapter published to the store and recorded as a candidate version."""

    alias: str
    version: int
    served_name: str
    artifact_uri: str


@dataclass
class GatedCandidate(Record):
    """A candidate and the gate's verdict on it (the DAG's hand-over from the gate to the decision)."""

    candidate: RegisteredCandidate
    gate: GateResult


@dataclass
class Decision(Record):
    """Whether a gated candidate was promoted, why, and the promotion when there was one."""

    alias: str
    version: int
    promoted: bool
    reason: str
    promotion: PromotionResult | None = None


@dataclass
class RetrainResult(Record):
    """The whole pipeline in one process (`tandem train`); only ``check`` when there was nothing to train."""

    check: DataCheck
    trained: bool
    training: TrainedCandidate | None = None
    candidate: RegisteredCandidate | None = None
    gate: GateResult | None = None
    decision: Decision | None = None

    @property
    def promoted(self) -> bool:
        return self.decision is not None and self.decision.promoted
