"""scripts/bench_train.py's --profile table: every ATen op of a step, timed and counted."""
from __future__ import annotations

import re

import torch

from scripts.bench_train import profile


def test_profile_counts_each_op_of_a_step_and_totals_its_matmuls():
    a = torch.randn(64, 64, requires_grad=True)

    def step():  # by hand: mm once forward and twice backward (a is both operands), one relu
        (a @ a).relu().sum().backward()
    table = profile(step, 50)
    rows = {}
    for line in table.splitlines()[2:]:
        name, ms, calls = line.split()
        rows[name] = (float(ms), int(calls))
    assert rows["aten::mm"][1] == 3 and rows["aten::relu"][1] == 1 and rows["aten::threshold_backward"][1] == 1
    wall, ops, matmuls = map(float, re.match(r"one timed step ([\d.]+) s, its ops ([\d.]+) s, of which matmuls ([\d.]+) s",
                                             table).groups())
    assert matmuls <= ops <= wall + 0.01
    assert abs(matmuls * 1e3 - rows["aten::mm"][0]) <= 10  # the matmul total is the mm row (rounded to 10 ms)
