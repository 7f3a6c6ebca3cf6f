"""Step time of DP-SGD (Opacus) against plain SGD, for every registered task model.

Value: the median wall time of one DP-SGD step (forward, backward with Opacus's
per-sample gradients, per-sample clipping, Gaussian noise, Adam step) at batch
16, through ``medfed.tasks.dp.make_private`` (the path ``dp_train`` uses), with the
noise a site draws (``medfed.tasks.dp_noise.SecureRandom``: ChaCha20, float64).
Anchor: the median time of one plain step, same model (same initial weights),
same batch, same optimizer (Adam, as ``engine.train``). Ratio = value / anchor;
the target is <= 1.4.

Method: ``torch.set_num_threads(2)``; one batch of 16 built from
``task.load_site_data(DataSourceConfig(num_samples=32))`` (samples repeated when
the split is smaller); warm-up steps, then plain and DP steps ALTERNATE so that
load from other processes hits both alike; the median of N each.

Modes (``--modes auto,rules,vmap,hooks,functorch``; the BENCH lines use the first;
``auto`` is what ``dp_train`` picks, ``dp_modes.choose_grad_sample_mode``: the faster of
``rules`` and ``vmap`` on the first batch, timed there): ``rules`` is one
activation-only backward and a per-sample rule per layer (``medfed.tasks.dp_rules``),
``vmap`` one ``torch.func.vmap(grad)`` over the whole model
(``medfed.tasks.dp_vmap``); in both Opacus runs in ``no_op`` mode and clips, noises
and accounts, through ``medfed.tasks.dp_optimizer`` (Opacus's ``DPOptimizer`` with
its per-tensor loop batched). ``hooks`` is Opacus's default; ``functorch`` is
Opacus's per-layer vmap.
Each task is measured in a process of its own (since 2026-12-07), which keeps freed heap
memory (``medfed.core.heap``, as a site's worker does; plain and DP steps run in it
alike). A DP step frees and remakes its per-sample gradients (360 MB for the 3D
SegResNet), and glibc may hand such blocks back to the kernel and fault them in again:
80-120 k page faults per 3D DP step where that happened, none in the plain step. In one
process after the 2D tasks the 3D step measured 1.61-1.74 (with and without the heap
setting); alone in a fresh process 1.13-1.29 (2026-12-07). A site's worker serves its
runs' tasks for weeks, not this sequence of five; what a long-lived process that
alternates 2D and 3D tasks pays is not measured here.
The machine's load moves single ratios by about +-0.05 between runs. Tried and
dropped: ``ew`` (PyTorch expanded weights: fails on MONAI's PReLU and DenseNet) and
``ghost`` (fast gradient clipping: two backward passes, slower on CPU per the
issue's anchor; medfed's make_private refuses it).
See the docstring of ``medfed.tasks.dp`` for the findings.

Second figure per task, the whole round (``--rounds`` N, default 7; 0 skips it):
value is the median wall time of one ``dp.dp_train`` call of one epoch, as a site's
DP round runs it (``make_private``, Poisson sampling and noise from a fresh
``SecureRandom``, the per-sample mode the process chose, the RDP accountant, removing
Opacus's hooks); anchor the median of one ``engine.train`` epoch, the plain round,
same data (``num_samples`` 32, batch 16: the same expected number of steps), same
initial weights, same learning rate. The model is built outside the timer (a site
keeps it); one warm-up round of each, then DP and plain rounds alternate. The first
DP round of a process also times the per-sample modes (once per task): printed
beside, as "first DP round", not in the median. Then ``--warm-rounds`` (default 10)
more rounds of each, also beside (their DP median printed), before the timed ones:
Poisson batches vary in size, and torch's CPU convolutions cost about twice as much
the first time a process meets a batch shape; a site's warm worker
(``client/worker.py``), which lives across rounds, pays that once per shape, while this
2-step round would pay it in most early rounds (tiny-seg 2026-12-07: DP rounds 1-20 at
14-26 ms, then 13-15 ms, against 10-11 ms plain). Warm-up added 2026-12-07 (before:
1 round each, 5 timed). Timed rounds: ``--rounds`` at least, and for short rounds as
many as fill ``TIMED_SECONDS`` (5 s) of plain and DP rounds, up to 101: tiny-seg gets
101, brain-lesion-cls about 60, the UNets 7 (added 2026-12-07: tiny-seg's 7-round
median had read 1.30-1.43 in six runs and 2.02 in one). Target <= 1.6 (issue 23).

Tasks: by default every registered task except the padded transport models
(``tiny-seg-1m``, ``-10m``, ``-50m``; ``--tasks`` measures them on request). Those are
tiny-seg's compute with 1-50 M extra values whose plain step is one pass over them,
while DP-SGD must form, clip and noise a per-sample gradient of every value: their
ratio measures per-parameter DP costs against a model that has almost no compute (2.9,
9.5 and 1.34 on the step, 2.7, 6.8 and 6.3 on the round, 2026-12-06), not the DP cost
of a real model of that size. Excluded since 2026-12-07 (a change of the default
workload; the issue's targets are read on the task models).

    python benchmarks/dp_overhead.py [--steps 30] [--rounds 7] [--warm-rounds 10]
                                     [--tasks tiny-seg,...] [--modes hooks]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from medfed.core import heap
from medfed.core.config import DataSourceConfig
from medfed.tasks import TASKS, Task, dp, dp_validation, engine
from medfed.tasks.dp_noise import SecureRandom
from medfed.tasks.optimizers import adam
from medfed.tasks.tiny_seg import PADDED_TASKS

BATCH = 16
#: Timed rounds of each kind: at least ``--rounds``, more for short rounds, up to this
#: many seconds of them (and at most MAX_ROUNDS).
TIMED_SECONDS = 5.0
MAX_ROUNDS = 101


def one_batch(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 16 from the task's own synthetic data."""
    data = task.load_site_data(DataSourceConfig(num_samples=32)).train
    pairs = [data[i % len(data)] for i in range(BATCH)]  # type: ignore[arg-type]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def plain_step(task: Task, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One plain Adam step of a fresh model (the anchor)."""
    torch.manual_seed(0)
    model, loss_fn = task.build_model().train(), task.build_loss()
    dp_validation.disable_inplace(model)  # same module graph as the DP model
    opt = adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def dp_step(
    task: Task, x: torch.Tensor, y: torch.Tensor, mode: str
) -> tuple[Callable[[], None], str]:
    """One DP-SGD step of the same fresh model through ``dp.make_private`` (as dp_train)."""
    torch.manual_seed(0)
    model, loss_fn = task.build_model().train(), task.build_loss()
    opt = adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    private = dp.make_private(
        model,
        opt,
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=None if mode == "auto" else mode,
        loss_fn=loss_fn,
        noise_generator=torch.Generator().manual_seed(0),
        randomness=SecureRandom(),
    )
    return lambda: private.step(loss_fn, x, y), private.mode


