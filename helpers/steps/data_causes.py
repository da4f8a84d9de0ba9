"""Is it the data? The data half of "why": human-validated wrong test labels, the kinds of image that go wrong,
and (opt-in) what the training set says, per confused pair. Each part is its own step module; this one runs
them in order and gives the report one summary block and one page section."""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Optional

from helpers.steps import data_labels, data_properties, data_train
from helpers.steps.confusion import Confusion
from helpers.steps.context import Run, Section
from helpers.steps.deep_dive import DeepDive


@dataclass(kw_only=True)
class DataCauses(Section):
    title: str = "Is it the data?"
    labels: Optional[data_labels.LabelEvidence] = None
    properties: Optional[data_properties.PropertySlices] = None
    train: Optional[data_train.TrainEvidence] = None       # None unless TRAIN_EVIDENCE or TRAIN_ROOT
    train_skipped: str = ""                                 # asked for but could not run: why
    seconds: dict = field(default_factory=dict)            # part -> seconds, beside the inference pass's

    @property
    def parts(self) -> list[Section]:
        return [p for p in (self.labels, self.properties, self.train) if p is not None]

    def show(self, names: Optional[list[str]] = None) -> None:
        for note in self.notes:
            print(note)
        for part in self.parts:
            part.show(names)


def data_causes(run: Run, conf: Confusion, deep: Optional[DeepDive] = None, test_pass_s: Optional[float] = None,
                train_pass: Optional[data_train.TrainPass] = None) -> DataCauses:
    """The three parts, each timed. The group (when the deep dive ran) is analysed beside the top pairs.
    `train_pass`: the training pass torchrun's ranks already shared (None: the training part runs its own)."""
    group = list(deep.group.group) if deep is not None else None
    sec = DataCauses()
    start = time.perf_counter()
    sec.labels = data_labels.label_evidence(run, conf, group)
    sec.seconds["labels"] = time.perf_counter() - start
    start = time.perf_counter()
    sec.properties = data_properties.property_slices(run, conf, group)
    sec.seconds["properties"] = time.perf_counter() - start
    start = time.perf_counter()
    sec.train, sec.train_skipped = data_train.train_evidence_or_reason(run, conf, test_pass_s, train_pass)
    sec.seconds["train"] = time.perf_counter() - start
    if sec.train_skipped:
        sec.notes.append(f"Training-set evidence was asked for but skipped: {sec.train_skipped}.")
    for part in sec.parts:
        sec.files += part.files
    return sec


def summary_lines(sec: DataCauses) -> list[str]:
    """The block of analysis_summary.txt."""
    lines = ["", "IS IT THE DATA?", "-" * 60]
    if sec.labels is not None:
        lines += data_labels.summary_lines(sec.labels)
    if sec.properties is not None:
        lines += [""] + data_properties.summary_lines(sec.properties)
    if sec.train is not None:
        lines += [""] + data_train.summary_lines(sec.train)
    elif sec.train_skipped:
        lines += ["", f"Training-set evidence: asked for but skipped: {sec.train_skipped}."]
    else:
        lines += ["", "Training-set evidence: off (TRAIN_EVIDENCE=True, or TRAIN_ROOT for image folders, turns it on)."]
    return lines


def index_section(run: Run, sec: DataCauses) -> str:
    """The page section: each part's fragment."""
    body = []
    if sec.labels is not None:
        body.append(data_labels.index_section(sec.labels))
    if sec.properties is not None:
        body.append(data_properties.index_section(run, sec.properties))
    if sec.train is not None:
        body.append(data_train.index_section(run, sec.train))
    elif sec.train_skipped:
        body.append(f'<p class="note">Training-set evidence was asked for but skipped: '
                    f"{html.escape(sec.train_skipped)}.</p>")
    else:
        body.append('<p class="note">Training-set evidence is off: <code>TRAIN_EVIDENCE=True</code> (or '
                    "<code>TRAIN_ROOT</code> for image folders) adds the nearest training images of each error, "
                    "ambiguous training images and near-duplicates of test images.</p>")
    return "".join(body)
