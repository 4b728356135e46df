"""The bench's fixtures: a corpus of invented facts with questions about it, and small coding
tasks with their tests (both under `bench/fixtures/`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CORPUS_DIR = FIXTURES / "quality" / "documents"
QUESTIONS_FILE = FIXTURES / "quality" / "questions.json"
CODING_DIR = FIXTURES / "coding"


@dataclass(frozen=True)
class Fact:
    """One expected fact: a name for the table and a case-insensitive regex that finds it in
    the text with its runs of whitespace made single spaces."""

    name: str
    pattern: str

    def found_in(self, text: str) -> bool:
        return re.search(self.pattern, " ".join(text.split()), re.IGNORECASE) is not None


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    facts: tuple[Fact, ...]
    documents: tuple[str, ...]  # file names of the documents that hold the facts


@dataclass(frozen=True)
class CodingTask:
    name: str
    task: str
    test_command: str
    files: dict[str, str]


def corpus_documents(directory: Path = CORPUS_DIR) -> dict[str, str]:
    """File name -> text of every document of the corpus, in name order."""
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()}


def questions(path: Path = QUESTIONS_FILE) -> list[Question]:
    raw = json.loads(path.read_text())
    return [Question(id=q["id"], question=q["question"],
                     facts=tuple(Fact(f["name"], f["pattern"]) for f in q["facts"]),
                     documents=tuple(q["documents"])) for q in raw]


def coding_tasks(directory: Path = CODING_DIR) -> list[CodingTask]:
    tasks = []
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        meta = json.loads((folder / "task.json").read_text())
        root = folder / "files"
        files = {str(f.relative_to(root)): f.read_text()
                 for f in sorted(root.rglob("*")) if f.is_file()}
        tasks.append(CodingTask(name=folder.name, task=meta["task"],
                                test_command=meta["test_command"], files=files))
    return tasks
