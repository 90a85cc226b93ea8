"""``copa bench``: FLOPs and measured throughput of COPA with and without patch selection (SPEC §5).

Protocol (timm / ToMe): eval mode + ``torch.inference_mode``, warm-up runs discarded, a fixed batch,
the median of N timed runs, and the unpruned model measured in the same run with the same weights.
Extra rules for a small shared machine:

- **Interleaved timing.** Run ``i`` of every setting is timed before run ``i+1`` of any, so slow
  drifts of the machine hit all settings alike and the speedups (ratios of medians) stay meaningful.
- **Contention check** (``--min-util``, CPU). Every timed call records its CPU utilisation (process
  CPU time / wall / threads). On 2 cores another busy process halves it and, through OpenMP
  barriers, can slow a forward 3-50x; with ``--min-util 0.9`` each call waits for a quiet machine
  and a call that still got less than 0.9 is re-timed (at most 3 times).
- **Same weights.** One model is built; a keep setting only swaps the (small) selector modules and
  the selection layers/ratios. The unpruned setting has no selector at all (selector ``none``).

What is measured, per keep setting (``none`` = unpruned, ``"6:0.5"``, ``"4:0.7,8:0.5"`` = selection
before blocks 4 and 8 keeping 70 % then 50 % of the patches entering each stage):

- ViT alone: ``model.image_tokens(model.image_prefix(images), text_cls)`` -> images/s (text [CLS]
  precomputed);
- whole model, VQA-style: text encoder + ViT with text-aware selection + fusion (+ one decoder step
  with ``--decode``) -> image-text pairs/s;
- FLOPs of both (``torch.utils.flop_counter``; CPU SDPA counted too, see ``_sdpa_cpu_flops``),
  FLOP ratio, measured speedups, efficiency = measured e2e speedup / FLOP-ratio speedup, achieved
  FLOP/s and its share of a measured matmul peak, peak memory;
- ``--train``: samples/s of a full ``PretrainObjective`` forward + backward + AdamW step.

Package layout (one concern per module):

- ``keep``: keep-setting parsing (``--keep``) and ``BenchError``;
- ``hardware``, ``timing``, ``flops``, ``memory``: measurement, reusable outside the benchmark
  (machine description and matmul peak, interleaved timing with contention checks, FLOP counting,
  peak memory);
- ``harness``: the model, inputs and selection switch that both runners share (``prepare``);
- ``inference`` and ``train``: the two runners;
- ``tables`` and ``cli``: output and the ``copa bench`` command.
"""

from copa.bench.cli import register, run
from copa.bench.flops import count_flops
from copa.bench.hardware import hardware_info, matmul_peak, native_precisions
from copa.bench.harness import build_bench_model, make_inputs, prepare
from copa.bench.inference import bench_inference
from copa.bench.keep import BenchError, KeepSetting, parse_keep, parse_keeps
from copa.bench.memory import PeakMemory, cpu_tensor_peak
from copa.bench.timing import time_interleaved
from copa.bench.train import bench_train

__all__ = [
    "BenchError",
    "KeepSetting",
    "PeakMemory",
    "bench_inference",
    "bench_train",
    "build_bench_model",
    "count_flops",
    "cpu_tensor_peak",
    "hardware_info",
    "make_inputs",
    "matmul_peak",
    "native_precisions",
    "parse_keep",
    "parse_keeps",
    "prepare",
    "register",
    "run",
    "time_interleaved",
]
