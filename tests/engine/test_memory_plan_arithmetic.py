"""The memory planner's engine (training/memory_plan.py): the fake-tensor measurement counts what a real
step allocates, the arithmetic keeps explicit settings and picks the cheapest that fit, and the CPU's
free memory honours a real address-space limit."""
import contextlib
import dataclasses
import json
import platform
import subprocess
import sys

import pytest
import torch

from comfyui_dojo.training import memory_plan as mp
from comfyui_dojo.training.adapters import AdapterConfig, attach_adapter
from comfyui_dojo.training.grad_safety import protected_training
from comfyui_dojo.training.loop import Precision, TrainConfig, diffusion_loss
from comfyui_dojo.training.optimizers import OptimizerKind
from comfyui_dojo.training.protocol import TargetPreset

from helpers import tiny_samples, tiny_unet_model
from pack_import import PACK_IMPORT_SNIPPET
from test_grad_safety import Toy

def adapted_unet():
    model = tiny_unet_model()
    adapter = attach_adapter(model.unet, model.adaptable_modules(TargetPreset.ATTENTION_MLP), AdapterConfig(rank=4))
    return model, adapter


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16])
def test_the_fake_step_counts_what_the_real_step_allocates(precision):
    model, adapter = adapted_unet()
    samples = tiny_samples(n=2, size=16)
    config = TrainConfig(precision=precision)
    fake = mp.probe_training_step(model, samples, 2, config, adapter.parameters(),
                                  lambda gc: contextlib.nullcontext(), "cpu", False)
    assert all(p.grad is None for p in adapter.parameters())  # the fake gradients are gone

    # The same step for real, counted by the same dispatch mode on real tensors.
    batch = torch.stack([samples[0].latent] * 2)
    cond = samples[0].cond
    cond = type(cond)(torch.cat([cond.context] * 2), None, {})
    counter = mp.LiveBytes()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision is Precision.BF16 else contextlib.nullcontext()
    with counter:
        with autocast:
            loss = diffusion_loss(model, batch.float(), cond, torch.full((2,), 0.5), torch.zeros_like(batch))
        loss.backward()
    assert counter.peak > 100_000
    # Equal up to the few ops whose fake (meta) kernels allocate outputs the real CPU kernels skip
    # (e.g. convolution_backward's unneeded input gradient): the fake count errs on the safe side.
    assert abs(fake.peak_bytes - counter.peak) <= 0.06 * counter.peak
    assert fake.largest_tensor_bytes == counter.largest
    adapter.detach()


def test_activations_grow_with_the_batch_and_checkpointing_measures_less():
    torch.manual_seed(0)
    model = Toy(dim=32, depth=4)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.fc2.bias.requires_grad_(True)

    def measure(batch, checkpointing):
        def step():
            x = torch.randn(batch, 64, 32)
            (model(x) ** 2).mean().backward()
        with protected_training(model.blocks, checkpointing=checkpointing):
            m = mp.measure_step(step, batch * 64)
        for p in model.parameters():
            p.grad = None
        return m.peak_bytes

    one, two = measure(1, False), measure(2, False)
    assert 1.6 < two / one < 2.4
    assert measure(2, True) < 0.8 * two


def fixed_job(act_off=1000, act_on=400, blocks=(100,) * 10, other=50, swap_saves=True, params=10,
              optimizer=OptimizerKind.ADAMW, batch=1):
    measures = {False: mp.StepMeasure(act_off, 0, 1), True: mp.StepMeasure(act_on, 0, 1)}
    calls = []

    def measure(gc):
        calls.append(gc)
        return measures[gc]
    job = mp.StepJob(mp.ModelMemory(other, tuple(blocks), swap_saves), params, optimizer, measure,
                     device_type="test", batch_size=batch)
    return job, calls


@pytest.fixture(autouse=True)
def no_margins(monkeypatch):
    # The arithmetic tests use byte counts of a few thousand; the real margins are hundreds of MB.
    monkeypatch.setitem(mp.MARGIN_BYTES, "test", 0)
    monkeypatch.setitem(mp.RUNTIME_BYTES, "test", 0)
    monkeypatch.setattr(mp, "MARGIN_FRACTION", 0.0)


