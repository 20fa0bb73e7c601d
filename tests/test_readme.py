"""The README's kernel quickstart runs as written, and its merge example is exact."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F


def test_quickstart_runs_and_merge_is_exact():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102  (our own README)
    q, k, v, out = scope["q"], scope["k"], scope["v"], scope["out"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)


def test_documented_commands_parse():
    """Every `vzoo ...` command the README shows (code blocks and inline) is accepted by the parser as written."""
    import shlex

    from vzoo.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`(vzoo [^`]* --[^`]*)`", text)  # inline commands (not mere mentions such as `vzoo list`)
    commands = []
    for line in lines:
        command = line[line.find("vzoo ") :] if "vzoo " in line and "..." not in line else ""
        if command.startswith("vzoo ") and " | " not in command and "--help" not in command:
            commands.append(re.sub(r"(\w+)(\|\w+)+", r"\1", command.replace("[", "").replace("]", "")))  # a|b|c: a
    assert len(commands) >= 8 and any(c.startswith("vzoo train reid") for c in commands)
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # a rejected command exits here
        assert callable(args.func), command
