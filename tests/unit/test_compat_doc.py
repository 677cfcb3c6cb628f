"""docs/compatibility.md's Megatron-LM loss table and command are the output of tools/compat_losses.py.

Without Megatron-LM (here): the command block is exactly the one the script runs, and every run the
script defines has a row of 8 numbers. With ``MEGATRON_LM_PATH`` the Megatron-LM tier reruns the
command and compares the numbers too (``tests/megatron_lm/test_pretrain_gpt.py``).
"""
from __future__ import annotations

import re

from megatron_md.testing.tools import load_tool


def test_command_block_is_the_scripts():
    tool = load_tool("compat_losses")
    doc = tool.DOC.read_text()
    a, b = tool._between(doc, tool.CMD_BEGIN, tool.CMD_END)
    assert doc[a:b].strip() == tool.command_text()


def test_every_run_has_a_generated_row():
    tool = load_tool("compat_losses")
    doc = tool.DOC.read_text()
    a, b = tool._between(doc, tool.BEGIN, tool.END)
    rows = doc[a:b].strip().splitlines()
    assert "\n".join(rows[:2]) == tool.HEADER
    for label, _ in tool.ROWS:
        mine = [r for r in rows[2:] if r.startswith(f"| {label}, megatron-core ")]
        assert mine, label
        for r in mine:
            assert len(re.findall(r"\| \d+\.\d{3} ", r + " ")) == 8, r


def test_render_replaces_only_this_versions_rows():
    tool = load_tool("compat_losses")
    doc = f"x\n{tool.BEGIN}\n{tool.HEADER}\n| old, megatron-core 9.9 | 1 |\n| a, megatron-core 0.1 | 2 |\n{tool.END}\n" \
          f"{tool.CMD_BEGIN}\nold\n{tool.CMD_END}\n"
    rows = {label: ["1.000"] * 8 for label, _ in tool.ROWS}
    out = tool.render(doc, rows, "megatron-core 0.1")
    assert "| old, megatron-core 9.9 | 1 |" in out and "| a, megatron-core 0.1 | 2 |" not in out
    assert out.count("megatron-core 0.1 |") == len(tool.ROWS)
    assert tool.command_text() in out and "\nold\n" not in out
