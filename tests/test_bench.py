"""bench.py runs and prints its table, on the DDIM and the rectified-flow miniatures; memory is flat in the number of
DDIM steps with checkpointing (measured, not timed: tensor bytes counted exactly, which needs no fresh process per
point, unlike RSS). All run in the test process (conftest.run_here): nothing they check depends on the process's RSS."""
import json

from conftest import run_here


def bench(tmp_path, monkeypatch, *args):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # already "set": bench.py does not re-execute itself
    out = tmp_path / "bench.json"
    proc = run_here("bench.py", *args, "--json", out)
    return proc.stdout, json.loads(out.read_text())


def test_memory_is_flat_in_the_number_of_steps(tmp_path, monkeypatch):
    # 128 px: one step's activations (12 MB) dwarf the tiny model's 5 MB of weights. The tensor bytes it checks are
    # exact in any process (fresh processes and warm-up runs are for the timing and RSS columns)
    _, res = bench(tmp_path, monkeypatch, "--steps-sweep", "2,6", "--resolution", "128", "--warmup", "0",
                   "--repeats", "0")
    model_mb = res["config"]["model_mb"]
    growth = {row["checkpointed"]: row["growth_mb"] for row in res["rows"] if row["ddim_steps"] == 6}
    assert 0 <= growth[True] < 0.05 * model_mb, growth  # 4 more latents of 4 KB, nothing else
    assert growth[False] > 5 * model_mb, growth  # the measurement does see activations when they are kept


def test_bench_prints_every_mode(tmp_path, monkeypatch):
    stdout, res = bench(tmp_path, monkeypatch, "--repeats", "1", "--warmup", "0", "--ddim-steps", "4")
    assert [row["mode"] for row in res["rows"]] == ["sample", "all", "1", "rand", "lv:2", "drtune:2", "onestep:0.6"]
    assert all(row["seconds"] > 0 and row["step_mb"] > 0 for row in res["rows"])
    kept = {row["mode"]: row["kept"] for row in res["rows"]}  # auto on a CPU: half the RAM fits every step here
    assert kept == {"sample": 0, "all": 4, "1": 1, "rand": 4, "lv:2": 1, "drtune:2": 2, "onestep:0.6": 1}
    assert "x sample" in stdout and "DRaFT-LV, N=2" in stdout and "DRTune, N=2" in stdout
    assert "Direct-Align, F=0.6" in stdout


def test_bench_runs_the_flow_miniatures(tmp_path, monkeypatch):
    # SD3 and FLUX go through flow.flow_sample, each at its pipeline's default guidance (SD3's CFG 7.0, FLUX's
    # embedded 3.5); --sample-steps is the flag's neutral name (--ddim-steps above: its alias)
    for model, guidance in (("tiny-sd3", "CFG 7.0"), ("tiny-flux", "guidance (embedded) 3.5")):
        stdout, res = bench(tmp_path, monkeypatch, "--model", model, "--modes", "sample,all,onestep:0.6",
                            "--sample-steps", "2", "--repeats", "1", "--warmup", "0", "--no-tensor-memory")
        assert [row["mode"] for row in res["rows"]] == ["sample", "all", "onestep:0.6"], model
        assert all(row["seconds"] > 0 and row["peak_mb"] > 0 for row in res["rows"]), model
        assert f"{model}: 64px, batch 1, {guidance}" in stdout and "Direct-Align, F=0.6" in stdout
