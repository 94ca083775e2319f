"""``train_tpu.py --compile_only --topology``: the real steps compiled for a TPU slice on this CPU
host (libtpu, no TPU), with per-chip memory, FLOPs, bytes and roofline estimates."""

import json
import os
import subprocess
import sys

import pytest

from fastvit_jax.training import aot
from tmpfs import cli_env  # noqa: E402  (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topologies_chips_and_the_roofline():
    chip, dims = aot.parse_topology("v5e:8x8")
    assert (chip.name, chip.hbm_gib, dims) == ("v5e", 16.0, (8, 8, 1))
    assert aot.parse_topology("v4:2x2x2")[1] == (2, 2, 2)
    with pytest.raises(aot.CompileOnlyError, match=r"--topology 'v7:2x2' is not CHIP:AxB\[xC\] with CHIP one of "
                                                   r"v4, v5e, v5p, v6e"):
        aot.parse_topology("v7:2x2")
    assert aot.CHIPS["v4"].megacore and not aot.CHIPS["v5e"].megacore  # v4/v5p: one JAX device per chip
    r = aot.roofline(flops=197e12 * 0.01, nbytes=819e9 * 0.02, chip=aot.CHIPS["v5e"], images=128)
    assert r["bound"] == "memory" and r["step_s"] == pytest.approx(0.02) and r["mfu"] == pytest.approx(0.5)
    assert r["img_per_s_per_chip"] == pytest.approx(6400)
    # the compiler's cycles at v5e's 1.5 GHz clock (197 TFLOP/s from four 128x128 MXUs)
    c = aot.cycle_time(3_000_000, flops=197e12 * 0.001, chip=aot.CHIPS["v5e"], images=6)
    assert c["cycles_step_s"] == pytest.approx(0.002) and c["cycles_img_per_s_per_chip"] == pytest.approx(3000)
    assert c["cycles_mfu"] == pytest.approx(0.5)
    assert aot.cycle_time(3_000_000, 1.0, aot.CHIPS["v4"], 6) == {} and aot.cycle_time(None, 1.0, aot.CHIPS["v5e"], 6) == {}


HLO_WITH_CYCLES = """HloModule jit_train_step

%fused_computation.1 (param_0: bf16[2,4]) -> bf16[2,4] {
  %param_0 = bf16[2,4]{1,0} parameter(0)
  ROOT %multiply.1 = bf16[2,4]{1,0} multiply(%param_0, %param_0), backend_config={"estimated_cycles":"999"}
}

ENTRY %main.5 (p: bf16[2,4]) -> bf16[2,4] {
  %p = bf16[2,4]{1,0} parameter(0)
  %fusion.1 = bf16[2,4]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(FastVit)/FastVit.forward_features/stages_0/blocks_3/mlp/conv"}, backend_config={"flag_configs":[],"estimated_cycles":"100"}
  %convolution.2 = bf16[2,4]{1,0} convolution(%fusion.1, %p), metadata={op_name="jit(train_step)/transpose(jvp(FastVit))/FastVit.forward_features/stages_0/blocks_1/mlp/conv"}, backend_config={"estimated_cycles":"40"}
  %fusion.4 = bf16[2,4]{1,0} fusion(%convolution.2), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(FastVit)/FastVit.forward_features/stages_0/blocks_0/mlp/conv"}, backend_config={"estimated_cycles":"20"}
  ROOT %copy.3 = bf16[2,4]{0,1} copy(%fusion.4), backend_config={"estimated_cycles":"7"}
}
"""


