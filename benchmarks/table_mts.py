"""`multi_task_score` against eager PyTorch, a batched-experts eager model and torch.compile.

Issue 5 item 4: x ``[4096, 256]`` and a 200-row serving request; an MMoE with 8 experts
256 -> 128 -> 64 (ReLU), 3 tasks with softmax gates over all experts, towers 64 -> 32 -> 1,
sigmoid outputs. Every variant is timed in the same process at each thread count (median of
repeats, after warm-up), next to the machine's measured float32 matrix-multiply rate
(``torch.mm`` of 2048 x 2048) so GFLOP/s can be read as a fraction of what the machine does.

FLOPs counted: 2 per multiply-add of every matrix product (expert layers, gate logits, towers)
plus the mixtures (2 * T * E * H per row); bias, ReLU, softmax and sigmoid are not counted.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from mtkernels.ops import multi_task_score, pack_multi_task_params

D, E, H1, H2, T, G1 = 256, 8, 128, 64, 3, 32
SHAPES = (4096, 200)


class EagerMMoE(nn.Module):
    """MMoE as usually written: one nn.Sequential per expert, one gate and one tower per task."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, H1), nn.ReLU(), nn.Linear(H1, H2), nn.ReLU()) for _ in range(E)
        )
        self.gates = nn.ModuleList(nn.Linear(D, E) for _ in range(T))
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(H2, G1), nn.ReLU(), nn.Linear(G1, 1)) for _ in range(T))

    def forward(self, x):
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [M, E, H2]
        scores = []
        for gate, tower in zip(self.gates, self.towers):
            g = torch.softmax(gate(x), dim=-1).unsqueeze(1)  # [M, 1, E]
            scores.append(torch.sigmoid(tower(torch.bmm(g, experts).squeeze(1))))
        return torch.cat(scores, dim=1)

    def pack(self):
        return pack_multi_task_params(
            [[e[0], e[2]] for e in self.experts],
            list(self.gates),
            torch.ones(T, E, dtype=torch.bool),
            [[t[0], t[2]] for t in self.towers],
            ["sigmoid"] * T,
        )


class BatchedMMoE(nn.Module):
    """The same network with the 8 experts batched: one product for all first layers (and the
    gates), one bmm for the second layers, one bmm per tower layer over the tasks."""

    def __init__(self, model: EagerMMoE):
        super().__init__()
        with torch.no_grad():
            first = torch.cat([e[0].weight for e in model.experts] + [g.weight for g in model.gates])
            self.w1 = nn.Parameter(first.t().contiguous())  # [D, E*H1 + T*E]
            self.b1 = nn.Parameter(torch.cat([e[0].bias for e in model.experts] + [g.bias for g in model.gates]))
            self.w2 = nn.Parameter(torch.stack([e[2].weight.t() for e in model.experts]))  # [E, H1, H2]
            self.b2 = nn.Parameter(torch.stack([e[2].bias for e in model.experts]).unsqueeze(1))  # [E, 1, H2]
            self.t1 = nn.Parameter(torch.stack([t[0].weight.t() for t in model.towers]))  # [T, H2, G1]
            self.tb1 = nn.Parameter(torch.stack([t[0].bias for t in model.towers]).unsqueeze(1))
            self.t2 = nn.Parameter(torch.stack([t[2].weight.t() for t in model.towers]))  # [T, G1, 1]
            self.tb2 = nn.Parameter(torch.stack([t[2].bias for t in model.towers]).unsqueeze(1))

    def forward(self, x):
        first = torch.addmm(self.b1, x, self.w1)
        h1 = torch.relu(first[:, : E * H1]).view(-1, E, H1).transpose(0, 1)  # [E, M, H1]
        experts = torch.relu(torch.baddbmm(self.b2, h1, self.w2))  # [E, M, H2]
        gates = torch.softmax(first[:, E * H1 :].view(-1, T, E), dim=-1)  # [M, T, E]
        mixture = torch.einsum("mte,emh->tmh", gates, experts)  # [T, M, H2]
        h = torch.relu(torch.baddbmm(self.tb1, mixture, self.t1))
        return torch.sigmoid(torch.baddbmm(self.tb2, h, self.t2)).squeeze(-1).t()


