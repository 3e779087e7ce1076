"""What does reporting cost? The same training job with every metric on and with metrics off, alternated.

    .venv/bin/python benchmarks/metrics_overhead.py [--trials 5] [--steps 100]

"on":         W&B offline + the JSON-lines file, train/batch/performance/progress every 10 steps, system
              metrics every 10 steps, gradient and weight statistics every 10 steps.
"collectors": the same collectors and the JSON-lines file, W&B disabled (attributes the cost of wandb's
              own background process, which competes for this machine's two cores).
"off":        W&B disabled, no system or gradient collection, reports dropped.

On this machine's tiny model a step takes tens of milliseconds, so the ratio overstates what a 7B step
(seconds) would see. It therefore also prints each collector's own cost in milliseconds, including the
gradient/weight statistics over a LoRA the size of Qwen2.5-Coder-7B's (r=16, all seven projections,
28 layers, ~40M parameters), and the overhead those costs imply for a step of 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from codelupe_trainer.config import ModelSettings, TrainingSettings  # noqa: E402
from codelupe_trainer.data.dataset import build_dataset  # noqa: E402
from codelupe_trainer.demo.demo import crawler_rows, standard_library_files  # noqa: E402
from codelupe_trainer.metrics import MetricsRun, SystemMonitor, WandbOptions  # noqa: E402
from codelupe_trainer.data.records import Sample  # noqa: E402
from codelupe_trainer.demo.tinymodel import build_tiny_model  # noqa: E402
from codelupe_trainer.training.loop import train_adapter  # noqa: E402
from codelupe_trainer.training.model import attach_adapter, load_base_model, load_tokenizer  # noqa: E402
from codelupe_trainer.training.telemetry import ReportingOptions, gradient_statistics, weight_statistics  # noqa: E402


class DiscardingReporter:
    def log(self, step, metrics):
        pass


def train_once(model_dir: Path, blocks, mode: str, steps: int, work: Path) -> float:
    tokenizer = load_tokenizer(str(model_dir))
    model_settings = ModelSettings(base_model=str(model_dir), quantization="none", lora_r=8, lora_alpha=16)
    base, _ = load_base_model(model_settings, "cpu")
    torch.manual_seed(0)
    model = attach_adapter(base, model_settings, None)
    training = TrainingSettings(batch_size=8, gradient_accumulation_steps=1, max_steps=steps, logging_steps=10,
                                gradient_checkpointing=False, learning_rate=1e-3)
    if mode != "off":
        options = WandbOptions("offline" if mode == "on" else "disabled", "bench", None, "bench", work, 60, 60)
        reporter = MetricsRun(1, work / "metrics.jsonl", options, {"bench": True})
        monitor = SystemMonitor(work)
        reporting, system = ReportingOptions(10, 10, 8), monitor.read
    else:
        reporter, reporting, system = DiscardingReporter(), ReportingOptions(0, 0, 0), dict
    # Exactly `steps` steps of blocks: train_adapter trains a whole epoch rather than leave rows unseen, as the
    # daemon does (its cycle takes no more rows than the step budget trains).
    blocks = blocks[: steps * training.batch_size * training.gradient_accumulation_steps]
    started = time.perf_counter()
    result = train_adapter(model, tokenizer, blocks, [], training, work / "scratch", reporter, reporting,
                           lambda: False, system, seed=0, device="cpu")
    elapsed = time.perf_counter() - started
    if result.global_step != steps:  # a per-step figure over another number of steps would be wrong
        raise SystemExit(f"trained {result.global_step} steps, not the {steps} the figures are divided by")
    if mode != "off":
        reporter.finish(0)
    return elapsed


def time_call(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats * 1000


def seven_b_lora() -> list[tuple[str, torch.nn.Parameter]]:
    """Random LoRA tensors shaped like Qwen2.5-Coder-7B's at r=16, with gradients."""
    hidden, intermediate, kv, rank = 3584, 18944, 512, 16
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
    parameters = []
    for layer in range(28):
        for module, (fan_in, fan_out) in shapes.items():
            for part, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
                parameter = torch.nn.Parameter(torch.randn(shape) * 0.01)
                parameter.grad = torch.randn(shape) * 1e-3
                parameters.append((f"model.layers.{layer}.{module}.{part}.weight", parameter))
    return parameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    arguments = parser.parse_args()
    work_root = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    model_dir = build_tiny_model(work_root / "model", (p.read_text(encoding="utf-8", errors="replace") for p in standard_library_files(300)))
    tokenizer = load_tokenizer(str(model_dir))
    samples = [Sample(index, row[3], "python", 70) for index, row in enumerate(crawler_rows(standard_library_files(2000)))]
    blocks = build_dataset(samples, tokenizer, max_length=256, eval_fraction=0.0, seed=0).train_blocks

    modes = ["on", "collectors", "off"]
    timings = {mode: [] for mode in modes}
    for trial in range(arguments.trials):
        for mode in modes[trial % 3:] + modes[:trial % 3]:  # rotate which goes first
            work = work_root / f"trial-{trial}-{mode}"
            (work / "scratch").mkdir(parents=True)
            timings[mode].append(train_once(model_dir, blocks, mode, arguments.steps, work))
    median = {mode: statistics.median(values) for mode, values in timings.items()}
    off = median["off"]
    print(f"training {arguments.steps} steps, median of {arguments.trials}, {off / arguments.steps * 1000:.0f} ms a step with metrics off:")
    for mode in ("on", "collectors"):
        extra_ms = (median[mode] - off) / arguments.steps * 1000
        print(f"  {mode:>10}: {median[mode]:.2f} s vs off {off:.2f} s, ratio {median[mode] / off:.3f} "
              f"({extra_ms:+.1f} ms a step = {extra_ms / 10:+.2f} % of a 1 s step)")

    monitor = SystemMonitor(work_root)
    system_ms = time_call(monitor.read, 50)
    big = seven_b_lora()
    sampled = {big[index][0] for index in range(0, len(big), len(big) // 8)}
    gradient_ms = time_call(lambda: gradient_statistics(big, sampled), 5)
    weight_ms = time_call(lambda: weight_statistics(big, sampled), 5)
    options = WandbOptions("offline", "bench", None, "bench", work_root / "log-cost", 60, 60)
    run = MetricsRun(1, work_root / "log-cost.jsonl", options, {})
    payload = {f"train/key_{index}": float(index) for index in range(40)}
    step = iter(range(10**9))
    log_ms = time_call(lambda: run.log(next(step), payload), 200)
    run.finish(0)
    per_ten_steps = system_ms + gradient_ms + weight_ms + log_ms * 3
    print(f"cost per collection: system {system_ms:.2f} ms; gradients {gradient_ms:.1f} ms and weights {weight_ms:.1f} ms "
          f"over a 7B-sized LoRA ({sum(p.numel() for _, p in big) / 1e6:.0f}M params, CPU); one log call of 40 keys {log_ms:.3f} ms")
    print(f"implied overhead with every collector every 10 steps: {per_ten_steps / 10:.1f} ms a step = "
          f"{per_ten_steps / 10 / 1000 * 100:.2f} % of a 1 s step (on a GPU the tensor statistics run on the device)")


if __name__ == "__main__":
    main()