def test_compiler_cycles_are_summed_per_scope_outside_fusion_bodies():
    """hlo_cycles: a fusion's body is counted by its fusion instruction, not again; blocks of a stage
    merge; autodiff's transpose marks the backward; a program without estimates (CPU) has none."""
    from benchmarks.tpu_cycles import breakdown
    from fastvit_jax.training import hlo_cycles

    assert hlo_cycles.total_cycles(HLO_WITH_CYCLES) == 167
    assert hlo_cycles.cycles_by_scope(HLO_WITH_CYCLES) == [
        ("forward", "stages_0/blocks_*/mlp/conv", 120), ("backward", "stages_0/blocks_*/mlp/conv", 40),
        ("forward", "(no scope)", 7)]
    assert hlo_cycles.total_cycles(HLO_WITH_CYCLES.replace('"estimated_cycles"', '"other"')) is None
    result = breakdown(HLO_WITH_CYCLES, top=2)
    assert result["total_cycles"] == 167 and result["scopes_left_out"] == 1
    assert [round(s["share"], 3) for s in result["scopes"]] == [round(120 / 167, 3), round(40 / 167, 3)]


@pytest.mark.skipif(aot.libtpu_path() is None, reason="libtpu is not installed beside the environment (make setup)")
@pytest.mark.xdist_group("libtpu")  # one compile at a time: each takes a few GB and both cores
@pytest.mark.parametrize("mesh", [pytest.param("data:-1", marks=pytest.mark.slow), "data:-1,fsdp:2"])
def test_compile_only_for_a_v5e_slice(tmp_path, mesh):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_tpu.py"), "--variant", "t8", "--image_size", "32",
                        "--global_batch_size", "8", "--mesh", mesh, "--fsdp_min_size", "4096", "--compile_only",
                        "--topology", "v5e:2x2", "--workdir", str(tmp_path / "wd"), "--compile_only_out", str(out)],
                       capture_output=True, text=True, env=cli_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ESTIMATES from the compiled programs, not measurements" in r.stdout
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["images_per_chip"] == 2  # the batch is split over data and fsdp
    assert report["mesh"] == ({"data": 4} if mesh == "data:-1" else {"data": 2, "fsdp": 2})
    for step in ("train_step", "eval_step"):
        s = report[step]
        assert s["flops"] > 1e7 and s["bytes_accessed"] > 1e7 and s["memory_bytes"]["total"] > 0
        assert s["fits"] is (s["memory_bytes"]["total"] <= s["hbm_bytes"]) and s["img_per_s_per_chip"] > 0
        assert s["estimated_cycles"] > 1e4  # the TPU compiler's own estimate (hlo_cycles), as a step time too
        assert s["cycles_step_s"] == pytest.approx(s["estimated_cycles"] / 1.5e9) and s["cycles_img_per_s_per_chip"] > 0
    assert "GHz" in r.stdout
    assert (report["eval_batch_size"], report["lowering"], report["remat"]) == (8, "native", "none")
    # forward + backward (~3 forwards) against the eval step's 2 (the weights and their EMA, as the run evaluates)
    assert report["train_step"]["flops"] > 1.5 * report["eval_step"]["flops"]
    assert not (tmp_path / "wd" / "checkpoints").exists()  # nothing of a run is written


@pytest.mark.skipif(aot.libtpu_path() is None, reason="libtpu is not installed beside the environment (make setup)")
def test_depthwise_conv_cycles_are_paid_per_block_of_128_channels(tmp_path):
    """benchmarks/tpu_depthwise.py at a tiny size (seconds): 76 channels cost what 128 do, 152 more
    (the TPU's 128 lanes), forward and gradient; the JSON it writes."""
    out = tmp_path / "dw.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.tpu_depthwise", "--batch", "2", "--size", "16", "--kernel",
                        "3", "--channels", "76", "128", "152", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 76 | 59% |" in r.stdout and "not measurements" in r.stdout
    rows = {row["channels"]: row for row in json.loads(out.read_text())["rows"]}
    for direction in ("forward", "gradient"):
        c76, c128, c152 = (rows[c][direction]["estimated_cycles"] for c in (76, 128, 152))
        assert c76 > 0 and abs(c76 - c128) <= 0.01 * c128 and c152 > 1.25 * c128, (direction, c76, c128, c152)
    assert rows[128]["lane_occupancy"] == 1.0 and round(rows[152]["lane_occupancy"], 2) == 0.59