def flops(rows: int) -> int:
    per_row = D * E * H1 + E * H1 * H2 + D * T * E + T * E * H2 + T * (H2 * G1 + G1)
    return 2 * rows * per_row


def _median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall-clock seconds and median process CPU seconds of fn() over `repeats` calls.

    CPU time (all threads of the process) is reported beside wall time because a shared machine
    makes the wall time include waits for other processes; at 2 threads it also counts spinning.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return statistics.median(wall), statistics.median(cpu)


def _compile(model, x):
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)  # compile outside the timing
        return compiled, None
    except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def run(threads: list[int], quick: bool) -> str:
    torch.manual_seed(0)
    model = EagerMMoE().eval()
    batched = BatchedMMoE(model).eval()
    params = model.pack()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    lines = [
        "### multi_task_score: MMoE, 8 experts 256->128->64, 3 tasks, towers 64->32->1 (float32, CPU)",
        "",
        "| threads | rows | variant | median ms | GFLOP/s | % of mm rate | speed-up vs eager "
        "| median CPU ms | CPU-time speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    previous = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            mm_s, mm_cpu = _median_seconds(lambda: torch.mm(a, b), repeats=3 if quick else 10)
            mm_rate = 2 * 2048**3 / mm_s / 1e9
            lines.append(
                f"| {n} | - | torch.mm 2048x2048 | {mm_s * 1e3:.2f} | {mm_rate:.1f} | 100% | - | {mm_cpu * 1e3:.2f} | - |"
            )
            for rows in SHAPES:
                x = torch.randn(rows, D)
                with torch.no_grad():
                    expected = model(x)
                    torch.testing.assert_close(multi_task_score(x, params), expected, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(batched(x), expected, rtol=1e-4, atol=1e-5)
                variants = {
                    "eager (nn.Linear per expert)": lambda: model(x),
                    "eager, experts batched (addmm + bmm)": lambda: batched(x),
                }
                if quick:
                    notes.append("torch.compile not run in --quick mode")
                else:
                    compiled, error = _compile(model, x)
                    if compiled is not None:
                        variants["torch.compile(eager)"] = lambda: compiled(x)
                    else:
                        notes.append(f"torch.compile failed at {n} threads, {rows} rows: {error}")
                variants["mtkernels multi_task_score"] = lambda: multi_task_score(x, params)
                repeats = (5 if rows > 1000 else 30) if quick else (15 if rows > 1000 else 200)
                times = {}
                with torch.no_grad():
                    for name, fn in variants.items():
                        times[name] = _median_seconds(fn, repeats)
                eager_s, eager_cpu = times["eager (nn.Linear per expert)"]
                for name, (seconds, cpu) in times.items():
                    rate = flops(rows) / seconds / 1e9
                    lines.append(
                        f"| {n} | {rows} | {name} | {seconds * 1e3:.3f} | {rate:.1f} | "
                        f"{100 * rate / mm_rate:.0f}% | {eager_s / seconds:.2f}x | {cpu * 1e3:.3f} | "
                        f"{eager_cpu / cpu:.2f}x |"
                    )
    finally:
        torch.set_num_threads(previous)
    lines.append("")
    lines.append(f"FLOPs per row: {flops(1):,} (matrix products and mixtures).")
    load = os.getloadavg()
    lines.append(f"Load average during the run: {load[0]:.1f} (1 min), {load[2]:.1f} (15 min) on {os.cpu_count()} cores.")
    for note in dict.fromkeys(notes):
        lines.append(f"Note: {note}.")
    return "\n".join(lines)