def measure(
    plain: Callable[[], None], private: Callable[[], None], steps: int
) -> tuple[float, float]:
    """Median seconds of a plain and a DP step, measured alternately after warm-up."""
    for _ in range(3):
        plain()
        private()
    a, b = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        plain()
        t1 = time.perf_counter()
        private()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a), statistics.median(b)


def round_times(task: Task, rounds: int, warm: int) -> tuple[float, float, float, float]:
    """Median seconds: a plain and a DP round, the first DP round, the warm-up DP rounds.

    The first DP round includes the once-per-process per-sample mode probe. The ``warm``
    warm-up rounds of each kind let torch meet the batch shapes: a DP round's Poisson
    batches have a new size now and then (a plain round's never do), and torch's CPU
    convolutions cost about twice as much the first time a process meets a shape (a
    3x3 conv on 8 channels, 2026-12-07: 2.1-4.3 ms the first time, 0.9-1.6 ms after). A
    site's daemon meets each shape once; this 2-step round would meet new ones often.
    """
    data = task.load_site_data(DataSourceConfig(num_samples=32)).train
    lr, cpu = task.defaults.learning_rate, torch.device("cpu")

    def one(private: bool) -> float:
        torch.manual_seed(0)
        model = task.build_model()
        t0 = time.perf_counter()
        if private:
            dp.dp_train(
                task,
                model,
                data,
                epochs=1,
                batch_size=BATCH,
                learning_rate=lr,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                device=cpu,
            )
        else:
            engine.train(
                task,
                model,
                data,
                epochs=1,
                batch_size=BATCH,
                learning_rate=lr,
                device=cpu,
                generator=torch.Generator().manual_seed(0),
            )
        return time.perf_counter() - t0

    one(False)  # warm-up
    first = one(True)  # warm-up that also fixes the process's per-sample mode
    cold, cold_plain = [], []
    for _ in range(warm):  # the same number of warm-up rounds for both
        cold_plain.append(one(False))
        cold.append(one(True))
    # short rounds are many more per median, up to TIMED_SECONDS of them: a 2-step round
    # of tiny-seg lasts 11-25 ms, and one burst of load moved a 7-round median by 40%
    pair = statistics.median(cold or [first]) + statistics.median(cold_plain or [first])
    timed = max(rounds, min(MAX_ROUNDS, int(TIMED_SECONDS / pair)))
    a, b = [], []
    for _ in range(timed):
        a.append(one(False))
        b.append(one(True))
    return statistics.median(a), statistics.median(b), first, statistics.median(cold or [first])