def test_estimate_adds_weights_adapter_optimizer_and_activations():
    job, _ = fixed_job(params=10, optimizer=OptimizerKind.ADAMW)
    e = mp.estimate(job, False, 0)
    assert (e.weights, e.adapter, e.activations) == (1050, 10 * (4 + 8), 1000)
    assert mp.estimate(fixed_job(optimizer=OptimizerKind.ADAMW_8BIT)[0], False).adapter == 10 * (4 + 2)
    assert mp.estimate(fixed_job(optimizer=OptimizerKind.PRODIGY)[0], False).adapter == 10 * (4 + 16)


def test_block_swap_saves_weights_only_with_checkpointing_and_off_the_cpu():
    job, _ = fixed_job()
    assert mp.estimate(job, True, 4).weights == 50 + 6 * 100 + 2 * 100
    assert mp.estimate(job, False, 4).weights > job.model.total_bytes  # autograd keeps every streamed copy
    cpu, _ = fixed_job(swap_saves=False)
    assert mp.estimate(cpu, True, 4).weights > cpu.model.total_bytes


def test_auto_picks_the_fastest_settings_that_fit():
    job, calls = fixed_job()
    total_off = mp.estimate(job, False).total
    p = mp.plan(job, total_off, "test", checkpointing=None, blocks_to_swap=None)
    assert p.fits and not p.checkpointing and p.blocks_to_swap == 0
    job, calls = fixed_job()
    p = mp.plan(job, total_off - 1, "test", checkpointing=None, blocks_to_swap=None)
    assert p.fits and p.checkpointing and p.blocks_to_swap == 0 and "checkpointing on" in p.chosen
    # Needs swapping: the fewest blocks that fit.
    job, _ = fixed_job()
    budget = mp.estimate(job, True, 3).total
    p = mp.plan(job, budget, "test", checkpointing=None, blocks_to_swap=None)
    assert (p.fits, p.checkpointing, p.blocks_to_swap) == (True, True, 3)
    assert "3 blocks swapped" in p.summary()


def test_explicit_settings_are_kept_and_refused_when_they_do_not_fit():
    budget = mp.estimate(fixed_job()[0], True, 0).total
    job, calls = fixed_job()
    p = mp.plan(job, budget, "test", checkpointing=False, blocks_to_swap=0)
    assert not p.fits and not p.checkpointing and calls == [False]  # never measured what it may not choose
    message = str(mp.MemoryPlanRefused(p))
    assert "gradient_checkpointing on" in message and "memory_plan" in message
    job, _ = fixed_job()
    p = mp.plan(job, 10**9, "test", checkpointing=True, blocks_to_swap=2)
    assert (p.checkpointing, p.blocks_to_swap, p.chosen) == (True, 2, ())


def test_refusal_names_batch_resolution_and_fp8_that_would_fit():
    job, _ = fixed_job(act_off=1100, act_on=1000, blocks=(), other=4000, batch=4)
    p = mp.plan(job, 4800, "test", checkpointing=None, blocks_to_swap=None)
    assert not p.fits
    text = str(mp.MemoryPlanRefused(p))
    assert "batch_size 2 (now 4)" in text and "lower resolution" in text and "fp8 weights" in text
    assert p.estimate.checkpointing  # the best try was the smallest


def test_cpu_free_memory_honours_a_real_address_space_limit():
    script = PACK_IMPORT_SNIPPET + (
        "import json\nfrom comfyui_dojo.training.memory_plan import cpu_free_bytes, _self_status\n"
        "print(json.dumps([*cpu_free_bytes(), _self_status('VmSize')]))\n")
    unlimited = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                          check=True).stdout)
    limit = unlimited[2] + 300 * 2**20
    limited = subprocess.run(["prlimit", f"--as={limit}", sys.executable, "-c", script],
                             capture_output=True, text=True, check=True)
    free, source, vmsize = json.loads(limited.stdout)
    assert source == "address-space limit (RLIMIT_AS)"
    assert free == limit - vmsize and 0 < free < 400 * 2**20 < unlimited[0]


