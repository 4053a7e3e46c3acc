"""The tool-call text format the project reads and writes (Hermes / Qwen style), one place for the
serving endpoint (cluster/serve_tools.py) and the agentic environments (actors/env_tools.py):

    <tool_call>{"name": "calculate", "arguments": {"expression": "2 + 3"}}</tool_call>

`tool_call_blocks(text)` finds the JSON bodies of every block (a last block may lack its closing
tag: generation stopped on it or ran out of tokens); what a body must hold is each caller's rule.
"""
from __future__ import annotations

import json
import re

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
BLOCK_RE = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|\Z)", re.DOTALL)


def tool_call_blocks(text: str) -> list[re.Match]:
    """Every <tool_call> block of `text`, in order (group(1): its body)."""
    return list(BLOCK_RE.finditer(text))


def format_tool_call(name: str, arguments: dict, newlines: bool = False) -> str:
    """One block; `newlines` puts the JSON on its own line (as chat templates write it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}" if newlines else f"{TOOL_OPEN}{body}{TOOL_CLOSE}"