def measure_in_child(name: str, args: argparse.Namespace) -> list[str]:
    """Run this benchmark for one task in a fresh process; echo its output, return its BENCH."""
    command = [sys.executable, __file__, "--tasks", name, "--steps", str(args.steps)]
    command += ["--modes", args.modes, "--rounds", str(args.rounds)]
    command += ["--warm-rounds", str(args.warm_rounds)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.splitlines()
    for line in lines:
        if not line.startswith("BENCH "):
            print(line, flush=True)
    if done.returncode != 0:
        print(f"{name:22s} FAILED: its process exited with {done.returncode}", flush=True)
    return [line for line in lines if line.startswith("BENCH ")]


def main() -> None:
    """Measure every task (and mode) and print the BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    padded = {t.name for t in PADDED_TASKS}
    parser.add_argument(
        "--tasks",
        default=",".join(n for n in TASKS.names() if n not in padded),
        help="default: every task but the padded transport models (see the docstring)",
    )
    parser.add_argument("--modes", default="auto", help="auto = dp_modes.choose_grad_sample_mode")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per median; 0: none")
    parser.add_argument(
        "--warm-rounds", type=int, default=10, help="warm-up rounds of each kind before them"
    )
    args = parser.parse_args()
    names = args.tasks.split(",")
    if len(names) > 1:  # each task in a process of its own (see the docstring)
        collected: list[str] = []
        for name in names:
            collected += measure_in_child(name, args)
        print("\n".join(collected))
        return
    torch.set_num_threads(2)
    heap.keep_freed_memory()  # as a site's worker does; plain and DP in this process alike
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    bench: list[str] = []
    for name in args.tasks.split(","):
        task = TASKS.get(name)
        x, y = one_batch(task)
        for i, mode in enumerate(args.modes.split(",")):
            try:
                private, used = dp_step(task, x, y, mode)
                anchor, value = measure(plain_step(task, x, y), private, args.steps)
            except Exception as exc:  # a mode Opacus cannot run on this model: say so
                print(f"{name:22s} {mode:10s} FAILED {type(exc).__name__}: {str(exc)[:120]}")
                continue
            ratio = value / anchor
            print(
                f"{name:22s} {mode}->{used:10s} dp={value:.4f}s plain={anchor:.4f}s "
                f"ratio={ratio:.2f}",
                flush=True,
            )
            if i == 0:
                bench.append(
                    f"BENCH dp_overhead {name}_step_time value={value:.4f} "
                    f"anchor={anchor:.4f} ratio={ratio:.2f} target<=1.4 unit=s"
                )
        if args.rounds > 0:
            plain_round, dp_round, first, cold = round_times(task, args.rounds, args.warm_rounds)
            ratio = dp_round / plain_round
            print(
                f"{name:22s} round      dp={dp_round:.4f}s plain={plain_round:.4f}s "
                f"ratio={ratio:.2f} (first DP round, with the mode probe: {first:.4f}s; "
                f"the {args.warm_rounds} warm-up DP rounds after it: median {cold:.4f}s, "
                f"{cold / plain_round:.2f} x plain)",
                flush=True,
            )
            bench.append(
                f"BENCH dp_overhead {name}_round_time value={dp_round:.4f} "
                f"anchor={plain_round:.4f} ratio={ratio:.2f} target<=1.6 unit=s"
            )
    for line in bench:
        print(line)


if __name__ == "__main__":
    main()