class Attention(torch.nn.Module):
    """An attention block that calls scaled_dot_product_attention through torch.nn.functional at call
    time, as ComfyUI's attention does."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + out.transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_attention_on_meta_is_planned_as_the_fused_kernels_also_in_a_checkpoint_recomputation(checkpointing):
    tokens, dim, heads = 4096, 64, 2
    blocks = torch.nn.ModuleList([Attention(dim, heads) for _ in range(2)]).to("meta")

    def step():
        x = torch.zeros(1, tokens, dim, device="meta", requires_grad=True)
        for block in blocks:
            x = block(x)
        x.sum().backward()

    with protected_training(list(blocks), checkpointing=checkpointing):
        m = mp.measure_step(step, tokens)
    matrix = heads * tokens * tokens * 4  # one fp32 attention matrix: what the math kernel would keep
    assert m.peak_bytes < matrix / 4, m
    assert m.peak_bytes > 4 * tokens * dim * 4  # the block's real activations are counted
    assert torch.nn.functional.scaled_dot_product_attention is mp._SDPA  # put back


def test_module_signature_sees_shapes_dtypes_and_what_trains():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    assert mp.module_signature(a) == mp.module_signature(b)  # weights' values do not matter
    assert mp.module_signature(a) != mp.module_signature(torch.nn.Linear(4, 5))
    assert mp.module_signature(a) != mp.module_signature(torch.nn.Linear(4, 4).to(torch.bfloat16))
    b.bias.requires_grad_(False)
    assert mp.module_signature(a) != mp.module_signature(b)


def test_measurements_are_kept_in_process_and_on_disk(tmp_path):
    m = mp.StepMeasure(123_456, 789, 10, 42)
    key = mp.measure_key({"net": "x", "batch": 2})
    assert key != mp.measure_key({"net": "x", "batch": 1})
    cache = mp.MeasureCache(str(tmp_path / "plans"))
    assert cache.get(key) is None
    cache.put(key, m)
    assert cache.get(key) == m
    # A new process (a new cache on the same folder) reads it back from disk.
    assert mp.MeasureCache(str(tmp_path / "plans")).get(key) == m
    assert [p.name for p in (tmp_path / "plans").iterdir()] == [f"{key}.json"]  # no temporary file left
    # An existing file is kept, an unreadable or foreign one is ignored (measured again).
    cache.put(key, mp.StepMeasure(1, 1, 1, 1))
    assert mp.MeasureCache(str(tmp_path / "plans")).get(key) == m
    (tmp_path / "plans" / f"{key}.json").write_text("{not json")
    assert mp.MeasureCache(str(tmp_path / "plans")).get(key) is None
    (tmp_path / "plans" / f"{key}.json").write_text(json.dumps({"format": -1, **vars(m)}))
    assert mp.MeasureCache(str(tmp_path / "plans")).get(key) is None
    # Without a folder it only remembers in process; a full cache forgets its oldest.
    small = mp.MeasureCache(None, size=2)
    for i in range(3):
        small.put(str(i), m)
    assert small.get("0") is None and small.get("2") == m


def test_the_heap_limit_follows_glibcs_mmap_threshold_setting():
    assert mp.heap_limit({}) == 32 * 2**20  # glibc's dynamic threshold grows to 32 MiB
    assert mp.heap_limit({"MALLOC_MMAP_THRESHOLD_": "131072"}) == 131072
    assert mp.heap_limit({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=65536"}) == 65536
    assert mp.heap_limit({"MALLOC_MMAP_THRESHOLD_": "lots"}) == 32 * 2**20


def test_the_fake_preview_forward_counts_what_a_real_sampling_forward_allocates():
    model, adapter = adapted_unet()
    sample = tiny_samples(n=1, size=16)[0]
    shape = (sample.latent.shape[0], 32, 32)  # a preview bigger than the training bucket
    fake = mp.probe_sampling_step(model, sample, shape, 2, "cpu")
    counter = mp.LiveBytes()
    cond = type(sample.cond)(torch.cat([sample.cond.context] * 2), None, {})
    with counter, torch.no_grad():
        model.predict(torch.zeros(2, *shape), torch.full((2,), 0.5), cond)
    assert counter.peak > 100_000
    assert abs(fake.peak_bytes - counter.peak) <= 0.06 * counter.peak
    assert fake.peak_bytes < mp.probe_training_step(model, [type(sample)(torch.zeros(shape), sample.cond)], 2,
                                                    TrainConfig(), adapter.parameters(),
                                                    lambda gc: contextlib.nullcontext(), "cpu", False).peak_bytes
    adapter.detach()


def test_a_preview_that_needs_more_than_the_step_sets_the_activations():
    job, _ = fixed_job(act_off=1000, act_on=400)
    with_preview = mp.StepJob(job.model, job.adapter_params, job.optimizer, job.measure, device_type="test",
                              measure_preview=lambda: mp.StepMeasure(700, 0, 1))
    off, on = mp.estimate(with_preview, False), mp.estimate(with_preview, True)
    assert (off.activations, off.preview, off.preview_dominates) == (1000, 700, False)
    assert (on.activations, on.preview, on.preview_dominates) == (700, 700, True)
    assert "preview" in on.parts()
    p = mp.plan(with_preview, on.total - 1, "test", checkpointing=True, blocks_to_swap=0)
    assert not p.fits and any("smaller previews" in s for s in p.suggestions)


def test_each_new_bf16_matmul_shape_on_the_cpu_counts_one_kept_kernel():
    """oneDNN's cached primitives (KERNEL_CACHE_BYTES): one per distinct bf16 CPU matmul signature, counted
    when first met and kept, so a later peak includes them and an earlier one does not; none in fp32 or on meta."""
    w = torch.randn(32, 16)

    def step(device, autocast):
        with autocast:
            for rows in (8, 12, 8, 12, 20):  # three distinct shapes, two of them met twice
                torch.nn.functional.linear(torch.randn(rows, 16, device=device), w.to(device))
            torch.zeros(4096, device=device)  # the peak comes after every matmul

    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    counted = {}
    for name, device, autocast in (("bf16", "cpu", bf16), ("fp32", "cpu", contextlib.nullcontext()),
                                   ("meta", "meta", contextlib.nullcontext())):
        counter = mp.LiveBytes()
        with counter:
            step(device, autocast)
        counted[name] = (len(counter.kernels), counter.kernel_bytes_at_peak)
    assert counted["bf16"] == (3, 3 * mp.KERNEL_CACHE_BYTES["mm"])
    assert counted["fp32"] == counted["meta"] == (0, 0)
    m = mp.measure_step(lambda: step("cpu", bf16), tokens=1)
    assert m.kernel_bytes_at_peak == 3 * mp.KERNEL_CACHE_BYTES["mm"]
    job = mp.StepJob(mp.ModelMemory(0), 0, OptimizerKind.ADAMW, lambda gc: m, device_type="cpu")
    assert mp.estimate(job, False).workspace >= m.kernel_bytes_at_peak


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="MallocReplay reads glibc's malloc")
def test_a_cpu_step_is_replayed_through_malloc_and_its_growth_is_the_cpu_overhead():
    def step(device):
        a = torch.empty(40 * 2**20, dtype=torch.uint8, device=device)
        b = torch.empty(70 * 2**20, dtype=torch.uint8, device=device)  # both alive: 110 MiB at the peak
        del a, b

    replay = mp.MallocReplay.create()
    start = replay.footprint()
    m = mp.measure_step(lambda: step("cpu"), tokens=1)
    assert m.peak_bytes == 110 * 2**20
    # malloc really held both blocks (a little more for its headers and the step run again) ...
    assert 110 * 2**20 <= m.malloc_growth_bytes <= 2 * 110 * 2**20
    # ... and has them back: the replay leaves nothing allocated.
    assert replay.footprint() - start < 40 * 2**20
    assert mp.measure_step(lambda: step("meta"), tokens=1).malloc_growth_bytes == -1
    # The CPU overhead is the growth beyond the live peak (never below zero); without a replay, the
    # kernels before the peak and the older heap fraction.
    grown = mp.StepMeasure(1000, 0, 1, heap_bytes_at_peak=500, kernel_bytes_at_peak=70, malloc_growth_bytes=1300)
    assert mp.cpu_overhead(grown) == 300
    assert mp.cpu_overhead(dataclasses.replace(grown, malloc_growth_bytes=900)) == 0
    assert mp.cpu_overhead(dataclasses.replace(grown, malloc_growth_bytes=-1)) == 70 + int(mp.CPU_HEAP_GROWTH * 500)
