"""bench/gpu_check.sh: its GPU mode with stand-ins for nvidia-smi and for the two long commands (which
parse their arguments with the real parsers, so every flag the script passes exists), a failing step,
and (slow) its dry mode end to end on the CPU with the tiny presets."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# python with the two long commands replaced: bench.speed and accelerate's launch parse their arguments
# and print a line; everything else runs as usual
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ "$1 $2" == "-m bench.speed" ]]; then
  shift 2
  [[ "$*" == *"--preset ${FAIL_PRESET:-none} "* ]] && exit 3
  exec "$REAL" -c 'import sys; from bench import speed; a = speed.parse_args(sys.argv[1:]); print("work", a.preset)' "$@"
fi
if [[ "$1 $2" == "-m accelerate.commands.launch" ]]; then
  shift 2
  exec "$REAL" - "$@" <<'EOF'
import importlib, pathlib, sys
from accelerate.commands.launch import launch_command_parser
launch = launch_command_parser().parse_args(sys.argv[1:])
assert launch.num_processes == 1 and pathlib.Path(launch.config_file).is_file(), launch
args = importlib.import_module(launch.training_script[:-3]).build_parser().parse_args(launch.training_script_args)
args.out.parent.mkdir(parents=True)
(args.out.parent / "log.txt").write_text("DPO: 2 pairs | 1 process(es), FSDP, micro batch 2\n")
EOF
fi
exec "$REAL" "$@"
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
[[ "$*" == *--query-gpu=name,* ]] && echo "NVIDIA H200, 143771 MiB, 580.159.04" || echo "NVIDIA H200"
"""


def run_check(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "REAL": sys.executable, "CALLS": str(tmp_path / "calls.txt"), "OUT": str(tmp_path / "out"), **env}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    return done, (tmp_path / "out" / "bench_h200.txt").read_text(), calls


def test_gpu_mode_runs_every_step(tmp_path):
    done, report, calls = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = report.splitlines()
    assert lines[0].startswith("# bench/gpu_check.sh, ") and lines[1] == "# NVIDIA H200, 143771 MiB, 580.159.04"
    assert lines[2].startswith("# python ") and "torch " in lines[2] and "diffusers " in lines[2] and "deepspeed" in lines[2]
    benches = [c for c in calls if c.startswith("-m bench.speed")]
    assert benches == ["-m bench.speed --preset sdxl --random-weights --batch-size 32 --steps 2 --no-naive",
                       "-m bench.speed --preset sd15 --random-weights --batch-size 128 --steps 2 --no-naive"]
    assert "work sdxl" in report and "work sd15" in report and "[bench sdxl: ok in" in report
    launches = [c for c in calls if c.startswith("-m accelerate.commands.launch")]
    assert "--config_file configs/accelerate_fsdp_sdxl_8gpu.yaml --num_processes 1 04_train.py" in launches[0]
    assert "[fsdp step ran as: FSDP]" in report
    deepspeed = "[deepspeed_zero2 step ran as: FSDP]" in report or "[deepspeed_zero2 step: skipped" in report
    assert deepspeed and len(launches) == (1 if "skipped" in report else 2)


@pytest.mark.slow
def test_a_failed_step_fails_the_check_and_the_rest_still_run(tmp_path):
    done, report, calls = run_check(tmp_path, FAIL_PRESET="sdxl", SPEED_FLAGS="compile-regional")
    assert done.returncode == 1
    assert "[bench sdxl: failed, exit 3 in" in report and "[bench sd15: ok in" in report
    assert "[fsdp step ran as: FSDP]" in report
    assert any(c.endswith("--no-naive --speed-flags compile-regional") for c in calls)


@pytest.mark.slow
def test_dry_mode_on_the_cpu(tmp_path):
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=1800)
    report = (tmp_path / "bench_cpu.txt").read_text()
    assert done.returncode == 0, report[-3000:]
    for preset in ("tiny-sdxl", "tiny-sd15"):
        assert f"[bench {preset}: ok in" in report
    assert report.count("TFLOP/unit") >= 4 and report.count("ESTIMATE from the rates above") == 2
    assert "[fsdp step ran as: " in report
