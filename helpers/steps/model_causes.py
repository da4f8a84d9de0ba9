"""Is it the model? The model half of "why": the failure modes inside each confused pair, the concepts the
group's images are made of and how they split the margin, and whether these CAMs can be trusted for this data.
Each part is its own step module; this one runs them in order and gives the report one summary block and one
page section. The diagnosis reads them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from helpers.steps import cam_trust, model_concepts, model_modes
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.deep_dive import DeepDive


@dataclass(kw_only=True)
class ModelCauses(Section):
    title: str = "Is it the model?"
    trust: Optional[cam_trust.CamTrust] = None
    concepts: Optional[model_concepts.Concepts] = None
    modes: Optional[model_modes.FailureModes] = None
    seconds: dict = field(default_factory=dict)            # part -> seconds, beside the inference pass's

    @property
    def parts(self) -> list[Section]:
        return [p for p in (self.trust, self.modes, self.concepts) if p is not None]

    def show(self, names: Optional[list[str]] = None) -> None:
        for note in self.notes:
            print(note)
        for part in self.parts:
            part.show(names)


def model_causes(run: Run, conf: Confusion, deep: Optional[DeepDive] = None, data=None) -> ModelCauses:
    """The parts, each timed. `data`: the "Is it the data?" results, when that step ran."""
    sec = ModelCauses()
    start = time.perf_counter()
    sec.trust = cam_trust.cam_trust(run, conf)
    sec.seconds["trust"] = time.perf_counter() - start
    start = time.perf_counter()
    sec.modes = model_modes.failure_modes(run, conf, data)
    sec.seconds["modes"] = time.perf_counter() - start
    start = time.perf_counter()
    sec.concepts = model_concepts.concepts_step(run, conf, deep)
    sec.seconds["concepts"] = time.perf_counter() - start
    for part in sec.parts:
        sec.files += part.files
    return sec


def summary_lines(sec: ModelCauses) -> list[str]:
    """The block of analysis_summary.txt."""
    lines = ["", "IS IT THE MODEL?", "-" * 60]
    if sec.trust is not None:
        lines += cam_trust.summary_lines(sec.trust) + [""]
    if sec.modes is not None:
        lines += model_modes.summary_lines(sec.modes)
    if sec.concepts is not None:
        lines += [""] + model_concepts.summary_lines(sec.concepts)
    return lines


def index_section(run: Run, sec: ModelCauses) -> str:
    body = []
    if sec.trust is not None:
        body.append(cam_trust.index_section(run, sec.trust))
    if sec.modes is not None:
        body.append(model_modes.index_section(run, sec.modes))
    if sec.concepts is not None:
        body.append(model_concepts.index_section(run, sec.concepts))
    return "".join(body)
