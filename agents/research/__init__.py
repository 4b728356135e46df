"""Research jobs: plan into sub-questions, investigate each in parallel, synthesise a brief.

Over a corpus, investigators are agent loops (`agents.research.investigator`) that search, read
and answer sentence by sentence, each sentence with the passages it rests on (structured output,
then checked and, where needed, attributed by the words it shares with the passages:
`agents.research.brief`); the brief is rendered from that structure with `[n]` markers, and a
verifier checks every citation. `effort` sets the number of sub-questions, each investigator's
turns and step budget and, at `high` and `max`, a gap analysis that adds follow-up
investigators and a critique-and-revise pass (`EFFORTS`). An `output_schema` adds a last step
that extracts an object valid against it (`agents.research.extract`).

Prompts are laid out prefix-stable: the shared part (instructions and the question) comes first
and the per-step part last, so the model server's prefix cache serves a job's sub-agents.
"""

from agents.research.kind import Research
from agents.research.models import (
    CRITIC,
    EFFORTS,
    EXTRACTOR,
    GAP_ANALYST,
    INVESTIGATOR,
    PLANNER,
    REVISER,
    SYNTHESISER,
    VERIFIER,
    EffortLevel,
    InvestigationOutput,
    PlanOutput,
    ResearchInput,
    ResearchResult,
    SynthesisOutput,
)
from agents.research.plan import fallback_plan, parse_plan, plan_prompt, plan_regex
from agents.research.synthesis import SYNTHESIS_CUE

__all__ = ["CRITIC", "EFFORTS", "EXTRACTOR", "GAP_ANALYST", "INVESTIGATOR", "PLANNER", "REVISER",
           "SYNTHESISER", "SYNTHESIS_CUE", "VERIFIER", "EffortLevel", "InvestigationOutput",
           "PlanOutput", "Research", "ResearchInput", "ResearchResult", "SynthesisOutput",
           "fallback_plan", "parse_plan", "plan_prompt", "plan_regex"]
