"""Coding jobs: the kind (`kind`), the coder loop (`agent`) and its tools (`tools`), the
fixed-format coder (`fixed`), and the workspace's checks and sandbox runs (`workspace`)."""

from agents.coding.agent import CODER_AGENT, AttemptOutput
from agents.coding.fixed import CODER, PLANNER, TESTER, CoderOutput, PlanNote, TestOutput
from agents.coding.kind import CandidateOutcome, Coding, CodingInput, CodingResult
from agents.coding.workspace import (
    SandboxRefused,
    check_path,
    check_tree,
    parse_files,
    render_files,
    unified_diff,
)

__all__ = ["CODER", "CODER_AGENT", "PLANNER", "TESTER", "AttemptOutput", "CandidateOutcome",
           "CoderOutput", "Coding", "CodingInput", "CodingResult", "PlanNote", "SandboxRefused",
           "TestOutput", "check_path", "check_tree", "parse_files", "render_files",
           "unified_diff"]