def test_compile_only_without_topology_or_libtpu_is_one_line(tmp_path):
    env = dict(cli_env(), TPU_LIBRARY_PATH=str(tmp_path / "none.so"))
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_tpu.py"), "--compile_only"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: --compile_only needs --topology, e.g. --topology v5e:8x8"


@pytest.mark.skipif(aot.libtpu_path() is None, reason="libtpu is not installed beside the environment (make setup)")
def test_slices_have_one_device_per_chip():
    """v4/v5p chips are megacore (one JAX device for two TensorCores), as on a real slice; an
    unbuildable topology is one line naming the accepted forms. No compile: seconds."""
    code = ("from fastvit_jax.training import aot; aot.prepare_deviceless_tpu()\n"
            "print([len(aot.topology_devices(t)) for t in ('v5e:1x1', 'v5e:2x2', 'v4:1x1x1', 'v4:2x2x1', 'v6e:2x2')])\n"
            "try:\n    aot.topology_devices('v5e:3x5')\nexcept aot.CompileOnlyError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts, error = r.stdout.strip().splitlines()[-2:]
    assert counts == "[1, 4, 1, 4, 4]"
    assert error.startswith("libtpu (libtpu==0.0.42.1) cannot build the topology 'v5e:3x5'") and "v5e:2x2" in error


def test_missing_libtpu_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    message = aot.missing_libtpu_message()
    assert "make setup" in message and "pip install -e .[tpu]" in message and aot.LIBTPU_PIN in message
    monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "none.so"))
    assert aot.libtpu_path() is None and "is not a file" in aot.missing_libtpu_message()


def test_largest_batch_is_extrapolated_from_two_compiles():
    from benchmarks.tpu_estimates import fit_max_batch

    gib = 2**30
    # 1 GiB fixed + 0.1 GiB per image: 16 GiB holds 150 -> 144 (a multiple of 8)
    assert fit_max_batch([(16, int(2.6 * gib)), (32, int(4.2 * gib))], 16 * gib) == 144


def test_largest_batch_refines_the_fit_with_each_compile():
    """XLA's memory grows less than linearly with the batch: the first extrapolation stops short;
    each compile refines the fit until the prediction was compiled already."""
    from benchmarks.tpu_estimates import Row, largest_batch

    gib = 2**30

    class FakeRunner:  # memory 1 GiB + 0.06 GiB * batch^0.93 on a 16 GiB chip
        def __init__(self):
            self.compiled = []

        def get(self, row, batch):
            self.compiled.append(batch)
            return {"train_step": {"hbm_bytes": 16 * gib, "memory_bytes": {"total": int((1 + 0.06 * batch ** 0.93) * gib)}},
                    "cpu_s": 1.0}

    runner = FakeRunner()
    out = largest_batch(runner, Row("sa12", "v5e"), [16, 32])
    assert out["batch"] == 376 and (1 + 0.06 * 384 ** 0.93) > 16  # the largest multiple of 8 that fits
    assert runner.compiled == [16, 32, 328, 368, 376] and out["cpu_s"] == 5.0
    assert largest_batch(FakeRunner(), Row("sa12", "v5e"), [16, 32], refines=1)["batch"] == 328


def test_a_flat_stretch_of_memory_does_not_fling_the_fit_far_out():
    """ma36 on v5e: 4.03 / 6.77 GiB at 16 / 32, then 14.22 at 80 and 14.25 at 88 (the compiler
    rematerialises near the limit). A straight fit through 80 and 88 predicts 616; the refinement
    assumes at least half the probes' memory per image and tries 104."""
    from benchmarks.tpu_estimates import Row, largest_batch

    gib = 2**30
    memory = {16: 4.03, 32: 6.77, 80: 14.22, 88: 14.25, 104: 15.2}
    compiled = []

    class FakeRunner:
        def get(self, row, batch):
            compiled.append(batch)
            return {"train_step": {"hbm_bytes": 16 * gib, "memory_bytes": {"total": int(memory[batch] * gib)}}}

    out = largest_batch(FakeRunner(), Row("ma36", "v5e"), [16, 32], refines=3)
    assert compiled[:4] == [16, 32, 80, 88] and compiled[4] == 104 and out["batch"] == 104


