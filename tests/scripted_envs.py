"""Environments for tests that must not depend on what a random-weight model writes: they
always answer with an observation until the last turn, then score the final text. Addressed as
"scripted_envs:Relay" (tests/ is on the path of pytest and, through PYTHONPATH, of Ray workers)."""
from __future__ import annotations

from actors.environments import Environment, StepResult


class Relay(Environment):
    """Each turn but the last gets a tool observation; the final reward is the parity of the last
    turn's text length (so a group's rewards vary and the update has a signal)."""

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["question"]}]

    def step(self, assistant_text: str) -> StepResult:
        if not self.last_turn:
            return StepResult.observe(f"tool says: turn {self.turn} done, {len(assistant_text)} characters",
                                      role="tool", tool="relay")
        return StepResult.final(float(len(assistant_text) % 2))
