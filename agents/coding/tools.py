"""The coder's tools over the job's workspace: list, read and write files, run the tests or a
command in the sandbox.

The workspace is the step's own mapping of files (`CodeEnv.files`), made from where the step
starts (the job's input, or the files the previous round left) and changed only by
`write_file`. Commands run in a throwaway sandbox made from it (what they write is not kept),
so a step run again replays its model calls from the ledger and, with them, rebuilds the very
same workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from agents.base import StepContext
from agents.coding.workspace import (
    MAX_FILE_BYTES,
    CommandRun,
    check_path,
    check_sizes,
    check_tree,
    run_command,
    steady,
)
from agents.tools import Tool, ToolError

# Characters of a file one read shows, and of a command's output (its end) one run shows.
READ_CHARS = 4000
OUTPUT_CHARS = 2400


@dataclass
class CodeEnv:
    """What the coding tools work with: the step's context, the workspace, the test command
    and the last test run (of the files as they are now, or None once a file changed)."""

    ctx: StepContext
    files: dict[str, str]
    test_command: str
    tested: CommandRun | None = None
    last_run: CommandRun | None = None  # of any files, for the step's output
    test_runs: int = 0
    written: list[str] = field(default_factory=list)


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="A file's path, as listed.")
    offset: int = Field(default=0, ge=0, le=MAX_FILE_BYTES,
                        description="Where to start, in characters.")


class WriteArgs(BaseModel):
    # No length bounds in the schema (a constrained decoder compiles each into its grammar);
    # `write_file` checks the path and the sizes.
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="The file's path inside the repository "
                                                 "(new or existing).")
    content: str = Field(description="The whole new file.")


class CommandArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=500, description="A shell command.")


def list_files(env: CodeEnv, args: NoArgs) -> str:
    if not env.files:
        return "The repository is empty."
    return "\n".join(f"{path} ({len(body.encode('utf-8'))} bytes)"
                     for path, body in sorted(env.files.items()))


def read_file(env: CodeEnv, args: ReadArgs) -> str:
    body = env.files.get(args.path.strip())
    if body is None:
        raise ToolError(f"there is no file {args.path[:200]!r}; list_files shows them")
    if args.offset and args.offset >= len(body):
        raise ToolError(f"{args.path} has {len(body)} characters; offset {args.offset} is "
                        "past its end")
    end = min(len(body), args.offset + READ_CHARS)
    more = f" Read on with offset {end}." if end < len(body) else ""
    return (f"{args.path}, characters {args.offset} to {end} of {len(body)}.{more}\n"
            f"{body[args.offset:end]}")


def write_file(env: CodeEnv, args: WriteArgs) -> str:
    try:
        path = check_path(args.path)
        after = {**env.files, path: args.content}
        check_tree(after)
        check_sizes(after)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc
    if env.files.get(path) == args.content:
        return f"{path} already holds exactly that."
    env.files = after
    env.tested = None
    env.written.append(path)
    return f"Wrote {path} ({len(args.content.encode('utf-8'))} bytes)."


def show(ran: CommandRun, what: str) -> str:
    if ran.timed_out:
        head = f"{what} ran past the time limit and was stopped."
    elif ran.limit:
        head = f"{what} was stopped: it passed the {ran.limit} limit."
    else:
        head = f"{what} exited with code {ran.exit_code}."
    report = steady(ran.report)
    if len(report) > OUTPUT_CHARS:
        report = "[earlier output cut]\n" + report[-OUTPUT_CHARS:]
    return f"{head}\n{report}"


def check_workspace(env: CodeEnv) -> CommandRun:
    """Run the job's test command over the workspace as it is (no model call)."""
    ran = run_command(env.ctx, env.files, env.test_command)
    env.tested = env.last_run = ran
    env.test_runs += 1
    return ran


def run_tests(env: CodeEnv, args: NoArgs) -> str:
    ran = check_workspace(env)
    head = "All tests pass." if ran.passed else "The tests fail."
    return f"{head} {show(ran, 'The test command')}"


def run_any(env: CodeEnv, args: CommandArgs) -> str:
    return show(run_command(env.ctx, env.files, args.command), "The command")


LIST_FILES = Tool("list_files", "List the repository's files.", NoArgs, list_files)
READ_FILE = Tool("read_file", "Read a file of the repository.", ReadArgs, read_file)
WRITE_FILE = Tool("write_file", "Write a whole file (it replaces the file's content).",
                  WriteArgs, write_file)
RUN_TESTS = Tool("run_tests", "Run the repository's tests in the sandbox; shows the end of "
                 "their output.", NoArgs, run_tests)
RUN_COMMAND = Tool("run_command", "Run a shell command over the repository in the sandbox "
                   "(no network; files it writes are not kept).", CommandArgs, run_any)
CODING_TOOLS = (LIST_FILES, READ_FILE, WRITE_FILE, RUN_TESTS, RUN_COMMAND)