def test_a_compile_refused_for_want_of_hbm_counts_as_not_fitting():
    from benchmarks.tpu_estimates import Row, largest_batch, out_of_memory_report

    message = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
               "for HLO temporaries (15.77G) exceeds available HBM (15.75G).")
    report = out_of_memory_report("Traceback ...\n" + message)
    assert report["train_step"]["memory_bytes"]["total"] == int(15.77 * 2**30) and not report["train_step"]["fits"]
    assert report["available_bytes"] == int(15.75 * 2**30)
    assert out_of_memory_report("RuntimeError: something else") is None

    gib = 2**30

    class FakeRunner:  # 1 GiB + 0.04 GiB per image; the compiler has 15.75 of the chip's 16 GiB
        def __init__(self):
            self.compiled = []

        def get(self, row, batch):
            self.compiled.append(batch)
            need = 1 + 0.04 * batch
            if need > 15.75:
                return out_of_memory_report(message.replace("15.77G", f"{need:.2f}G"))
            return {"train_step": {"hbm_bytes": 16 * gib, "memory_bytes": {"total": int(need * gib)}}, "cpu_s": 1.0}

    # the first prediction (368 per chip: 15.72 GiB) fits the compiler's 15.75 GiB
    runner = FakeRunner()
    assert largest_batch(runner, Row("sa12", "v5e"), [16, 32])["batch"] == 368 and runner.compiled == [16, 32, 368]

    class Steeper(FakeRunner):  # the memory grows faster past 300 per chip: 376 needs 16.5 GiB
        def get(self, row, batch):
            self.compiled.append(batch)
            need = 1 + 0.04 * batch + (0.1 * (batch - 300) if batch > 300 else 0)
            if need > 15.75:
                return out_of_memory_report(message.replace("15.77G", f"{need:.2f}G"))
            return {"train_step": {"hbm_bytes": 16 * gib, "memory_bytes": {"total": int(need * gib)}}, "cpu_s": 1.0}

    # 368 is refused; the fits through it step down, within 3 compiles after the probes, to 296
    # (the true largest is 312)
    runner = Steeper()
    out = largest_batch(runner, Row("sa12", "v5e"), [16, 32])
    assert runner.compiled == [16, 32, 368, 248, 296] and out["batch"] == 296


def test_the_table_gives_the_compilers_cycles_beside_the_roofline():
    """tpu_estimates.table: the roofline columns and, where the chip's clock is known (v5e), the
    cycles' img/s and MFU (from the cached report, as --table reads it); 'n/a' elsewhere."""
    from benchmarks.tpu_estimates import Row, table
    from fastvit_jax.training.aot import CHIPS, roofline

    def summary(chip, cycles):
        step = {"memory_bytes": {"total": 2**30}, "hbm_bytes": 16 * 2**30, "flops": 197e12 * 0.01,
                "bytes_accessed": 819e9 * 0.02, "estimated_cycles": cycles,
                **roofline(197e12 * 0.01, 819e9 * 0.02, CHIPS[chip], 100)}
        return {"row": Row("t8", chip), "batch": 100, "report": {"train_step": step}, "cpu_s": 60.0}

    v5e, v4 = table([summary("v5e", 60_000_000), summary("v4", 60_000_000)]).splitlines()[2:]
    # roofline: 20 ms, 5,000 img/s, MFU 50%; cycles: 60 M at 1.5 GHz = 40 ms, 2,500 img/s, MFU 25%
    assert v5e.endswith("| 20 | memory | 5,000 | 50.0% | 2,500, 25.0% | 1 |"), v5e
    assert "| n/a |" in v4
